"""Sparse, exact weight deltas: pure functions on tensors, no files.

Every comparison is on the raw bits (each element viewed as a same-width integer), so -0.0 vs +0.0 and
NaN payloads count as changes, and applying a delta writes back the exact bytes that were recorded.

Shapes: a tensor `t` of shape S with N = prod(S) elements is seen flat as [N]; a delta holds n changed
flat positions `idx` [n] int64 (ascending) with their values before (`old` [n]) and after (`new` [n]).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from birdbone_core.errors import BirdboneError

# element size in bytes -> the integer dtype whose bits we compare and copy
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# integer dtype -> numpy little-endian type code, for hashing a fixed byte order on any host
_LE = {torch.uint8: "|u1", torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8"}


class DeltaMismatch(BirdboneError):
    """A delta does not fit the tensor it is applied to (wrong shape/dtype or different old values)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise BirdboneError(f"unknown tensor dtype '{name}' in the ledger")
    return dt


def bits(t: Tensor) -> Tensor:
    """The same memory as an integer tensor of the same element width (same shape): [*S] -> [*S] int."""
    if t.is_complex():
        raise BirdboneError(f"complex tensors ({dtype_name(t.dtype)}) are not supported by the ledger")
    it = _BITS.get(t.element_size())
    if it is None:
        raise BirdboneError(f"tensor dtype {dtype_name(t.dtype)} is not supported by the ledger")
    return t if t.dtype == it else t.view(it)


@dataclass(frozen=True)
class TensorDelta:
    """The change of one tensor: flat positions and the values there before and after."""
    idx: Tensor              # [n] int64, ascending flat positions into the [N] view
    old: Tensor              # [n] of `dtype`, values before the change
    new: Tensor              # [n] of `dtype`, values after the change
    shape: tuple[int, ...]   # S, the tensor's shape
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def n_changed(self) -> int:
        return int(self.idx.numel())

    def inverse(self) -> TensorDelta:
        return TensorDelta(self.idx, self.new, self.old, self.shape, self.dtype)


def _flat(t: Tensor) -> Tensor:
    return t.detach().cpu().reshape(-1)


def compute_delta(old: Tensor, new: Tensor) -> TensorDelta | None:
    """The elements whose bits differ between `old` and `new` (same shape and dtype); None if identical."""
    if tuple(old.shape) != tuple(new.shape) or old.dtype != new.dtype:
        raise DeltaMismatch(
            f"cannot record a change of shape or dtype ({dtype_name(old.dtype)}{list(old.shape)} -> "
            f"{dtype_name(new.dtype)}{list(new.shape)}) as a sparse delta")
    o, n = _flat(old), _flat(new)                                    # [N], [N]
    idx = torch.nonzero(bits(o) != bits(n)).reshape(-1)              # [n] int64, ascending
    if idx.numel() == 0:
        return None
    return TensorDelta(idx, o.index_select(0, idx), n.index_select(0, idx), tuple(old.shape), old.dtype)


def _check_fits(t: Tensor, d: TensorDelta) -> None:
    if tuple(t.shape) != d.shape or t.dtype != d.dtype:
        raise DeltaMismatch(f"delta is for {dtype_name(d.dtype)}{list(d.shape)} "
                            f"but the tensor is {dtype_name(t.dtype)}{list(t.shape)}")


def _apply(t: Tensor, idx: Tensor, expect: Tensor, put: Tensor, inplace: bool, check: bool) -> Tensor:
    out = t if inplace else t.detach().clone()
    flat = out.view(-1) if out.is_contiguous() else out.contiguous().view(-1)   # [N]
    fb = bits(flat)
    if check and idx.numel():
        bad = int((fb.index_select(0, idx) != bits(expect)).sum())
        if bad:
            raise DeltaMismatch(f"delta does not apply: {bad} of {idx.numel()} changed elements "
                                f"differ from the recorded values before the change")
    fb.index_copy_(0, idx, bits(put))
    if not out.is_contiguous():
        out.copy_(flat.view(out.shape))                              # flat was a copy: write it back
    return out


def apply_forward(t: Tensor, d: TensorDelta, *, inplace: bool = False, check: bool = True) -> Tensor:
    """`t` (the state before) -> the state after. With check, the elements at d.idx must equal d.old."""
    _check_fits(t, d)
    return _apply(t, d.idx, d.old, d.new, inplace, check)


def apply_backward(t: Tensor, d: TensorDelta, *, inplace: bool = False, check: bool = True) -> Tensor:
    """`t` (the state after) -> the state before. With check, the elements at d.idx must equal d.new."""
    _check_fits(t, d)
    return _apply(t, d.idx, d.new, d.old, inplace, check)


def tensor_hash(t: Tensor) -> str:
    """sha256 over dtype, shape and the contiguous little-endian bytes of `t` (any host byte order)."""
    flat = bits(_flat(t).contiguous())                               # [N] int
    arr = flat.numpy().astype(_LE[flat.dtype], copy=False)
    h = hashlib.sha256(f"{dtype_name(t.dtype)}:{','.join(map(str, t.shape))}:".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def compose(deltas: list[TensorDelta]) -> TensorDelta | None:
    """The net change of consecutive deltas of one tensor (applied in list order); None if it cancels out.

    Checks that the chain is consistent: where two deltas touch the same element, the later one's old
    value must be the earlier one's new value.
    """
    if not deltas:
        return None
    d0 = deltas[0]
    for d in deltas[1:]:
        if d.shape != d0.shape or d.dtype != d0.dtype:
            raise DeltaMismatch("cannot compose deltas of different shapes or dtypes")
    idx = torch.cat([d.idx for d in deltas])                         # [m] (m = total changes)
    old = torch.cat([d.old for d in deltas])                         # [m]
    new = torch.cat([d.new for d in deltas])                         # [m]
    idx, order = torch.sort(idx, stable=True)                        # stable: equal positions keep wave order
    old, new = old.index_select(0, order), new.index_select(0, order)
    same = idx[1:] == idx[:-1]                                       # [m-1] next entry is the same element
    if bool(((bits(new[:-1]) != bits(old[1:])) & same).any()):
        raise DeltaMismatch("deltas do not chain: a later delta's old value differs from an earlier new value")
    uniq, counts = torch.unique_consecutive(idx, return_counts=True)  # [u], [u]
    last = torch.cumsum(counts, 0) - 1                               # [u] last entry of each element
    first = last - counts + 1                                        # [u] first entry of each element
    o, n = old.index_select(0, first), new.index_select(0, last)     # [u] before the first, after the last
    keep = torch.nonzero(bits(o) != bits(n)).reshape(-1)             # [k] elements really changed
    if keep.numel() == 0:
        return None
    pick = lambda x: x.index_select(0, keep)                         # noqa: E731
    return TensorDelta(pick(uniq), pick(o), pick(n), d0.shape, d0.dtype)


def change_norm(d: TensorDelta) -> float:
    """L2 norm of (new - old) over the changed elements, in float64."""
    return float(torch.linalg.vector_norm(d.new.double() - d.old.double())) if d.n_changed else 0.0
