"""Compact encoding of deltas as safetensors bytes (pure: bytes in, bytes out, no files).

For each changed tensor `name` (N elements, n changed) the file holds
    {name}.idx   which elements changed, the smaller of:
                   "pos":  [n] int32 (int64 when N >= 2**31) ascending flat positions    4n bytes
                   "mask": [ceil(N/8)] uint8, bit i (little bit order) set = element i   N/8 bytes
    {name}.old   values before, the smallest of:
                   "full":   [n] of the tensor's dtype
                   "fill":   [1], when all n share one bit pattern (a prune wave's new zeros)
                   "sparse": [1 + k]: the common value (the first one's or zero), then the k others, with
                   {name}.old.where  [ceil(n/8)] uint8, bit j set = changed element j is one of the k
                             (a prune wave that also heals a few survivors: mostly zeros, some values)
    {name}.new   values after, same forms
The per-tensor encoding, shape and dtype sit in the safetensors metadata under "tensors" (JSON).
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from torch import Tensor

from birdbone_core.errors import BirdboneError
from birdbone_core.ledger.delta import TensorDelta, bits, dtype_name, parse_dtype

FORMAT = "birdbone-ledger-delta/1"


def _packbits(m: np.ndarray) -> Tensor:
    return torch.from_numpy(np.packbits(m, bitorder="little"))      # [n] bool -> [ceil(n/8)] uint8


def _unpackbits(t: Tensor, n: int) -> np.ndarray:
    if t.dtype != torch.uint8 or t.numel() != (n + 7) // 8:
        raise ValueError("bad bit mask")
    return np.unpackbits(t.numpy(), count=n, bitorder="little").astype(bool)   # [n] bool


def _encode_values(key: str, v: Tensor) -> tuple[dict[str, Tensor], str]:
    """[n] values -> their smallest form (see the module doc)."""
    n, size = v.numel(), v.element_size()
    b = bits(v)                                                      # [n] int
    fill, fb = v[:1].clone(), b[0]                                   # candidate: the first value ...
    common = int((b == fb).sum())
    zero = torch.zeros((), dtype=b.dtype)                            # ... or zero (+0.0)
    if (nz := int((b == zero).sum())) > common:
        fill, fb, common = torch.zeros(1, dtype=v.dtype), zero, nz
    if common == n:
        return {key: fill}, "fill"
    if size * (1 + n - common) + (n + 7) // 8 < size * n:
        other = b != fb                                              # [n] bool
        vals = torch.cat([fill, v.index_select(0, torch.nonzero(other).reshape(-1))])   # [1 + k]
        return {key: vals, f"{key}.where": _packbits(other.numpy())}, "sparse"
    return {key: v.contiguous()}, "full"


def _decode_values(tensors: dict[str, Tensor], key: str, form: str, n: int) -> Tensor:
    v = tensors[key].reshape(-1)
    if form == "full" and v.numel() == n:
        return v
    if form == "fill" and v.numel() == 1:
        return v.expand(n).clone()
    if form == "sparse":
        where = torch.from_numpy(np.flatnonzero(_unpackbits(tensors[f"{key}.where"], n)))   # [k]
        if v.numel() == 1 + where.numel():
            out = v[:1].expand(n).clone()                           # [n] the common value
            bits(out).index_copy_(0, where, bits(v[1:]))             # the k others, bit for bit
            return out
    raise ValueError(f"{key}: expected {n} values in form {form!r}")


def encode(name: str, d: TensorDelta) -> tuple[dict[str, Tensor], dict]:
    """One tensor's delta -> its file entries and metadata."""
    N, n = d.numel, d.n_changed
    pos_bytes = 4 * n if N < 2**31 else 8 * n
    if (N + 7) // 8 < pos_bytes:
        mask = np.zeros(N, dtype=bool)                                # [N]
        mask[d.idx.numpy()] = True
        idx, idx_form = _packbits(mask), "mask"                      # [ceil(N/8)] uint8
    else:
        idx, idx_form = d.idx.to(torch.int32 if N < 2**31 else torch.int64), "pos"     # [n]
    old, old_form = _encode_values(f"{name}.old", d.old)
    new, new_form = _encode_values(f"{name}.new", d.new)
    meta = {"shape": list(d.shape), "dtype": dtype_name(d.dtype), "n": n,
            "idx": idx_form, "old": old_form, "new": new_form}
    return {f"{name}.idx": idx, **old, **new}, meta


def decode(name: str, tensors: dict[str, Tensor], meta: dict) -> TensorDelta:
    """Inverse of `encode`; raises ValueError on anything inconsistent."""
    shape, dtype, n = tuple(int(s) for s in meta["shape"]), parse_dtype(meta["dtype"]), int(meta["n"])
    N = 1
    for s in shape:
        N *= s
    raw = tensors[f"{name}.idx"]
    if meta["idx"] == "mask":
        idx = torch.from_numpy(np.flatnonzero(_unpackbits(raw, N)))   # [n] int64
    elif meta["idx"] == "pos":
        idx = raw.reshape(-1).long()                                  # [n]
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= N or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError("positions out of range or not ascending")
    else:
        raise ValueError(f"unknown index form {meta['idx']!r}")
    if idx.numel() != n:
        raise ValueError(f"{idx.numel()} positions, expected {n}")
    old = _decode_values(tensors, f"{name}.old", meta["old"], n)
    new = _decode_values(tensors, f"{name}.new", meta["new"], n)
    if old.dtype != dtype or new.dtype != dtype:
        raise ValueError("value dtype differs from the recorded dtype")
    return TensorDelta(idx, old, new, shape, dtype)


def pack(deltas: dict[str, TensorDelta]) -> tuple[bytes, dict[str, int]]:
    """All of a wave's deltas -> (safetensors bytes, encoded bytes per tensor)."""
    tensors: dict[str, Tensor] = {}
    metas: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for name, d in deltas.items():
        t, metas[name] = encode(name, d)
        tensors.update(t)
        sizes[name] = sum(v.numel() * v.element_size() for v in t.values())
    data = save(tensors, metadata={"format": FORMAT, "tensors": json.dumps(metas)})
    return canonical_header(data), sizes


# safetensors writes tensors sorted by dtype (this order) then name, each right after the last
_ST_ORDER = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
             torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_RANK = {name: r for r, name in enumerate(_ST_ORDER.values())}


class DeltaWriter:
    """pack(), one tensor at a time: each delta is encoded when added and its entries go to a scratch file,
    so a wave that changes every weight of a model bigger than memory can be recorded. `finish` writes the
    same bytes pack() would (header, then the entries in the safetensors writer's order) and returns their
    sha256 and the encoded bytes per tensor."""

    def __init__(self, scratch: Path):
        self.scratch = Path(scratch)
        self._parts = open(self.scratch, "w+b")
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}   # key -> (dtype, shape, offset, nbytes)
        self.metas: dict[str, dict] = {}
        self.sizes: dict[str, int] = {}

    def add(self, name: str, d: TensorDelta) -> None:
        tensors, self.metas[name] = encode(name, d)
        self.sizes[name] = 0
        for key, t in tensors.items():
            raw = memoryview(bits(t.contiguous()).numpy()).cast("B") if t.dtype != torch.bool else \
                memoryview(t.numpy()).cast("B")
            self._entries[key] = (_ST_ORDER[t.dtype], list(t.shape), self._parts.tell(), raw.nbytes)
            self._parts.write(raw)
            self.sizes[name] += raw.nbytes

    def finish(self, out: Path) -> str:
        header: dict = {"__metadata__": {"format": FORMAT, "tensors": json.dumps(self.metas)}}
        order = sorted(self._entries, key=lambda k: (_RANK[self._entries[k][0]], k))
        offset = 0
        for key in order:
            dtype, shape, _, n = self._entries[key]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        h = hashlib.sha256()
        with open(out, "wb") as f:
            for chunk in (struct.pack("<Q", len(text)), text):
                f.write(chunk)
                h.update(chunk)
            for key in order:
                _, _, at, n = self._entries[key]
                self._parts.seek(at)
                chunk = self._parts.read(n)
                f.write(chunk)
                h.update(chunk)
        return h.hexdigest()

    def close(self) -> None:
        self._parts.close()
        self.scratch.unlink(missing_ok=True)


def canonical_header(data: bytes) -> bytes:
    """safetensors bytes whose header lists its metadata keys sorted. The writer keeps metadata in a hash
    map whose order changes from process to process, so the same delta would otherwise get different
    file bytes (and sha256) in two runs. Same keys and values, so the header keeps its length and every
    tensor its offset."""
    (hlen,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + hlen]
    header = json.loads(raw)
    meta = header.get("__metadata__")
    if not meta:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > hlen:     # the writer escaped less than json does: keep its bytes
        return data
    return data[:8] + text + b" " * (hlen - len(text)) + data[8 + hlen:]


def _header_metadata(data: bytes) -> dict:
    (hlen,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + hlen])["__metadata__"]


def unpack(data: bytes, what: str) -> dict[str, TensorDelta]:
    """Inverse of `pack`. `what` names the file in errors."""
    try:
        meta = _header_metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a ledger delta (format {meta.get('format')!r})")
        metas = json.loads(meta["tensors"])
        tensors = load(data)
        return {name: decode(name, tensors, m) for name, m in metas.items()}
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise BirdboneError(f"{what}: damaged delta file ({type(e).__name__}: {e})") from None
