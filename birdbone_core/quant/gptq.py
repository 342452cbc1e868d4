"""Grid-aware GPTQ (Frantar et al. 2022) inside the exact GGUF block formats.

    gptq_quantize(W, H, qtype, settings, importance=None) -> GPTQResult(packed, W_hat, error, plain_error, ...)

W [out, in] float weights; H [in, in] = E[x x^T] over calibration inputs x [in] (the layer's output
error for a weight change dW is tr(dW H dW^T)); qtype a GGUF block format ("Q4_K", ...). Columns are
visited in blocks of `block_size` with lazy batch updates; each column is rounded to the nearest level
of its block's grid and its error, scaled by the inverse Hessian's Cholesky factor, is pushed onto
the columns not yet visited.

The grid (every block's scales / mins, i.e. all bytes but the levels) is chosen by the format's codec
from importance-weighted statistics (importance: per input column, default diag(H), like an imatrix):
- dynamic (default, columns in order): when GPTQ reaches the first column of a format block, the codec
  fits that block on the weights as updated so far, so the grid absorbs the feedback already applied;
- static (`static_scales`, and always with `act_order`): all grids are fitted on the original W first.
  Act-order permutes the visiting order (largest diag(H) first), while the blocks stay on the original
  input order, so grids must exist before any column is visited.
The levels are then written into those blocks (`grid.with_levels`), and W_hat is the decoder's output of
the returned bytes, so `gguf.quants.dequantize(packed)` gives exactly W_hat.

Devices: the column loop (float32) and the inverse Cholesky (float64) run on W's device; the codecs
(block fitting, packing) always run on the host, so the bytes a block format is built from are the
same on every device. Results are host numpy bytes and CPU tensors.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.quant import grid
from birdbone_core.quant.codecs import decode, encode_torch
from birdbone_core.quant.formats import get_format

# Weights per row chunk of one GPTQ pass (rows are independent; chunking bounds the working set).
ROW_CHUNK_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class GPTQSettings:
    block_size: int = 128  # columns per lazy batch (rounded up to whole format blocks)
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    act_order: bool = False  # visit columns by decreasing diag(H)
    static_scales: bool = False  # fit every grid on the original W before GPTQ (forced by act_order)


@dataclass
class GPTQResult:
    packed: np.ndarray  # uint8 [out, in // block * type_size]
    qtype: str
    plain_packed: np.ndarray  # the codec's own rounding (importance-weighted, no feedback), same shape
    W: torch.Tensor = field(repr=False)  # float32 [out, in], the weights quantized (a reference, not a copy)
    H: torch.Tensor = field(repr=False)  # [in, in], undamped

    # Decoded and scored on each call, not at construction: the engine scores candidates its own way
    # (Fisher-weighted), and results for many formats of a 262k-row embedding would otherwise hold GBs
    # of decoded copies and spend a 262k x 640 x 640 matmul per format on numbers nobody reads.
    @property
    def W_hat(self) -> torch.Tensor:
        """float32 [out, in], exactly what the packed bytes decode to."""
        return decode(self.qtype, self.packed, tuple(self.W.shape))

    @property
    def error(self) -> float:
        """tr(dW H dW^T) of W_hat - W."""
        return output_error(self.W_hat - self.W, self.H)

    @property
    def plain_error(self) -> float:
        """The same for the plain rounding's bytes."""
        return output_error(decode(self.qtype, self.plain_packed, tuple(self.W.shape)) - self.W, self.H)


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T) for dW [out, in], H [in, in]: the summed squared output error per input.
    float32 products, float64 sums (a float64 matmul costs 4x and changes no comparison made with it)."""
    dW = dW.float()
    return float(((dW @ H.float()) * dW).sum(dtype=torch.float64))


# The last factor, by the Hessian's bytes: q/k/v (and gate/up) share one H and are encoded one after
# another, so they factor it once. One: a big model's factors are large (8192 x 8192: 268 MB).
_FACTORS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
FACTORS_KEPT = 1


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """float32 upper Cholesky factor of (H + damp * mean(diag H) I)^-1, computed in float64."""
    key = (hashlib.blake2b(H.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest(),
           tuple(H.shape), str(H.dtype), str(H.device), damp)
    U = _FACTORS.get(key)
    if U is None:
        U = _FACTORS[key] = _factor(H, damp).to(torch.float32)
        while len(_FACTORS) > FACTORS_KEPT:
            _FACTORS.popitem(last=False)
    _FACTORS.move_to_end(key)
    return U


def _factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (float64), damping raised until it exists.
    Two [n, n] float64 temporaries at a time (an 8192-column Hessian: 0.5 GB each)."""
    H = H.double()
    mean = float(torch.diag(H).mean())
    lam = damp * mean if mean > 0 else 1e-6
    for _ in range(8):
        A = H.clone()
        A.diagonal().add_(lam)                 # H + lam * I, without an identity matrix beside it
        L, info = torch.linalg.cholesky_ex(A)
        del A
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0:
                return U
        lam = lam * 10 if lam > 0 else 1e-6
    raise BirdboneError("GPTQ: the Hessian is not positive definite even with heavy damping")


def _blocks(name: str, W: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The codec's packed blocks of W [rows, cols] -> uint8 [rows * nb, type_size], on the host."""
    fmt = get_format(name)
    packed, _ = encode_torch(name, W.cpu(), None if importance is None else importance.cpu())
    return packed.reshape(-1, fmt.type_size)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, qtype, settings: GPTQSettings = GPTQSettings(),
                  importance: torch.Tensor | None = None) -> GPTQResult:
    return gptq_quantize_many(W, H, [qtype], settings, importance)[get_format(qtype).name]


def gptq_quantize_many(W: torch.Tensor, H: torch.Tensor, qtypes, settings: GPTQSettings = GPTQSettings(),
                       importance: torch.Tensor | None = None) -> dict[str, GPTQResult]:
    """GPTQ of one W [out, in] in several formats: {type: GPTQResult}. With static grids (act_order or
    static_scales) all formats share one column pass: their rows are stacked (every row is its own
    problem under the same H, only its grid and largest level differ), so the per-column work is paid
    once for all formats, and H's inverse Cholesky factor is computed once."""
    names = [get_format(t).name for t in qtypes]
    for name in names:
        if name not in grid.TOP:
            raise BirdboneError(f"GPTQ: {name} is not a block format (use one of {', '.join(grid.TOP)})")
    W0 = torch.as_tensor(W).detach().to(torch.float32)           # [out, in], on W's device: the column loop's
    device = W0.device
    if W0.ndim != 2:
        raise BirdboneError(f"GPTQ: expected a matrix [out, in], got shape {tuple(W0.shape)}")
    rows, cols = W0.shape
    for name in names:
        bs = get_format(name).block_size
        if cols % bs:
            raise BirdboneError(f"GPTQ: rows of {cols} weights are not whole {name} blocks of {bs}")
    H0 = torch.as_tensor(H).detach().to(device=device, dtype=torch.float32)
    if H0.shape != (cols, cols) or not bool(torch.isfinite(H0).all()):
        raise BirdboneError(f"GPTQ: Hessian must be a finite [{cols}, {cols}] matrix, got {tuple(H0.shape)}")
    imp = (torch.diag(H0).clamp_min(0) if importance is None
           else torch.as_tensor(importance).to(device=device, dtype=torch.float32).reshape(-1))
    static = settings.static_scales or settings.act_order
    perm = (torch.argsort(torch.diag(H0), descending=True, stable=True) if settings.act_order
            else torch.arange(cols, device=device))
    U = _inverse_cholesky(H0[perm][:, perm], settings.damp)
    # dynamic grids are fitted per format as GPTQ goes; a table format (IQ4_NL) has its own nearest-level rule
    affine = [n for n in names if n not in grid.TABLE]
    groups = ([affine] if affine else []) + [[n] for n in names if n in grid.TABLE] if static else [[n] for n in names]
    out: dict[str, GPTQResult] = {}
    for group in groups:
        # rows are independent problems sharing H: do them in chunks to bound memory (the 262k-row embedding)
        step_rows = max(1, ROW_CHUNK_WEIGHTS // (cols * len(group)))
        packed = {n: torch.empty(rows, cols // get_format(n).block_size * get_format(n).type_size,
                                 dtype=torch.uint8) for n in group}
        plain = {n: torch.empty_like(packed[n]) for n in group}
        for r0 in range(0, rows, step_rows):
            r1 = min(rows, r0 + step_rows)
            done = _gptq_rows(group, W0[r0:r1], U, perm, imp, static, settings.block_size)
            for n, (p, pp) in done.items():
                packed[n][r0:r1], plain[n][r0:r1] = p.view(r1 - r0, -1), pp.view(r1 - r0, -1)
        for n in group:
            out[n] = GPTQResult(packed[n].numpy(), n, plain[n].numpy(), W0.cpu(), H0.cpu())
    return out


def _gptq_rows(names: list[str], W0: torch.Tensor, U: torch.Tensor, perm: torch.Tensor, imp: torch.Tensor,
               static: bool, block_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ of rows W0 [rows, cols] in each format of `names` (one format unless static), given U (upper
    Cholesky of the permuted inverse Hessian). Returns {format: (GPTQ's packed blocks, the plain codec
    rounding's packed blocks)}, each [rows * nb, type_size] on the host. The formats' copies of W are
    stacked as [len(names) * rows, cols] and go through one column loop, on W0's device."""
    rows, cols = W0.shape
    device = W0.device
    k = len(names)
    if not static and k != 1:
        raise BirdboneError("GPTQ: formats share a column pass only with static grids")
    fmts = [get_format(n) for n in names]
    bs = fmts[0].block_size  # dynamic grids: one format only
    table = names[0] if names[0] in grid.TABLE else None  # a table format runs alone
    if table is not None and k != 1:
        raise BirdboneError("GPTQ: a table format (IQ4_NL) has its own column pass")
    widest = max(f.block_size for f in fmts)
    B = max(bs, -(-block_size // widest) * widest)  # lazy-batch columns: whole blocks of every format
    # plain codec rounding: the baseline, and the static grid
    plains = [_blocks(n, W0, imp) for n in names]                              # host bytes
    heads = [p.view(rows, cols // f.block_size, -1).clone() for p, f in zip(plains, fmts)]
    step = torch.empty(k * rows, cols, device=device)
    off = torch.empty(k * rows, cols, device=device)
    if static:
        for j, (n, p) in enumerate(zip(names, plains)):
            s, o = grid.affine(n, p)                                            # host [rows * nb, bs]
            step[j * rows:(j + 1) * rows] = s.view(rows, cols).to(device)
            off[j * rows:(j + 1) * rows] = o.view(rows, cols).to(device)
    top = torch.tensor([float(grid.TOP[n]) for n in names], device=device).repeat_interleave(rows)  # [k * rows]

    # transposed ([cols, k * rows]): a column is one contiguous row, so the per-column work reads and
    # writes contiguous memory
    Wt = W0[:, perm].T.repeat(1, k).contiguous()
    step_t, off_t = step[:, perm].T.contiguous(), off[:, perm].T.contiguous()
    Qt = torch.zeros(cols, k * rows, device=device)
    with torch.inference_mode():
        for i1 in range(0, cols, B):
            i2 = min(i1 + B, cols)
            W1 = Wt[i1:i2].clone()
            E1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                c = i1 + i
                if not static and c % bs == 0:
                    # fit this format block's grid on the weights as GPTQ has updated them
                    blk = _blocks(names[0], W1[i:i + bs].T, imp[c:c + bs])      # host [rows, type_size]
                    heads[0][:, c // bs] = blk
                    s, o = grid.affine(names[0], blk)
                    step_t[c:c + bs], off_t[c:c + bs] = s.T.to(device), o.T.to(device)
                w = W1[i]
                if table is None:
                    q = grid.nearest_levels(w, step_t[c], off_t[c], top)
                    value = step_t[c] * q + off_t[c]
                else:
                    q = grid.nearest_table_levels(w, step_t[c], off_t[c], table)
                    value = step_t[c] * grid.level_values(table, q) + off_t[c]
                Qt[c] = q
                err = (w - value) / U1[i, i]
                W1[i:].addr_(U1[i, i:], err, alpha=-1)
                E1[i] = err
            if i2 < cols:
                Wt[i2:] -= U[i1:i2, i2:].T @ E1
    Q = Qt.T
    Qo = torch.empty_like(Q)
    Qo[:, perm] = Q
    out = {}
    for j, (n, f) in enumerate(zip(names, fmts)):
        nb = cols // f.block_size
        q = Qo[j * rows:(j + 1) * rows].reshape(rows * nb, f.block_size).cpu()
        out[n] = (grid.with_levels(n, heads[j].reshape(rows * nb, -1), q), plains[j])
    return out
