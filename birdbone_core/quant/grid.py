"""The integer levels inside packed GGUF blocks: take them out, put others in, and read each weight's grid.

Every format birdbone encodes decodes each weight as an affine function of its own integer level q:
value = step * q + offset, where step and offset depend only on the block's stored scales (and mins),
never on the weight's own level. So a packed block splits into a "head" (everything but the levels)
and the levels, and GPTQ can keep a block's head (its grid) while choosing the levels one column at
a time.

    levels(name, packed)        uint8 [N, type_size] -> float levels [N, block_size] (0 .. top)
    with_levels(name, packed, q) -> the same blocks with levels q (head bytes unchanged)
    affine(name, packed)        -> (step, offset) [N, block_size], float32
    TOP[name]                   the largest level (the smallest is 0)

Level conventions (unsigned, as stored): Q8_0 q = int8 + 128; Q4_0/Q4_1 0..15; Q5_0/Q5_1 0..31;
Q2_K 0..3; Q3_K 0..7 (low 2 bits + 4 * hmask bit); Q4_K 0..15; Q5_K 0..31; Q6_K 0..63; IQ4_NL 0..15,
an index into its value table (TABLE): value = step * TABLE[q] + offset, offset 0.
Each format's level layout (top, the level bytes, how they pack) is declared once, by its codec
(`codecs/legacy.py`, `k_affine.py`, `k_symmetric.py`, `nonlinear.py`); this module reads it from there.
"""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs import codec_names, get_codec
from birdbone_core.quant.codecs import decode as _decode
from birdbone_core.quant.formats import get_format

TOP = {n: get_codec(n).top for n in codec_names()}
# non-uniform formats: value = step * TABLE[name][q] + offset (the others: step * q + offset)
TABLE = {n: get_codec(n).table for n in codec_names() if get_codec(n).table is not None}


def levels(name, packed: torch.Tensor) -> torch.Tensor:
    """Packed blocks uint8 [N, type_size] -> their levels as float32 [N, block_size]."""
    codec = get_codec(name)
    a, b = codec.levels_at
    return codec.unpack_levels(packed[:, a:b].contiguous()).float()


def with_levels(name, packed: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Blocks [N, type_size] with their levels replaced by q [N, block_size] (integers 0..TOP)."""
    codec = get_codec(name)
    a, b = codec.levels_at
    out = packed.clone()
    out[:, a:b] = codec.pack_levels(q.round().clamp(0, codec.top).to(torch.int16))
    return out


def affine(name, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-weight (step, offset) [N, block_size] of blocks [N, type_size]: value = step * q + offset
    (for a TABLE format: step * TABLE[q] + offset). Read off the decoder itself, so it is whatever the
    format really computes: levels 0 and TOP, or for a table the level whose value is 1."""
    fmt = get_format(name)
    n, bs = packed.shape[0], fmt.block_size
    zero = torch.zeros(n, bs, device=packed.device)
    if fmt.name in TABLE:
        one = int((TABLE[fmt.name] == 1).nonzero()[0])
        step = _decode(fmt.name, with_levels(fmt.name, packed, zero + one), (n, bs))
        return step, torch.zeros_like(step)
    lo = _decode(fmt.name, with_levels(fmt.name, packed, zero), (n, bs))
    hi = _decode(fmt.name, with_levels(fmt.name, packed, zero + TOP[fmt.name]), (n, bs))
    return (hi - lo) / TOP[fmt.name], lo


def level_values(name, q: torch.Tensor) -> torch.Tensor:
    """The grid value (before step and offset) of levels q: q itself, or TABLE[name][q]."""
    table = TABLE.get(get_format(name).name)
    return q if table is None else table.to(q.device)[q.long()]


def nearest_table_levels(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, name: str) -> torch.Tensor:
    """The level whose value step * TABLE[q] + offset is nearest x, for a TABLE format (step 0 -> level 0)."""
    ok = step != 0
    nearest = get_codec(name).nearest_levels
    q = nearest((x - offset) / torch.where(ok, step, torch.ones_like(step))).float()
    return torch.where(ok, q, torch.zeros_like(q))


def nearest_levels(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, top: int | torch.Tensor) -> torch.Tensor:
    """The level in 0..top whose value step*q + offset is nearest x (elementwise; step 0 -> level 0).
    top: one largest level, or a float tensor of them broadcasting against x (formats stacked by row)."""
    ok = step != 0
    q = torch.round((x - offset) / torch.where(ok, step, torch.ones_like(step))).clamp_(min=0)
    q = q.clamp_(max=top) if isinstance(top, int) else torch.minimum(q, top)
    return torch.where(ok, q, torch.zeros_like(q))
