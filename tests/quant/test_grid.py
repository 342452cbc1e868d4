"""Levels inside packed blocks: taken out and put back bit for bit; the affine grid is the decoder's."""
import pytest
import torch

from birdbone_core.quant import grid
from birdbone_core.quant.codecs import decode, encode_torch
from birdbone_core.quant.formats import get_format

NAMES = list(grid.TOP)


@pytest.mark.parametrize("name", NAMES)
def test_levels_roundtrip_and_affine(name):
    fmt = get_format(name)
    W = torch.randn(6, 512) * torch.linspace(0.1, 3, 512)
    b = encode_torch(name, W)[0].reshape(-1, fmt.type_size)
    q = grid.levels(name, b)
    assert q.min() >= 0 and q.max() <= grid.TOP[name]
    assert torch.equal(grid.with_levels(name, b, q), b)
    step, off = grid.affine(name, b)
    v = decode(name, b, (b.shape[0], fmt.block_size))
    assert torch.allclose(step * grid.level_values(name, q) + off, v, rtol=0, atol=1e-6 * float(v.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_with_levels_changes_only_levels(name):
    """New random levels: the head bytes (scales, mins) stay, and the decoded values follow the grid."""
    fmt = get_format(name)
    b = encode_torch(name, torch.randn(4, 256))[0].reshape(-1, fmt.type_size)
    q = torch.randint(0, grid.TOP[name] + 1, (b.shape[0], fmt.block_size)).float()
    b2 = grid.with_levels(name, b, q)
    assert torch.equal(grid.levels(name, b2), q)
    step, off = grid.affine(name, b)
    step2, off2 = grid.affine(name, b2)
    assert torch.equal(step, step2) and torch.equal(off, off2)
    v = decode(name, b2, (b.shape[0], fmt.block_size))
    assert torch.allclose(step * grid.level_values(name, q) + off, v, rtol=0, atol=1e-6 * float(v.abs().max()))


def test_nearest_levels():
    step = torch.tensor([0.5, 0.5, -0.25, 0.0])
    off = torch.tensor([-1.0, -1.0, 0.0, 3.0])
    x = torch.tensor([0.24, 9.0, -0.6, 1.0])
    assert grid.nearest_levels(x, step, off, 15).tolist() == [2.0, 15.0, 2.0, 0.0]


def test_nearest_table_levels():
    """IQ4_NL's levels index a non-uniform table (-127 ... 113): the nearest value wins, in either sign of step."""
    t = grid.TABLE["IQ4_NL"]
    step = torch.tensor([1.0, 1.0, -2.0, 0.0, 1.0])
    x = torch.tensor([0.0, 200.0, 20.0, 5.0, -115.5])
    q = grid.nearest_table_levels(x, step, torch.zeros(5), "IQ4_NL")
    assert q.tolist() == [8.0, 15.0, 7.0, 0.0, 1.0]  # 1; 113; -10 * -2 = 20; step 0; -115.5: a tie of -127 and -104 goes up
    assert float(t[8]) == 1.0 and float(t[1]) == -104.0


def test_every_block_format_is_declared_once_by_its_codec():
    """The codec of a format owns its level layout; the grid's tables and the recipe's list of block types
    (kept literal so recipes load without torch) are that registry, read back."""
    from birdbone_core.quant.codecs import codec_names, get_codec
    from birdbone_core.quant.config import BLOCK_TYPES

    assert set(BLOCK_TYPES) == set(codec_names())
    for name in codec_names():
        c = get_codec(name)
        a, b = c.levels_at
        assert 0 <= a < b <= c.type_size, name
        assert grid.TOP[name] == c.top
        q = torch.arange(c.block_size).remainder(c.top + 1).reshape(1, -1)
        assert torch.equal(c.unpack_levels(c.pack_levels(q)).long(), q), name     # the layout round-trips
    assert set(grid.TABLE) == {"IQ4_NL"}
