"""Per-architecture knowledge for GGUF export: llama.cpp metadata keys, tensor names, weight transforms.

What llama.cpp expects relative to a Hugging Face checkpoint (facts from llama.cpp's own converter and
model loaders, tag b11312 vendored by llama-cpp-python 0.3.36):

- llama / mistral (GGUF arch "llama"): llama.cpp applies RoPE to *adjacent* pairs of a head's
  dimensions, HF to the two halves. The converter therefore reorders the rows of q_proj and k_proj
  (and their biases) within every head: rows [0..d/2) and [d/2..d) are interleaved. transformers'
  GGUF loader undoes exactly this (`_reverse_permute_weights`). qwen2 / qwen3 / gemma3 use the
  "NEOX" (halves) layout in llama.cpp: no permutation.
- gemma3: HF's Gemma3RMSNorm multiplies by (1 + w); llama.cpp's RMSNorm multiplies by w, so every
  `*norm.weight` is stored as w + 1 (transformers' GGUF loader subtracts 1 on the way in, so
  GGUF -> HF -> GGUF round-trips). The embedding scale sqrt(hidden) is applied by llama.cpp itself.
  llama.cpp hard-codes the query scale 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 62-layer models);
  a different `query_pre_attn_scalar` is folded into attn_q_norm (RoPE is linear, so scaling the
  normed query before or after it is the same).
- tied embeddings: no output.weight; llama.cpp reuses token_embd.
- mistral's `sliding_window` has no llama.cpp "llama"-arch equivalent (llama.cpp's own converter drops
  it too): outputs agree for sequences up to the window. qwen2 with use_sliding_window is refused.
- llama.cpp builds every llama / qwen2 / qwen3 / gemma3 layer's FFN with one width (`feed_forward_length`;
  these loaders ignore per-layer arrays). Its `deci` architecture (Nemotron-NAS: llama blocks, RoPE as
  llama) builds each layer with its own width from a per-layer `feed_forward_length` array
  (src/models/deci.cpp), so a llama/mistral model whose layers were narrowed to different widths exports
  as `deci`. Other architectures' narrower layers are zero-padded to the widest: zero gate/up rows give
  act(0) * 0 = 0 and zero down_proj columns add nothing, so outputs are unchanged (and nothing is saved).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np
import torch

from birdbone_core.errors import BirdboneError


@dataclass(frozen=True)
class ArchSpec:
    name: str  # GGUF general.architecture
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp "normal" RoPE layout: interleave the two halves of every q/k head
    norm_offset: float  # added to every *norm.weight (Gemma's (1 + w) RMSNorm)
    allows_qkv_bias: bool
    per_layer_sizes: bool = False  # each layer its own FFN width and head counts (per-layer arrays)


LLAMA = ArchSpec("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True, norm_offset=0.0, allows_qkv_bias=True)
DECI = ArchSpec("deci", gguf.MODEL_ARCH.DECI, permute_qk=True, norm_offset=0.0, allows_qkv_bias=True, per_layer_sizes=True)
QWEN2 = ArchSpec("qwen2", gguf.MODEL_ARCH.QWEN2, permute_qk=False, norm_offset=0.0, allows_qkv_bias=True)
QWEN3 = ArchSpec("qwen3", gguf.MODEL_ARCH.QWEN3, permute_qk=False, norm_offset=0.0, allows_qkv_bias=True)
GEMMA3 = ArchSpec("gemma3", gguf.MODEL_ARCH.GEMMA3, permute_qk=False, norm_offset=1.0, allows_qkv_bias=False)

# HF config.model_type -> GGUF architecture
ARCHS: dict[str, ArchSpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "gemma3_text": GEMMA3,
}


def for_widths(spec: ArchSpec, dims: "Dims") -> ArchSpec:
    """The architecture llama.cpp runs this model as: `deci` for a llama model with per-layer FFN widths or
    head counts."""
    return DECI if spec is LLAMA and dims.ragged else spec


def arch_for(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is None:
        raise BirdboneError(
            f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}")
    return spec


# ----------------------------------------------------------------------------------------------------
# hyperparameters


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ff: int  # the largest FFN width; narrower (pruned) layers are zero-padded to it
    n_ff_layers: tuple[int, ...]
    n_head_layers: tuple[int, ...] = ()    # per layer (a per-layer head cut: deci); () = n_head everywhere
    n_head_kv_layers: tuple[int, ...] = ()

    @property
    def ragged(self) -> bool:
        """Layers of different FFN widths or head counts (llama.cpp's deci runs them; others zero-pad FFNs)."""
        return len(set(self.n_ff_layers)) > 1 or len(set(self.n_head_layers)) > 1 or \
            len(set(self.n_head_kv_layers)) > 1


def _cfg(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape: read off the tensors, or, for a state read from disk on access
    (birdbone_core.model.stream.ModelState), off the checkpoint's headers without reading any data."""
    own = getattr(state, "shapes", None)
    return dict(own) if own is not None else {n: tuple(t.shape) for n, t in state.items()}


def model_dims(config: Any, state: Mapping[str, torch.Tensor]) -> Dims:
    """Dimensions from the config, checked against the actual tensors (pruning may have changed them)."""
    state = shapes_of(state)
    n_layer = int(config.num_hidden_layers)
    n_embd = int(config.hidden_size)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(_cfg(config, "num_key_value_heads", n_head))
    head_dim = int(_cfg(config, "head_dim", n_embd // n_head))
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise BirdboneError("model has no model.embed_tokens.weight; cannot export it to GGUF")
    n_vocab = int(embed[0])
    n_ff_list, heads, kv_heads = [], [], []
    for il in range(n_layer):
        q = state.get(f"model.layers.{il}.self_attn.q_proj.weight")
        k = state.get(f"model.layers.{il}.self_attn.k_proj.weight")
        gate = state.get(f"model.layers.{il}.mlp.gate_proj.weight")
        if q is None or k is None or gate is None:
            raise BirdboneError(f"layer {il} lacks q_proj/k_proj/gate_proj weights; cannot export it to GGUF")
        h, kv = q[0] // head_dim, k[0] // head_dim
        if q[0] % head_dim or k[0] % head_dim or h * n_head_kv != kv * n_head or h > n_head:
            raise BirdboneError(
                f"layer {il}: q_proj/k_proj have {q[0]}/{k[0]} rows but the config says "
                f"{n_head}x{head_dim}/{n_head_kv}x{head_dim} (a layer may only keep fewer whole KV groups)")
        n_ff_list.append(int(gate[0]))
        heads.append(int(h))
        kv_heads.append(int(kv))
    per_head = (tuple(heads), tuple(kv_heads)) if len(set(kv_heads)) > 1 else ((), ())
    if not per_head[0] and heads[0] != n_head:
        raise BirdboneError(f"q_proj has {heads[0]} heads of {head_dim} in every layer but the config says {n_head}")
    return Dims(n_layer, n_embd, n_head, n_head_kv, head_dim, n_vocab, max(n_ff_list), tuple(n_ff_list), *per_head)


def _rope_params(config: Any) -> tuple[dict, dict | None]:
    """(global rope parameters, sliding-window-layer rope parameters or None) from transformers 5 configs."""
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        swa = rp.get("sliding_attention")
        return dict(rp.get("full_attention") or {}), (dict(swa) if swa is not None else None)
    rp = dict(rp)
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    return rp, None


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp reads from `rope_freqs.weight` for Llama 3 style RoPE scaling.

    Llama 3 keeps high frequencies (wavelength < original_ctx / high_freq_factor), divides low ones
    (wavelength > original_ctx / low_freq_factor) by `factor`, and blends linearly in between.
    """
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    lo = float(rope.get("low_freq_factor", 1.0))
    hi = float(rope.get("high_freq_factor", 4.0))
    orig = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < orig / hi, 1.0, np.where(wavelen > orig / lo, factor, blended))
    return out.astype(np.float32)


def write_arch_metadata(writer: gguf.GGUFWriter, spec: ArchSpec, config: Any, dims: Dims) -> dict[str, np.ndarray]:
    """Write the `{arch}.*` hyperparameters; returns extra generated tensors (e.g. rope_freqs)."""
    w = writer
    w.add_context_length(int(_cfg(config, "max_position_embeddings", 4096)))
    w.add_embedding_length(dims.n_embd)
    w.add_block_count(dims.n_layer)
    w.add_feed_forward_length(list(dims.n_ff_layers) if spec.per_layer_sizes else dims.n_ff)
    w.add_head_count(list(dims.n_head_layers) if spec.per_layer_sizes and dims.n_head_layers else dims.n_head)
    w.add_head_count_kv(list(dims.n_head_kv_layers) if spec.per_layer_sizes and dims.n_head_kv_layers else dims.n_head_kv)
    w.add_key_length(dims.head_dim)
    w.add_value_length(dims.head_dim)
    w.add_rope_dimension_count(dims.head_dim)
    w.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", 1e-6)))
    w.add_vocab_size(dims.n_vocab)

    if getattr(config, "partial_rotary_factor", None) not in (None, 1, 1.0):
        raise BirdboneError(f"partial_rotary_factor={config.partial_rotary_factor} is not supported by GGUF export")
    rope, rope_swa = _rope_params(config)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    extra: dict[str, np.ndarray] = {}
    rope_type = (rope.get("rope_type") or "default").lower()
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "llama3" and spec in (LLAMA, DECI):
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(rope, dims.head_dim)
    elif rope_type != "default":
        raise BirdboneError(f"RoPE type {rope_type!r} is not supported by GGUF export of {spec.name} "
                            "(supported: default, linear, llama3 for llama)")

    if spec is QWEN2 and getattr(config, "use_sliding_window", False):
        raise BirdboneError("qwen2 with use_sliding_window=True has no llama.cpp equivalent")

    if spec is GEMMA3:
        if getattr(config, "attn_logit_softcapping", None):
            raise BirdboneError("gemma3 with attn_logit_softcapping is not supported by llama.cpp")
        if getattr(config, "use_bidirectional_attention", False):
            raise BirdboneError("gemma3 with bidirectional attention (embedding model) is not a causal LM")
        if (cap := getattr(config, "final_logit_softcapping", None)):
            w.add_final_logit_softcapping(float(cap))
        layer_types = list(getattr(config, "layer_types", None) or [])
        if getattr(config, "sliding_window", None) and "sliding_attention" in layer_types:
            w.add_sliding_window(int(config.sliding_window))
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types[: dims.n_layer]])
            if rope_swa is not None:
                w.add_rope_freq_base_swa(float(rope_swa.get("rope_theta", 10000.0)))
                if (rope_swa.get("rope_type") or "default") != "default":
                    raise BirdboneError("gemma3: RoPE scaling on sliding-window layers is not supported")
    return extra


def gemma3_query_scale_fix(config: Any, dims: Dims) -> float:
    """Factor folded into attn_q_norm so llama.cpp's hard-coded query scale equals HF's."""
    llama_cpp_scale = 1.0 / math.sqrt(dims.n_embd / dims.n_head if dims.n_layer == 62 else dims.head_dim)
    hf_scale = float(_cfg(config, "query_pre_attn_scalar", dims.head_dim)) ** -0.5
    return hf_scale / llama_cpp_scale


# ----------------------------------------------------------------------------------------------------
# tensors


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from HF's half-split RoPE layout to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_rope: llama.cpp's interleaved rows back to HF's half-split layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_hf_layout(spec: "ArchSpec", dims: "Dims", hf_name: str, a: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    """A 2-D tensor in GGUF layout (as a TensorPlan loads it) back to the HF parameter's layout and shape:
    undo the q/k RoPE row permutation and the FFN zero padding."""
    if spec.permute_qk and (".self_attn.q_proj." in hf_name or ".self_attn.k_proj." in hf_name):
        a = unpermute_for_rope(a, a.shape[0] // dims.head_dim)     # this layer's heads (a per-layer cut)
    return np.ascontiguousarray(a[: hf_shape[0], : hf_shape[1]])


@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str  # "" for generated tensors
    shape: tuple[int, ...]  # numpy (row-major) shape, rows x row length
    load: Callable[[], np.ndarray]  # float32, transformed for llama.cpp
    note: str = ""  # e.g. zero-padding applied


def is_tied(model: torch.nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None:
        return True
    if out.weight is inp.weight:
        return True
    if out.weight.is_meta or inp.weight.is_meta:     # a streamed model: no data to compare (every data_ptr is 0)
        return False
    if out.weight.data_ptr() == inp.weight.data_ptr():
        return True
    return bool(getattr(model.config, "tie_word_embeddings", False)) and torch.equal(out.weight, inp.weight)


def plan_tensors(model: torch.nn.Module, spec: ArchSpec, dims: Dims, config: Any,
                 state: Mapping[str, torch.Tensor]) -> list[TensorPlan]:
    """Map every HF tensor to its GGUF name and a loader that applies llama.cpp's expected transform (the
    loader reads `state` when called, so a state read from disk holds one tensor at a time)."""
    spec = for_widths(spec, dims)
    name_map = gguf.get_tensor_name_map(spec.arch, dims.n_layer)
    tied = is_tied(model)
    q_scale = gemma3_query_scale_fix(config, dims) if spec is GEMMA3 else 1.0
    plans: list[TensorPlan] = []
    for hf_name, shape in shapes_of(state).items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith(("rotary_emb.inv_freq", ".original_inv_freq")):
            continue
        if (".q_proj.bias" in hf_name or ".k_proj.bias" in hf_name or ".v_proj.bias" in hf_name) \
                and not spec.allows_qkv_bias:
            raise BirdboneError(f"{hf_name}: llama.cpp's {spec.name} has no attention biases")
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise BirdboneError(f"no GGUF name for tensor {hf_name!r} of a {spec.name} model")

        pad_rows, pad_cols = 0, 0
        if spec.per_layer_sizes:
            pass
        elif ".mlp.gate_proj." in hf_name or ".mlp.up_proj." in hf_name:
            pad_rows = dims.n_ff - shape[0]
        elif ".mlp.down_proj.weight" in hf_name:
            pad_cols = dims.n_ff - shape[1]
        note = f"zero-padded FFN {dims.n_ff - pad_rows - pad_cols} -> {dims.n_ff}" if pad_rows or pad_cols else ""
        shape = (shape[0] + pad_rows, *shape[1:-1], shape[-1] + pad_cols) if len(shape) > 1 else (shape[0] + pad_rows,)

        def load(hf: str = hf_name, gn: str = gguf_name, pr: int = pad_rows, pc: int = pad_cols) -> np.ndarray:
            a = state[hf].detach().to(device="cpu", dtype=torch.float32).numpy()
            if pr or pc:
                a = np.pad(a, [(0, pr)] + [(0, 0)] * (a.ndim - 2) + [(0, pc)] if a.ndim > 1 else [(0, pr)])
            if spec.permute_qk and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
                a = permute_for_rope(a, a.shape[0] // dims.head_dim)   # this layer's heads (a per-layer cut)
            if spec.norm_offset and hf.endswith("norm.weight"):
                a = a + np.float32(spec.norm_offset)
            if q_scale != 1.0 and gn.endswith("attn_q_norm.weight"):
                a = a * np.float32(q_scale)
            return np.ascontiguousarray(a, dtype=np.float32)

        plans.append(TensorPlan(gguf_name, hf_name, shape, load, note))
    return plans
