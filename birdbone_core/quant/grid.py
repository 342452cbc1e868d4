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
Byte layouts are the ones in `codecs/legacy.py`, `k_affine.py`, `k_symmetric.py`.
"""
from __future__ import annotations

from typing import Callable

import torch

from birdbone_core.quant.codecs import decode as _decode
from birdbone_core.quant.codecs._bits import pack_bits, pack_crumbs, unpack_bits, unpack_crumbs
from birdbone_core.quant.codecs.nonlinear import KVALUES as _IQ4_NL_VALUES
from birdbone_core.quant.codecs.nonlinear import nearest_index as _iq4_nl_nearest
from birdbone_core.quant.formats import get_format

TOP = {"Q8_0": 255, "Q4_0": 15, "Q4_1": 15, "Q5_0": 31, "Q5_1": 31,
       "Q2_K": 3, "Q3_K": 7, "Q4_K": 15, "Q5_K": 31, "Q6_K": 63, "IQ4_NL": 15}
# non-uniform formats: value = step * TABLE[name][q] + offset (the others: step * q + offset), and the
# format's own nearest-index rule (v -> index of the nearest table value)
TABLE = {"IQ4_NL": _IQ4_NL_VALUES}
_TABLE_NEAREST = {"IQ4_NL": _iq4_nl_nearest}


def _nib_u(b):  # 16 bytes -> 32 levels (low nibbles are weights 0..15, high ones 16..31)
    return unpack_crumbs(b, 4)


# name -> (first byte of the level fields, end byte, unpack(fields) -> q [N, bs], pack(q) -> fields)
def _q8_unpack(f):
    return f.contiguous().view(torch.int8).to(torch.int16) + 128


def _q8_pack(q):
    return (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)


def _q5_unpack(f):  # qh[4] then qs[16]
    return unpack_crumbs(f[:, 4:], 4) | (unpack_bits(f[:, :4]) << 4)


def _q5_pack(q):
    q = q.to(torch.uint8)
    return torch.cat([pack_bits(q >> 4), pack_crumbs(q & 15, 4)], -1)


def _q2k_unpack(f):  # qs[64]
    n = f.shape[0]
    return unpack_crumbs(f.reshape(n, -1, 32), 2).reshape(n, -1)


def _q2k_pack(q):
    n = q.shape[0]
    return pack_crumbs(q.to(torch.uint8).reshape(n, -1, 128), 2).reshape(n, -1)


def _q3k_unpack(f):  # hmask[32] then qs[64]
    n = f.shape[0]
    low = unpack_crumbs(f[:, 32:].reshape(n, -1, 32), 2).reshape(n, -1)
    return low | (unpack_crumbs(f[:, :32], 1) << 2)


def _q3k_pack(q):
    q = q.to(torch.uint8)
    n = q.shape[0]
    return torch.cat([pack_crumbs(q >> 2, 1), pack_crumbs((q & 3).reshape(n, -1, 128), 2).reshape(n, -1)], -1)


def _q4k_unpack(f):  # qs[128]
    n = f.shape[0]
    return unpack_crumbs(f.reshape(n, -1, 32), 4).reshape(n, -1)


def _q4k_pack(q):
    n = q.shape[0]
    return pack_crumbs(q.to(torch.uint8).reshape(n, -1, 64), 4).reshape(n, -1)


def _q5k_unpack(f):  # qh[32] then qs[128]
    return _q4k_unpack(f[:, 32:]) | (unpack_crumbs(f[:, :32], 1) << 4)


def _q5k_pack(q):
    q = q.to(torch.uint8)
    return torch.cat([pack_crumbs(q >> 4, 1), _q4k_pack(q & 15)], -1)


def _q6k_unpack(f):  # ql[128] then qh[64]
    n = f.shape[0]
    low = unpack_crumbs(f[:, :128].reshape(n, -1, 64), 4).reshape(n, -1)
    high = unpack_crumbs(f[:, 128:].reshape(n, -1, 32), 2).reshape(n, -1)
    return low | (high << 4)


def _q6k_pack(q):
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 128)
    n = q.shape[0]
    return torch.cat([pack_crumbs(q & 15, 4).reshape(n, -1), pack_crumbs(q >> 4, 2).reshape(n, -1)], -1)


_FIELDS: dict[str, tuple[int, int, Callable, Callable]] = {
    "Q8_0": (2, 34, _q8_unpack, _q8_pack),
    "Q4_0": (2, 18, _nib_u, lambda q: pack_crumbs(q.to(torch.uint8), 4)),
    "Q4_1": (4, 20, _nib_u, lambda q: pack_crumbs(q.to(torch.uint8), 4)),
    "Q5_0": (2, 22, _q5_unpack, _q5_pack),
    "Q5_1": (4, 24, _q5_unpack, _q5_pack),
    "Q2_K": (16, 80, _q2k_unpack, _q2k_pack),
    "Q3_K": (0, 96, _q3k_unpack, _q3k_pack),
    "Q4_K": (16, 144, _q4k_unpack, _q4k_pack),
    "Q5_K": (16, 176, _q5k_unpack, _q5k_pack),
    "Q6_K": (0, 192, _q6k_unpack, _q6k_pack),
    "IQ4_NL": (2, 18, _nib_u, lambda q: pack_crumbs(q.to(torch.uint8), 4)),
}


def _spec(name):
    fmt = get_format(name)
    return fmt, _FIELDS[fmt.name]


def levels(name, packed: torch.Tensor) -> torch.Tensor:
    """Packed blocks uint8 [N, type_size] -> their levels as float32 [N, block_size]."""
    _, (a, b, unpack, _) = _spec(name)
    return unpack(packed[:, a:b].contiguous()).float()


def with_levels(name, packed: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Blocks [N, type_size] with their levels replaced by q [N, block_size] (integers 0..TOP)."""
    fmt, (a, b, _, pack) = _spec(name)
    out = packed.clone()
    out[:, a:b] = pack(q.round().clamp(0, TOP[fmt.name]).to(torch.int16))
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
    nearest = _TABLE_NEAREST[get_format(name).name]
    q = nearest((x - offset) / torch.where(ok, step, torch.ones_like(step))).float()
    return torch.where(ok, q, torch.zeros_like(q))


def nearest_levels(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, top: int | torch.Tensor) -> torch.Tensor:
    """The level in 0..top whose value step*q + offset is nearest x (elementwise; step 0 -> level 0).
    top: one largest level, or a float tensor of them broadcasting against x (formats stacked by row)."""
    ok = step != 0
    q = torch.round((x - offset) / torch.where(ok, step, torch.ones_like(step))).clamp_(min=0)
    q = q.clamp_(max=top) if isinstance(top, int) else torch.minimum(q, top)
    return torch.where(ok, q, torch.zeros_like(q))
