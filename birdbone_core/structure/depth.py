"""Depth pruning: score decoder layers on calibration text, drop the least important, revert exactly.

Dropping whole layers makes stock llama.cpp faster in proportion (every layer costs the same), with no
custom kernel. What llama.cpp needs, verified against the llama.cpp vendored by llama-cpp-python 0.3.36
(tag b11312; paths under vendor/llama.cpp/):

- The layer count is `{arch}.block_count` (src/llama-model.cpp:1327, into hparams.n_layer_all) and the
  loader builds layers 0..n_layer-1 from the tensors `blk.%d.*` (src/llama-arch.cpp:446-450 names,
  e.g. src/models/gemma3.cpp:53 loops `for i < n_layer`); a tensor left over in the file fails the load
  ("wrong number of tensors", src/llama-model-loader.cpp:1396-1398). So dropped layers' tensors must
  be gone and the rest renumbered 0..n-1. birdbone's exporter names tensors from `model.layers.{i}` of the
  state dict and writes block_count = config.num_hidden_layers (export/arch.py model_dims,
  write_arch_metadata), so rebuilding the ModuleList and updating the config is all it takes.
- Per-layer hyperparameter arrays (feed_forward_length, head_count, head_count_kv) are read with
  `get_key_or_arr(..., n_layer_all)` (src/llama-model.cpp:1395-1404): an array must have block_count
  entries ("wrong array length", src/llama-model-loader.cpp:478). birdbone writes scalars for these,
  so there is nothing to shorten.
- Sliding-window pattern: Gemma 3 calls `load_swa_pattern(ml, 6)` (src/models/gemma3.cpp:7) only when
  `{arch}.attention.sliding_window` > 0 (gemma3.cpp:4-6). load_swa_pattern (src/llama-model.cpp:3434-3441)
  first reads `{arch}.attention.sliding_window_pattern` as a per-layer ARRAY into hparams.is_swa_impl
  (1 = sliding, src/llama-hparams.h:179-183; BOOL arrays accepted, src/llama-model-loader.cpp:367,392);
  only when the key is absent or a scalar does it fall back to the fixed rule set_swa_pattern(6)
  (src/llama-hparams.cpp:8-22: layer il is sliding iff il % 6 < 5), which after a drop would be WRONG.
  birdbone's exporter writes the array from config.layer_types[:n_layer] (export/arch.py, the gemma3
  branch of write_arch_metadata), so keeping config.layer_types equal to the kept layers' own types is
  what tells llama.cpp. The flag is used per layer for the KV cache split and mask (src/llama-kv-cache-
  iswa.cpp:58,66; src/llama-graph.cpp:2804) and the RoPE base (src/llama-model.cpp:2329-2330). With no
  sliding layer left the exporter omits sliding_window and llama.cpp builds every layer dense
  (gemma3.cpp:10-11).
- Gemma 3's query scale depends on n_layer (62 layers -> 27B rule, gemma3.cpp:18-31); the exporter's
  gemma3_query_scale_fix uses the exported n_layer, so it stays correct after a drop.
- transformers 5.24: attention modules (all archs) and Gemma 3 decoder layers carry `layer_idx`, used
  for cache slots (`cache.update(..., self.layer_idx)`); Gemma3/Qwen forwards index
  `config.layer_types[i]` by position for the mask and RoPE; DynamicCache builds per-layer slots from
  config.layer_types; PretrainedConfig.validate_layer_type requires len(layer_types) == num_hidden_layers.

Scores (higher = more important), averaged over all calibration tokens:
- angular: arccos(cos(h_in, h_out)) / pi (Gromov et al. 2024, per layer, i.e. block size 1)
- bi: 1 - cos(h_in, h_out) (ShortGPT's Block Influence)
- kl: mean KL(p_full || p_without_layer) of the next-token distributions (one full forward per layer)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import decoder_layers, text_backbone
from birdbone_core.model.walk import capture_layer_inputs, layer_out
from birdbone_core.runtime import model_device

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
METRICS = ("angular", "bi", "kl")
_LAYER_LISTS = ("layer_types", "mlp_layer_types")  # config lists with one entry per layer


# ----------------------------------------------------------------------------------------------------
# pure functions of tensors


def _cos(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """h_in, h_out [..., d_model] -> cosine similarity per token [...], in [-1, 1]. Float64: near cos = 1,
    arccos amplifies float32 rounding (1 - 6e-8 -> 3e-4) and would hide an identity layer's 0."""
    return F.cosine_similarity(h_in.double(), h_out.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token angular distance arccos(cos) / pi in [0, 1]: [..., d_model] x2 -> [...], float32."""
    return (torch.arccos(_cos(h_in, h_out)) / torch.pi).float()


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token ShortGPT Block Influence 1 - cos in [0, 2]: [..., d_model] x2 -> [...], float32."""
    return (1.0 - _cos(h_in, h_out)).float()


def kl_per_token(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(logits)) per position: [..., vocab] x2 -> [...], float32, >= 0."""
    ref_lp = torch.log_softmax(ref_logits.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------------
# architecture rules


def _gemma3_rule(layer_types: Sequence[str] | None, drop: set[int]) -> str | None:
    """Keep at least one global (full-attention) layer; kept layers keep their own type anyway."""
    if not layer_types or "full_attention" not in layer_types:
        return None
    if all(t != "full_attention" for i, t in enumerate(layer_types) if i not in drop):
        return "gemma3 must keep at least one global (full_attention) layer"
    return None


# model_type -> rule(layer_types, set of dropped indices) -> None if allowed, else the reason
ARCH_RULES: dict[str, Callable[[Sequence[str] | None, set[int]], str | None]] = {"gemma3_text": _gemma3_rule}


def check_drop(n_layers: int, drop: Sequence[int], *, model_type: str,
               layer_types: Sequence[str] | None = None, allow_ends: bool = True) -> tuple[int, ...]:
    """Validate a set of layer indices to remove; returns them sorted. Raises BirdboneError."""
    if model_type not in SUPPORTED:
        raise BirdboneError(f"depth pruning does not support model_type {model_type!r}; "
                            f"supported: {', '.join(SUPPORTED)}")
    idx = [int(i) for i in drop]
    if len(set(idx)) != len(idx):
        raise BirdboneError(f"layers to drop {idx} contain duplicates")
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise BirdboneError(f"layers to drop {bad} are out of range for a {n_layers}-layer model")
    if len(idx) >= n_layers:
        raise BirdboneError(f"dropping {len(idx)} of {n_layers} layers would leave none; keep at least one")
    if not allow_ends and ({0, n_layers - 1} & set(idx)):
        raise BirdboneError(f"dropping the first or last layer ({sorted({0, n_layers - 1} & set(idx))}) "
                            "needs allow_ends=True")
    rule = ARCH_RULES.get(model_type)
    if rule is not None and (why := rule(layer_types, set(idx))):
        raise BirdboneError(f"cannot drop layers {sorted(idx)}: {why}")
    return tuple(sorted(idx))


def plan_drop(scores: Sequence[float], n: int, *, model_type: str, layer_types: Sequence[str] | None = None,
              allow_ends: bool = False) -> tuple[int, ...]:
    """The `n` least important layers (lowest score first) that the architecture rule allows.

    scores: one per layer, higher = more important. First and last layers are never chosen unless
    allow_ends. Greedy: a candidate the rule refuses (e.g. gemma3's last global layer) is skipped.
    """
    n_layers = len(scores)
    if n < 0:
        raise BirdboneError(f"number of layers to drop must be >= 0, got {n}")
    if n >= n_layers:
        raise BirdboneError(f"dropping {n} of {n_layers} layers would leave none; keep at least one")
    if layer_types is not None and len(layer_types) != n_layers:
        raise BirdboneError(f"{len(layer_types)} layer types for {n_layers} layer scores")
    if any(not torch.isfinite(torch.tensor(float(s))) for s in scores):
        raise BirdboneError(f"layer scores must be finite, got {list(scores)}")
    check_drop(n_layers, [], model_type=model_type, layer_types=layer_types)  # the model_type check
    ends = set() if allow_ends else {0, n_layers - 1}
    rule = ARCH_RULES.get(model_type)
    chosen: set[int] = set()
    for i in sorted(range(n_layers), key=lambda j: (float(scores[j]), j)):
        if len(chosen) == n:
            break
        if i in ends or (rule is not None and rule(layer_types, chosen | {i})):
            continue
        chosen.add(i)
    if len(chosen) < n:
        raise BirdboneError(f"only {len(chosen)} of {n_layers} layers can be dropped under the rules "
                            f"({'first/last kept, ' if not allow_ends else ''}{model_type}); asked for {n}")
    return tuple(sorted(chosen))


# ----------------------------------------------------------------------------------------------------
# scoring (plumbing)


@dataclass
class LayerScores:
    angular: list[float]  # per layer, mean over calibration tokens
    bi: list[float]
    kl: list[float] | None = None  # None unless measured
    n_tokens: int = 0

    def by(self, metric: str) -> list[float]:
        if metric not in METRICS:
            raise BirdboneError(f"unknown layer importance metric {metric!r}; choose one of {', '.join(METRICS)}")
        values = getattr(self, metric)
        if values is None:
            raise BirdboneError(f"layer importance {metric!r} was not measured (layer_importance(kl=True))")
        return values


class _Skip(nn.Module):
    """Stands in for a decoder layer: the residual stream passes through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@torch.no_grad()
def layer_importance(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 4, kl: bool = False) -> LayerScores:
    """Score every decoder layer on calibration `blocks` [n_samples, seq_len] (token ids).

    angular / bi: one walk through the layers (one layer's inputs [b, seq_len, d_model] per batch held).
    kl: additionally one full forward per layer with that layer skipped; logits [b, seq_len, vocab] of
    two forwards are held at a time.
    """
    _model_type(model)
    if blocks.dim() != 2 or blocks.numel() == 0:
        raise BirdboneError(f"calibration blocks must be [n_samples, seq_len] token ids, got {tuple(blocks.shape)}")
    layers = decoder_layers(model)
    n_layers = len(layers)
    hidden, kwargs = capture_layer_inputs(model, blocks, batch_size)
    ang, bi = [0.0] * n_layers, [0.0] * n_layers
    n_tok = sum(h.shape[0] * h.shape[1] for h in hidden)
    for i, layer in enumerate(layers):
        for b, h in enumerate(hidden):
            out = layer_out(layer, h, kwargs[i][b])  # [b, seq_len, d_model]
            ang[i] += angular_distance(h, out).double().sum().item()
            bi[i] += block_influence(h, out).double().sum().item()
            hidden[b] = out
    del hidden, kwargs
    scores = LayerScores([a / n_tok for a in ang], [x / n_tok for x in bi], None, n_tok)
    if kl:
        scores.kl = skip_kl(model, blocks, batch_size=batch_size)
    return scores


@torch.no_grad()
def skip_kl(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 4) -> list[float]:
    """Mean per-token KL(full || layer i skipped) for every layer i (the layer is restored afterwards)."""
    layers = decoder_layers(model)
    device = model_device(model)
    total = [0.0] * len(layers)
    n_tok = 0
    for batch in blocks.split(batch_size):
        ids = batch.to(device)
        ref = model(input_ids=ids, use_cache=False).logits  # [b, seq_len, vocab]
        n_tok += ids.numel()
        for i in range(len(layers)):
            original = layers[i]
            layers[i] = _Skip()
            try:
                logits = model(input_ids=ids, use_cache=False).logits
            finally:
                layers[i] = original
            total[i] += kl_per_token(ref, logits).double().sum().item()
    return [t / n_tok for t in total]


# ----------------------------------------------------------------------------------------------------
# applying and reverting a drop


@dataclass
class DropRecord:
    """What apply_drop removed: enough to put it back exactly (revert_drop)."""
    removed: tuple[int, ...]  # original indices, ascending
    modules: list[nn.Module]  # the removed decoder layers themselves (weights untouched), same order
    n_layers_before: int
    layer_idx_before: list[list[tuple[nn.Module, int]]]  # per original layer: (submodule, its layer_idx)
    config_before: list[tuple[object, dict]] = field(default_factory=list)  # (config, fields it had)

    def removed_tensors(self) -> dict[str, torch.Tensor]:
        """The removed layers' parameters and buffers under their original state-dict names (relative to
        the decoder stack), e.g. `layers.2.mlp.down_proj.weight` -> [d_model, d_ff]."""
        return {f"layers.{i}.{k}": v for i, m in zip(self.removed, self.modules) for k, v in m.state_dict().items()}


def _model_type(model: nn.Module) -> str:
    mt = getattr(getattr(text_backbone(model), "config", None), "model_type", None) \
        or getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED:
        raise BirdboneError(f"depth pruning does not support model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    return mt


def _configs(model: nn.Module) -> list:
    """Every distinct config object that describes the decoder stack (has num_hidden_layers)."""
    found = []
    for c in (getattr(model, "config", None), getattr(text_backbone(model), "config", None)):
        for cand in (c, getattr(c, "text_config", None)):
            if cand is not None and hasattr(cand, "num_hidden_layers") and all(cand is not f for f in found):
                found.append(cand)
    return found


def _layer_idx_owners(layer: nn.Module) -> list[tuple[nn.Module, int]]:
    return [(m, m.layer_idx) for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def apply_drop(model: nn.Module, drop: Sequence[int], *, allow_ends: bool = True) -> DropRecord:
    """Remove decoder layers `drop` (original indices) in place, renumber the rest, update the config.

    Everything is validated before anything changes. Returns the record revert_drop needs.
    """
    model_type = _model_type(model)
    layers = decoder_layers(model)
    n_layers = len(layers)
    configs = _configs(model)
    if not configs:
        raise BirdboneError(f"{type(model).__name__}: no config with num_hidden_layers found")
    for c in configs:
        if int(c.num_hidden_layers) != n_layers:
            raise BirdboneError(f"config says {c.num_hidden_layers} layers but the model has {n_layers}")
        for name in _LAYER_LISTS:
            lst = getattr(c, name, None)
            if lst is not None and len(lst) != n_layers:
                raise BirdboneError(f"config.{name} has {len(lst)} entries for {n_layers} layers")
    layer_types = getattr(configs[0], "layer_types", None)
    removed = check_drop(n_layers, drop, model_type=model_type, layer_types=layer_types, allow_ends=allow_ends)

    record = DropRecord(removed, [layers[i] for i in removed], n_layers,
                        [_layer_idx_owners(layer) for layer in layers])
    if not removed:
        return record
    keep = [i for i in range(n_layers) if i not in set(removed)]
    for c in configs:
        before = {"num_hidden_layers": c.num_hidden_layers}
        for name in (*_LAYER_LISTS, "max_window_layers"):
            if getattr(c, name, None) is not None:
                before[name] = getattr(c, name)
        record.config_before.append((c, before))

    new_layers = nn.ModuleList([layers[i] for i in keep])
    for new_i, layer in enumerate(new_layers):
        for m, _ in _layer_idx_owners(layer):
            m.layer_idx = new_i
    text_backbone(model).layers = new_layers
    for c, before in record.config_before:
        for name in _LAYER_LISTS:
            if name in before:
                setattr(c, name, [before[name][i] for i in keep])
        if "max_window_layers" in before:  # qwen: layers at index >= max_window_layers slide (a suffix rule)
            setattr(c, "max_window_layers", sum(1 for i in keep if i < int(before["max_window_layers"])))
        c.num_hidden_layers = len(keep)
    return record


def revert_drop(model: nn.Module, record: DropRecord) -> None:
    """Put the removed layers back at their original positions and restore config and layer_idx."""
    layers = decoder_layers(model)
    n_kept = record.n_layers_before - len(record.removed)
    if len(layers) != n_kept:
        raise BirdboneError(f"model has {len(layers)} layers; the drop record expects {n_kept}")
    if not record.removed:
        return
    kept = iter(list(layers))
    removed = dict(zip(record.removed, record.modules))
    restored = nn.ModuleList([removed[i] if i in removed else next(kept) for i in range(record.n_layers_before)])
    for owners in record.layer_idx_before:
        for m, idx in owners:
            m.layer_idx = idx
    text_backbone(model).layers = restored
    for c, before in record.config_before:
        for name, value in before.items():
            setattr(c, name, value)


def drop_layers(model: nn.Module, blocks: torch.Tensor, n: int, *, metric: str = "angular", batch_size: int = 4,
                allow_ends: bool = False) -> tuple[DropRecord, LayerScores]:
    """Score the layers on `blocks`, drop the `n` least important by `metric`; returns (record, scores)."""
    if metric not in METRICS:
        raise BirdboneError(f"unknown layer importance metric {metric!r}; choose one of {', '.join(METRICS)}")
    if n < 0:
        raise BirdboneError(f"number of layers to drop must be >= 0, got {n}")
    model_type = _model_type(model)
    n_layers = len(decoder_layers(model))
    if n >= n_layers:
        raise BirdboneError(f"dropping {n} of {n_layers} layers would leave none; keep at least one")
    scores = layer_importance(model, blocks, batch_size=batch_size, kl=metric == "kl")
    configs = _configs(model)
    layer_types = getattr(configs[0], "layer_types", None) if configs else None
    drop = plan_drop(scores.by(metric), n, model_type=model_type, layer_types=layer_types, allow_ends=allow_ends)
    return apply_drop(model, drop, allow_ends=allow_ends), scores
