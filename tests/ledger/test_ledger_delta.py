"""Pure delta functions: exact round trips on the raw bits, hashing, encoding, composition."""
import hashlib
import struct

import pytest
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import codec
from birdbone_core.ledger.delta import (
    DeltaMismatch,
    apply_backward,
    apply_forward,
    bits,
    compose,
    compute_delta,
    tensor_hash,
)

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def special(dtype: torch.dtype, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Random values [n] with -0.0, +0.0, NaNs (two payloads), ±inf, subnormals, max spliced in."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g).to(dtype)
    fi = torch.finfo(dtype)
    sub = fi.tiny / 4                                                 # subnormal
    vals = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), float("-inf"), sub, -sub, fi.max],
                        dtype=torch.float32).to(dtype)
    t[: len(vals)] = vals
    other_nan = bits(torch.tensor([float("nan")], dtype=dtype)) | 1   # NaN with another payload
    bits(t)[len(vals)] = other_nan[0]
    return t


def same_bits(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", FLOATS)
def test_round_trip_special_values(dtype):
    old = special(dtype).reshape(40, 100)
    new = old.clone()
    f = new.view(-1)
    f[0] = 0.0                                                        # -0.0 -> +0.0
    f[1] = -0.0                                                       # +0.0 -> -0.0
    bits(f)[2] = bits(f)[8]                                           # NaN -> NaN with another payload
    f[3], f[5] = float("-inf"), torch.finfo(dtype).tiny / 8           # inf -> -inf, subnormal -> smaller
    f[100:500] = 0.0                                                  # a prune
    f[1000:1010] = float("nan")
    d = compute_delta(old, new)
    expect = int((bits(old) != bits(new)).sum())
    assert d is not None and d.n_changed == expect and d.shape == (40, 100) and d.dtype == dtype
    assert d.idx.dtype == torch.int64 and bool((d.idx[1:] > d.idx[:-1]).all())
    assert same_bits(apply_forward(old, d), new)
    assert same_bits(apply_backward(new, d), old)
    for enc in (codec.unpack(codec.pack({"w": d})[0], "t")["w"],):   # through the file encoding
        assert same_bits(apply_forward(old, enc), new) and same_bits(apply_backward(new, enc), old)


@pytest.mark.parametrize("dtype", FLOATS)
def test_bitwise_identity_and_signed_zero(dtype):
    t = special(dtype)
    assert compute_delta(t, t.clone()) is None                        # NaN == NaN bitwise
    z = torch.zeros(3, dtype=dtype)
    d = compute_delta(z, -z)
    assert d is not None and d.n_changed == 3
    assert tensor_hash(z) != tensor_hash(-z)


def test_in_place_and_non_contiguous():
    old = torch.randn(30, 20)
    new = old.clone()
    new[::3, 5] = 0
    d = compute_delta(old, new)
    t = old.clone()
    assert apply_forward(t, d, inplace=True) is t and same_bits(t, new)
    tt = old.t().contiguous().t()                                     # same values, transposed strides
    assert not tt.is_contiguous()
    assert same_bits(apply_forward(tt, d, inplace=True), new) and same_bits(tt, new)
    assert same_bits(old, apply_backward(new, d))


def test_apply_checks_old_values_shape_and_dtype():
    old = torch.randn(100)
    new = old.clone()
    new[:10] = 0
    d = compute_delta(old, new)
    other = old.clone()
    other[3] += 1
    with pytest.raises(DeltaMismatch, match="1 of 10"):
        apply_forward(other, d)
    assert same_bits(apply_forward(other, d, check=False), new)
    with pytest.raises(DeltaMismatch):
        apply_forward(old.reshape(10, 10), d)
    with pytest.raises(DeltaMismatch):
        apply_forward(old.double(), d)
    with pytest.raises(DeltaMismatch):
        compute_delta(old, new.reshape(10, 10))


def test_other_dtypes():
    for old in (torch.arange(50, dtype=torch.int64), torch.arange(50) % 3 == 0, torch.arange(50, dtype=torch.uint8)):
        new = old.clone()
        new[7] = new[9]
        new[20:25] = new[0]
        d = compute_delta(old, new)
        assert same_bits(apply_forward(old, d), new) and same_bits(apply_backward(new, d), old)


def test_hash_is_little_endian_bytes_dtype_and_shape():
    t = torch.tensor([[1.5, -2.0], [0.0, 3.25]])
    raw = struct.pack("<4f", 1.5, -2.0, 0.0, 3.25)
    assert tensor_hash(t) == hashlib.sha256(b"float32:2,2:" + raw).hexdigest()
    assert tensor_hash(t.t()) == tensor_hash(t.t().contiguous())       # layout does not matter
    assert tensor_hash(t) != tensor_hash(t.reshape(4))                 # shape does
    assert tensor_hash(t) != tensor_hash(t.view(torch.int32))          # dtype does
    assert len({tensor_hash(special(dt)) for dt in FLOATS}) == 3


def test_codec_picks_compact_forms():
    w = torch.randn(64, 64)
    sparse = w.clone()
    sparse.view(-1)[[3, 500, 4000]] = 0                               # 3 changes: positions beat a mask
    dense = w.clone()
    dense[:, ::4] = 0                                                 # 25% changes: a bitmask beats positions
    for new, idx_form, new_form in ((sparse, "pos", "fill"), (dense, "mask", "fill")):
        d = compute_delta(w, new)
        tensors, meta = codec.encode("w", d)
        assert (meta["idx"], meta["old"], meta["new"]) == (idx_form, "full", new_form)
        back = codec.decode("w", tensors, meta)
        assert torch.equal(back.idx, d.idx) and same_bits(back.old, d.old) and same_bits(back.new, d.new)
    data, sizes = codec.pack({"w": compute_delta(w, dense)})
    assert sizes["w"] == 64 * 64 // 8 + 1024 * 4 + 4


@pytest.mark.parametrize("dtype", FLOATS)
def test_codec_sparse_values_keep_exact_bits(dtype):
    old = special(dtype, n=2000, seed=3)
    new = old.clone()
    new[20:1000] = 0.0                                                # a prune ...
    new[10:12] = float("nan")                                          # ... plus a few other new values
    bits(new)[12] = bits(old)[8]                                       # NaN with a payload
    new[13] = -0.0
    d = compute_delta(old, new)
    tensors, meta = codec.encode("w", d)
    assert meta["new"] == "sparse" and "w.new.where" in tensors and tensors["w.new"].numel() == 1 + 4
    back = codec.unpack(codec.pack({"w": d})[0], "t")["w"]
    assert same_bits(back.new, d.new) and same_bits(back.old, d.old)
    assert same_bits(apply_forward(old, back), new)


def test_codec_rejects_damage():
    w = torch.randn(100)
    new = w.clone()
    new[:5] = 1
    data, _ = codec.pack({"w": compute_delta(w, new)})
    with pytest.raises(BirdboneError, match="damaged delta file"):
        codec.unpack(data[: len(data) - 3], "x")
    with pytest.raises(BirdboneError, match="damaged delta file"):
        codec.unpack(b"\x00" * 16, "x")


def test_compose_chain_cancel_and_inconsistency():
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(500, generator=g)
    s1 = s0.clone()
    s1[:100] = 0
    s2 = s1.clone()
    s2[50:150] += 1
    s3 = s2.clone()
    s3[140:200] = 0
    s3[:10] = s0[:10]                                                  # partly restores
    ds = [compute_delta(a, b) for a, b in ((s0, s1), (s1, s2), (s2, s3))]
    net = compose(ds)
    ref = compute_delta(s0, s3)
    assert torch.equal(net.idx, ref.idx) and same_bits(net.old, ref.old) and same_bits(net.new, ref.new)
    assert same_bits(apply_forward(s0, net), s3)
    assert compose([ds[0], ds[0].inverse()]) is None
    with pytest.raises(DeltaMismatch, match="do not chain"):
        compose([ds[0], ds[0]])


def test_delta_writer_streams_the_bytes_pack_makes(tmp_path):
    """A wave recorded one tensor at a time (codec.DeltaWriter) is the very file pack() makes of all of them."""
    g = torch.Generator().manual_seed(7)
    deltas = {}
    for name, dtype, shape in (("model.layers.0.mlp.down_proj.weight", torch.float32, (64, 128)),
                               ("b", torch.bfloat16, (300,)), ("c.weight", torch.float16, (17, 9)),
                               ("e", torch.float32, (5000,))):
        w = torch.randn(*shape, generator=g).to(dtype)
        new = w.clone()
        new[new.abs() < 0.5] = 0                                       # a prune (fill / sparse values)
        new[new.abs() > 1.5] *= 1.01                                   # and a few healed survivors
        deltas[name] = compute_delta(w, new)
    data, sizes = codec.pack(deltas)
    writer = codec.DeltaWriter(tmp_path / "scratch")
    for name, d in deltas.items():
        writer.add(name, d)
    sha = writer.finish(tmp_path / "delta.safetensors")
    writer.close()
    assert (tmp_path / "delta.safetensors").read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest() and writer.sizes == sizes
    assert not (tmp_path / "scratch").exists()
