"""Width pruning: remove whole FFN neurons and whole GQA head groups, uniformly across layers.

Why uniform. llama.cpp tag b11312 (vendored by llama-cpp-python 0.3.36) *reads* per-layer arrays for
`feed_forward_length`, `attention.head_count` and `attention.head_count_kv` (src/llama-model.cpp:1395-1404),
but the llama / qwen2 / qwen3 / gemma3 loaders and graphs use layer 0's values for every layer:
`LLAMA_LOAD_LOCALS` sets n_head, n_head_kv, n_embd_k_gqa, n_ff from `hparams.n_head()` etc.
(src/llama-model.h:864-871), whose argument defaults to il = 0 (src/llama-hparams.h:405,407,409); every
layer's tensors are created with those sizes (src/models/llama.cpp:53-54,70-72; qwen2.cpp:38-39,43-45;
qwen3.cpp:36-37,43-45; gemma3.cpp:58-59,66-68), so a layer of another width fails to load ("tensor ... has
wrong shape", src/llama-model-loader.cpp:917); the graph context also takes layer 0's n_head / n_head_kv
(src/llama-graph.cpp:1470-1471) for every layer's build_qkv (e.g. src/models/llama.cpp:143-144). So every layer
of those keeps the same number of neurons and of head groups; llama-family models may instead keep their own
per layer (`per_layer`), exported as llama.cpp's `deci`, whose graph reads every layer's sizes.

qwen2: llama.cpp builds attn_q and attn_output as n_embd x n_embd (src/models/qwen2.cpp:38-39), i.e. it
requires n_head * head_dim == hidden_size: head pruning is refused for qwen2, FFN pruning is allowed.

Block sizes. A GGUF row is a tensor's input dimension: ffn_down rows hold `intermediate_size` weights and
attn_output rows `n_head * head_dim`; q/k/v/gate/up rows hold hidden_size (unchanged). Those two widths must
be multiples of `multiple` (default 32: Q4_0/Q5_0/Q8_0/IQ4_NL blocks; use 256 for K-quants), else export
falls back to F16 for them and the quantizer cannot give them that type (birdbone_core.quant.formats.can_apply).

Importance: structure.width_scores.

`prune_width` records exactly what it removed (indices in the original numbering, original sizes and the
removed weight slices): `restore_width` rebuilds the original model bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import decoder_layers
from birdbone_core.structure.width_scores import SUPPORTED, Dims, model_dims, width_scores

# model types llama.cpp can run with a different FFN width and KV head count in every layer: as its `deci`
# architecture (llama blocks with per-layer feed_forward_length, head_count and head_count_kv, read per layer
# by src/models/deci.cpp; birdbone_core.export.arch)
PER_LAYER_FFN = ("llama", "mistral")
FFN_MODULES = (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1))  # (name, sliced dim: 0 rows, 1 columns)
ATTN_MODULES = (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1))


# ----------------------------------------------------------------------------------------------------
# planning: pure functions of sizes and scores


def _check_ratio(name: str, ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise BirdboneError(f"{name}={ratio}: the share to remove must be in [0, 1)")


def ffn_keep_count(n_ff: int, ratio: float, multiple: int = 32) -> int:
    """Neurons kept per layer: (1 - ratio) * n_ff rounded to the nearest multiple of `multiple`."""
    _check_ratio("ffn", ratio)
    if ratio == 0:
        return n_ff
    keep = multiple * round((1.0 - ratio) * n_ff / multiple)
    if keep <= 0:
        raise BirdboneError(f"ffn={ratio} would remove every one of the {n_ff} FFN neurons (widths are rounded "
                            f"to multiples of {multiple}); use a smaller ratio")
    if keep >= n_ff:
        raise BirdboneError(f"ffn={ratio} removes no FFN neuron: {n_ff} rounded to a multiple of {multiple} "
                            f"stays {n_ff}; the smallest step is {multiple / n_ff:.3f}")
    return keep


def ffn_keep_counts(scores: torch.Tensor, ratio: float, multiple: int = 32) -> list[int]:
    """Neurons kept in each layer when the share `ratio` of all FFN neurons goes by one ranking over every
    layer: the top (1 - ratio) of all scores [n_layer, n_ff], each layer's count rounded to a multiple of
    `multiple`, at least one multiple and at most n_ff."""
    _check_ratio("ffn", ratio)
    n_layer, n_ff = scores.shape
    total = round((1.0 - ratio) * scores.numel())
    if total < 1:
        raise BirdboneError(f"ffn={ratio} would remove every FFN neuron")
    threshold = scores.flatten().topk(total).values.min()
    counts = (scores >= threshold).sum(dim=1).tolist()
    return [int(min(n_ff, max(multiple, multiple * round(c / multiple)))) for c in counts]


def kv_keep_count(d: Dims, ratio: float, multiple: int = 32) -> int:
    """KV groups kept per layer: (1 - ratio) * n_kv rounded to a whole group; each group keeps its query
    heads, so n_head/n_kv is unchanged. attn_output rows (kept heads * head_dim) must fit `multiple`."""
    _check_ratio("heads", ratio)
    if ratio == 0:
        return d.n_kv
    keep = round((1.0 - ratio) * d.n_kv)
    if keep <= 0:
        raise BirdboneError(f"heads={ratio} would remove every one of the {d.n_kv} KV head groups; "
                            "use a smaller ratio")
    if keep >= d.n_kv:
        raise BirdboneError(f"heads={ratio} removes no head: whole KV groups go ({d.n_kv} groups of {d.group} "
                            f"query heads), the smallest step is {1 / d.n_kv:.3f}")
    width = keep * d.group * d.head_dim
    if width % multiple:
        raise BirdboneError(f"heads={ratio} leaves attn_output rows of {width} ({keep * d.group} heads x "
                            f"{d.head_dim}), not a multiple of {multiple}")
    return keep


def kv_keep_counts(scores: torch.Tensor, ratio: float, d: Dims, multiple: int = 32) -> list[int]:
    """KV groups kept in each layer when the share `ratio` of all groups goes by one ranking over every layer
    (scores [n_layer, n_kv]): at least one group per layer (attention stays), whole groups with their query
    heads; each layer's attn_output rows (groups * group * head_dim) must fit `multiple`."""
    _check_ratio("heads", ratio)
    total = round((1.0 - ratio) * scores.numel())
    if total < scores.shape[0]:
        raise BirdboneError(f"heads={ratio} would leave a layer without attention: every layer keeps one of its "
                            f"{d.n_kv} KV groups at least")
    ranked = scores.clone().float()
    ranked[torch.arange(scores.shape[0]), scores.argmax(dim=1)] = float("inf")   # each layer's best stays
    picked = ranked.flatten().topk(total).indices // scores.shape[1]
    counts = torch.bincount(picked, minlength=scores.shape[0]).tolist()
    for c in set(counts):
        if c * d.group * d.head_dim % multiple:
            raise BirdboneError(f"heads={ratio} leaves attn_output rows of {c * d.group * d.head_dim} in a layer, "
                                f"not a multiple of {multiple}")
    return counts


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [n_layer, n_units] -> kept indices [n_layer, keep], the `keep` highest per layer, ascending
    (ties: the lower index wins)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=1).values


def head_rows(kv_keep: torch.Tensor, group: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept KV heads [k] -> (q_proj rows [k * group * head_dim], k/v_proj rows [k * head_dim]), ascending.
    Query head h uses KV head h // group (transformers' repeat_kv, llama.cpp's GQA broadcast)."""
    q_heads = (kv_keep[:, None] * group + torch.arange(group)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    kv_rows = (kv_keep[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return q_rows, kv_rows


# ----------------------------------------------------------------------------------------------------
# applying and reverting


@dataclass
class SliceRecord:
    """One nn.Linear narrowed along `dim` (0: output rows, 1: input columns)."""
    module: str  # full module name, e.g. "model.layers.3.mlp.down_proj"
    dim: int
    size: int  # original size along dim
    removed: torch.Tensor  # [n_removed] original indices, ascending
    weight: torch.Tensor  # the removed slice of the weight (CPU): [n_removed, in] or [out, n_removed]
    bias: torch.Tensor | None = None  # removed bias entries [n_removed] (dim 0 only)


@dataclass
class WidthRecord:
    """What a width cut removed, in the original numbering; enough to undo it (`restore_width`)."""
    original: dict[str, int]  # intermediate_size, num_attention_heads, num_key_value_heads, head_dim
    pruned: dict[str, int]
    ffn_removed: list[list[int]] = field(default_factory=list)  # per layer: neuron indices
    kv_heads_removed: list[list[int]] = field(default_factory=list)  # per layer: KV head indices
    q_heads_removed: list[list[int]] = field(default_factory=list)  # per layer: query head indices
    slices: list[SliceRecord] = field(default_factory=list)


def slice_linear(module: nn.Linear, dim: int, keep: torch.Tensor, name: str = "") -> SliceRecord:
    """Keep only indices `keep` (ascending) of `module` along dim, in place; returns what went."""
    w = module.weight.data  # [out, in]
    size = w.shape[dim]
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    removed = mask.nonzero().flatten()
    k, r = keep.to(w.device), removed.to(w.device)
    rec = SliceRecord(name, dim, size, removed, w.index_select(dim, r).cpu())
    module.weight = nn.Parameter(w.index_select(dim, k), requires_grad=module.weight.requires_grad)
    if dim == 0:
        module.out_features = len(keep)
        if module.bias is not None:
            rec.bias = module.bias.data[r].cpu()
            module.bias = nn.Parameter(module.bias.data[k], requires_grad=module.bias.requires_grad)
    else:
        module.in_features = len(keep)
    return rec


def _unslice_linear(module: nn.Linear, rec: SliceRecord) -> None:
    w = module.weight.data
    kept = torch.ones(rec.size, dtype=torch.bool)
    kept[rec.removed] = False
    kept = kept.nonzero().flatten().to(w.device)
    if w.shape[rec.dim] != len(kept):
        raise BirdboneError(f"{rec.module}: has {w.shape[rec.dim]} along dim {rec.dim}, the record kept {len(kept)}")
    shape = list(w.shape)
    shape[rec.dim] = rec.size
    full = w.new_empty(shape)
    full.index_copy_(rec.dim, kept, w)
    full.index_copy_(rec.dim, rec.removed.to(w.device), rec.weight.to(w))
    module.weight = nn.Parameter(full, requires_grad=module.weight.requires_grad)
    if rec.dim == 0:
        module.out_features = rec.size
        if module.bias is not None and rec.bias is not None:
            b = module.bias.data.new_empty(rec.size)
            b[kept] = module.bias.data
            b[rec.removed.to(b.device)] = rec.bias.to(b)
            module.bias = nn.Parameter(b, requires_grad=module.bias.requires_grad)
    else:
        module.in_features = rec.size


def _set_config(model: nn.Module, widths: dict) -> None:
    widths = dict(widths)
    per_layer = widths.pop("ffn_widths", None)   # llama-family per-layer FFN widths (the config's own: the widest)
    kv_heads = widths.pop("kv_heads", None)      # llama-family per-layer KV groups (the config's own: the most)
    for key, value in widths.items():
        setattr(model.config, key, value)
    for attr, value in (("birdbone_ffn_widths", per_layer), ("birdbone_kv_heads", kv_heads)):
        if value:
            setattr(model.config, attr, list(value))
        elif hasattr(model.config, attr):
            delattr(model.config, attr)
    for i, layer in enumerate(decoder_layers(model)):
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = per_layer[i] if per_layer else widths["intermediate_size"]


def current_widths(model: nn.Module) -> dict:
    """The config's widths, with `ffn_widths` when the layers' FFN widths differ (as a WidthRecord holds them)."""
    c = model.config
    out = {"intermediate_size": int(c.intermediate_size), "num_attention_heads": int(c.num_attention_heads),
           "num_key_value_heads": int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
           "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)}
    layers = decoder_layers(model)
    ffn = [layer.mlp.gate_proj.out_features for layer in layers]
    kv = [layer.self_attn.k_proj.out_features // out["head_dim"] for layer in layers]
    return {**out, **({"ffn_widths": ffn} if len(set(ffn)) > 1 else {}), **({"kv_heads": kv} if len(set(kv)) > 1 else {})}


def _widths(d: Dims) -> dict[str, int]:
    return {"intermediate_size": d.n_ff, "num_attention_heads": d.n_head, "num_key_value_heads": d.n_kv,
            "head_dim": d.head_dim}


def _ragged(keep, n: int, n_layer: int, what: str, model_type: str) -> tuple[torch.Tensor | list, list[int] | None]:
    """A list of kept indices per layer: (as a [n_layer, k] tensor when every layer keeps as many, else the
    list, its lengths); checked to be 1-D, ascending, within 0..n-1, one per layer."""
    if len(keep) != n_layer:
        raise BirdboneError(f"{len(keep)} rows of kept {what} for {n_layer} layers")
    for k in keep:
        if k.ndim != 1 or len(k) < 1 or k.min() < 0 or k.max() >= n or (k.diff() <= 0).any():
            raise BirdboneError(f"kept {what} must be 1-D, ascending, within 0..{n - 1}")
    lengths = [len(k) for k in keep]
    if len(set(lengths)) == 1:
        return torch.stack(list(keep)), None
    if model_type not in PER_LAYER_FFN:
        raise BirdboneError(f"{model_type}: llama.cpp builds every layer of this architecture with layer 0's sizes; "
                            f"per-layer widths are for llama-family models ({', '.join(PER_LAYER_FFN)}; exported as "
                            "llama.cpp's deci)")
    return list(keep), lengths


@torch.no_grad()
def apply_width(model: nn.Module, ffn_keep: torch.Tensor | list[torch.Tensor] | None = None,
                kv_keep: torch.Tensor | list[torch.Tensor] | None = None) -> WidthRecord:
    """Slice every layer in place. ffn_keep [n_layer, k_ff] kept neurons, kv_keep [n_layer, k_kv] kept KV
    heads (None: that part untouched); each row ascending. Either may instead be one 1-D tensor per layer, of
    any lengths: per-layer widths, llama/mistral only (llama.cpp's deci)."""
    d = model_dims(model)
    names = {m: n for n, m in model.named_modules()}
    layers = decoder_layers(model)
    mt = model.config.model_type
    ragged_ff = ragged_kv = None
    if isinstance(ffn_keep, (list, tuple)):
        ffn_keep, ragged_ff = _ragged(ffn_keep, d.n_ff, d.n_layer, "FFN neurons", mt)
    if isinstance(kv_keep, (list, tuple)):
        kv_keep, ragged_kv = _ragged(kv_keep, d.n_kv, d.n_layer, "KV heads", mt)
    if kv_keep is not None and not SUPPORTED[mt]:
        raise BirdboneError(f"{mt}: llama.cpp needs num_attention_heads * head_dim == "
                            "hidden_size for this architecture; its heads cannot be pruned")
    for keep, n in ((None if ragged_ff else ffn_keep, d.n_ff), (None if ragged_kv else kv_keep, d.n_kv)):
        if keep is not None and (keep.shape[0] != d.n_layer or keep.shape[1] < 1 or keep.min() < 0
                                 or keep.max() >= n or (keep.diff(dim=1) <= 0).any()):
            raise BirdboneError(f"kept indices {tuple(keep.shape)} must be [{d.n_layer}, 1..{n}], ascending, < {n}")
    n_ff_new = d.n_ff if ffn_keep is None else (max(ragged_ff) if ragged_ff else ffn_keep.shape[1])
    n_kv_new = d.n_kv if kv_keep is None else (max(ragged_kv) if ragged_kv else kv_keep.shape[1])
    new = Dims(d.n_layer, n_ff_new, n_kv_new * d.group, n_kv_new, d.head_dim)
    rec = WidthRecord(original=_widths(d), pruned={**_widths(new), **({"ffn_widths": ragged_ff} if ragged_ff else {}),
                                                   **({"kv_heads": ragged_kv} if ragged_kv else {})})
    for i, layer in enumerate(layers):
        if ffn_keep is not None:
            for attr, dim in FFN_MODULES:
                mod = getattr(layer.mlp, attr)
                rec.slices.append(slice_linear(mod, dim, ffn_keep[i].cpu(), names[mod]))
            rec.ffn_removed.append(rec.slices[-1].removed.tolist())
        if kv_keep is not None:
            keep = kv_keep[i].cpu()
            q_rows, kv_rows = head_rows(keep, d.group, d.head_dim)
            for attr, dim in ATTN_MODULES:
                mod = getattr(layer.self_attn, attr)
                rows = kv_rows if attr in ("k_proj", "v_proj") else q_rows
                rec.slices.append(slice_linear(mod, dim, rows, names[mod]))
            kept_q = (keep[:, None] * d.group + torch.arange(d.group)).flatten()
            rec.kv_heads_removed.append(sorted(set(range(d.n_kv)) - set(keep.tolist())))
            rec.q_heads_removed.append(sorted(set(range(d.n_head)) - set(kept_q.tolist())))
    _set_config(model, rec.pruned)
    return rec


@torch.no_grad()
def restore_width(model: nn.Module, record: WidthRecord) -> None:
    """Undo `apply_width`/`prune_width` on the pruned model, in place: original shapes, weights and config."""
    if current_widths(model) != record.pruned:
        raise BirdboneError(f"model widths {current_widths(model)} are not the record's {record.pruned}")
    modules = dict(model.named_modules())
    for rec in reversed(record.slices):
        _unslice_linear(modules[rec.module], rec)
    _set_config(model, record.original)


# ----------------------------------------------------------------------------------------------------
# one call


@dataclass
class WidthReport:
    record: WidthRecord
    params_before: int
    params_after: int
    ffn_scores: torch.Tensor | None  # [n_layer, n_ff], original numbering
    group_scores: torch.Tensor | None  # [n_layer, n_kv]
    seconds: float = 0.0


def prune_width(model: nn.Module, blocks: torch.Tensor, *, ffn: float = 0.0, heads: float = 0.0,
                multiple: int = 32, batch_size: int = 4, per_layer: bool = False) -> WidthReport:
    """Remove the share `ffn` of FFN neurons and `heads` of KV head groups (with their query heads) in
    every layer, the least important by calibration on blocks [n_samples, seq_len]; in place. per_layer:
    the shares of all FFN neurons and of all KV groups, each by one ranking over every layer, so layers keep
    different widths and head counts (llama-family only, exported as llama.cpp's deci; see PER_LAYER_FFN). All checks run before anything changes; the returned record
    undoes it (`restore_width`)."""
    t0 = time.perf_counter()
    if multiple < 1:
        raise BirdboneError(f"multiple={multiple}: must be a positive number of weights")
    if per_layer and model.config.model_type not in PER_LAYER_FFN:
        raise BirdboneError(f"per-layer widths: llama.cpp builds every {model.config.model_type} layer with "
                            f"layer 0's sizes; only llama-family models ({', '.join(PER_LAYER_FFN)}) take them "
                            "(as llama.cpp's deci architecture)")
    d = model_dims(model)
    if heads > 0 and not SUPPORTED[model.config.model_type]:
        raise BirdboneError(f"heads={heads}: {model.config.model_type} attention heads cannot be pruned (llama.cpp "
                            "builds its attn_q/attn_output as hidden x hidden); prune its FFN only")
    k_ff = ffn_keep_count(d.n_ff, ffn, multiple)
    # per layer, the ranking spans every layer's groups (kv_keep_counts): score them whenever heads go
    k_kv = d.n_kv - 1 if per_layer and heads > 0 else kv_keep_count(d, heads, multiple)
    before = sum(p.numel() for p in model.parameters())
    f_scores = g_scores = None
    if k_ff < d.n_ff or k_kv < d.n_kv:
        f_scores, g_scores = width_scores(model, blocks, batch_size=batch_size, ffn=k_ff < d.n_ff,
                                          heads=k_kv < d.n_kv)
    ffn_keep = top_units(f_scores, k_ff) if f_scores is not None else torch.arange(d.n_ff).expand(d.n_layer, -1)
    if per_layer and f_scores is not None:
        counts = ffn_keep_counts(f_scores, ffn, multiple)
        ffn_keep = [top_units(f_scores[i:i + 1], c)[0] for i, c in enumerate(counts)]
    kv_keep = top_units(g_scores, k_kv) if g_scores is not None else torch.arange(d.n_kv).expand(d.n_layer, -1)
    if per_layer and g_scores is not None:
        counts = kv_keep_counts(g_scores, heads, d, multiple)
        kv_keep = [top_units(g_scores[i:i + 1], c)[0] for i, c in enumerate(counts)]
    record = apply_width(model, ffn_keep, kv_keep if SUPPORTED[model.config.model_type] else None)
    after = sum(p.numel() for p in model.parameters())
    return WidthReport(record, before, after, f_scores, g_scores, time.perf_counter() - t0)
