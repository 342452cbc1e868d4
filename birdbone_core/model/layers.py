"""Architecture-neutral access to the parts of a causal LM that pruning and export walk.

Every supported architecture (llama, mistral, qwen2, qwen3, gemma3) is laid out the same way in
transformers: `<CausalLM>.model` is the decoder backbone with `embed_tokens`, `layers` and `norm`, plus
a top-level `lm_head`. Gemma 3's multimodal wrapper nests the text backbone one level deeper
(`.model.language_model`). These helpers hide that difference so callers never probe attributes.
"""
from __future__ import annotations

from torch import nn

from birdbone_core.errors import BirdboneError

# Model types whose RMSNorm scales by (1 + weight) instead of weight. Their HF weights are zero-centred;
# llama.cpp stores them with the +1 folded in (transformers subtracts it again when reading a GGUF).
_ZERO_CENTRED_NORM_TYPES = {"gemma", "gemma2", "gemma3", "gemma3_text"}


def text_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding `embed_tokens`, `layers` and `norm`)."""
    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        # Gemma3ForConditionalGeneration: model.model is Gemma3Model, whose text part is language_model.
        candidates += [getattr(inner, "language_model", None), inner]
    candidates.append(model)  # already a bare backbone (e.g. LlamaModel)
    for cand in candidates:
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise BirdboneError(
        f"{type(model).__name__}: cannot find the decoder layers (expected `.model.layers`); "
        "this model layout is not supported"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, in execution order (pruning walks them one after another)."""
    return text_backbone(model).layers


def embed_tokens(model: nn.Module) -> nn.Embedding:
    """The input token embedding (shared with `lm_head` when the embeddings are tied)."""
    emb = getattr(text_backbone(model), "embed_tokens", None)
    if not isinstance(emb, nn.Embedding):
        raise BirdboneError(f"{type(model).__name__}: no `embed_tokens` embedding found")
    return emb


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer, before `lm_head`."""
    norm = getattr(text_backbone(model), "norm", None)
    if not isinstance(norm, nn.Module):
        raise BirdboneError(f"{type(model).__name__}: no final `norm` module found")
    return norm


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection to vocabulary logits."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise BirdboneError(f"{type(model).__name__}: no `lm_head` linear layer found")
    return head


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """All nn.Linear modules inside one decoder layer, keyed by their name relative to the layer.

    Order is definition order (q, k, v, o, then gate, up, down), which is also the order activations
    reach them within the attention and MLP blocks.
    """
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def norm_weight_offset(model: nn.Module) -> float:
    """1.0 when the model's RMSNorms compute x * (1 + weight) (Gemma family), else 0.0.

    Add it to a norm weight to get the effective scale, e.g. when writing GGUF, which stores scales.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    return 1.0 if model_type in _ZERO_CENTRED_NORM_TYPES else 0.0
