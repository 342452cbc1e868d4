"""Architecture-neutral layer access works the same on every supported architecture."""
from __future__ import annotations

import pytest
import torch
from tinymodels import ARCHS
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import (
    decoder_layers,
    embed_tokens,
    final_norm,
    linear_modules,
    lm_head,
    norm_weight_offset,
)
from birdbone_core.model.load import load_model

LINEARS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]


@pytest.fixture(scope="module")
def loaded(pristine_dirs):
    return {arch: load_model(str(pristine_dirs[arch])).model for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_helpers(loaded, arch):
    model = loaded[arch]
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 2
    assert layers is model.model.layers
    for layer in layers:
        lin = linear_modules(layer)
        assert list(lin) == LINEARS  # definition order == dataflow order within each block
        assert all(isinstance(m, nn.Linear) for m in lin.values())
        assert lin["mlp.down_proj"] is layer.mlp.down_proj
    emb = embed_tokens(model)
    assert isinstance(emb, nn.Embedding) and emb.num_embeddings == model.config.vocab_size
    assert final_norm(model) is model.model.norm
    head = lm_head(model)
    assert head.out_features == model.config.vocab_size
    assert (head.weight is emb.weight) == bool(model.config.tie_word_embeddings)
    assert norm_weight_offset(model) == (1.0 if arch == "gemma3_text" else 0.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_reproduce_forward(loaded, arch):
    """Hooks on decoder_layers see the same hidden states the model's own forward produces."""
    model = loaded[arch]
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for layer in decoder_layers(model)]
    try:
        with torch.no_grad():
            out = model(torch.tensor([[1, 20, 30, 40]]), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], out.hidden_states[1])
    logits = lm_head(model)(final_norm(model)(seen[-1]))
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, out.logits)


def test_unknown_layout_is_an_error():
    with pytest.raises(BirdboneError, match="cannot find the decoder layers"):
        decoder_layers(nn.Linear(2, 2))
