"""What width pruning scores (structure.width): a model's widths (uniform across layers) and the importance of
each FFN neuron and KV head group, from one pass of the dense model over calibration blocks.

Importance (calibration, dense model, one pass). FFN neuron j: ||h_j|| * ||W_down[:, j]||, where h_j =
act(gate_j x) * up_j x over all calibration tokens; that product is exactly the L2 (Frobenius) norm of the
neuron's contribution to the MLP output, i.e. the error removing it alone causes. Minitron's mean |h_j|
ignores the down_proj column's scale; the L2 form measures the output that is actually lost. KV group g (one
KV head with its query heads): ||A_g W_o[:, g]^T||_F, the norm of the group's share of o_proj's output
(A_g: the group's heads' attention outputs before o_proj), which again is what removing it loses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import decoder_layers, text_backbone
from birdbone_core.runtime import model_device

# HF model_type -> whether llama.cpp can take pruned attention heads for it (see module doc)
SUPPORTED: dict[str, bool] = {"llama": True, "mistral": True, "qwen2": False, "qwen3": True, "gemma3_text": True}


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_ff: int
    n_head: int
    n_kv: int
    head_dim: int

    @property
    def group(self) -> int:  # query heads per KV head
        return self.n_head // self.n_kv


def model_dims(model: nn.Module) -> Dims:
    """The model's widths, checked to be the same in every layer (uniform widths are the starting point)."""
    c = model.config
    if c.model_type not in SUPPORTED:
        raise BirdboneError(f"width pruning does not support model_type {c.model_type!r}; supported: "
                            f"{', '.join(SUPPORTED)}")
    n_head = int(c.num_attention_heads)
    n_kv = int(getattr(c, "num_key_value_heads", None) or n_head)
    d = Dims(int(c.num_hidden_layers), int(c.intermediate_size), n_head, n_kv,
             int(getattr(c, "head_dim", None) or c.hidden_size // n_head))
    for i, layer in enumerate(decoder_layers(model)):
        q, gate = layer.self_attn.q_proj.out_features, layer.mlp.gate_proj.out_features
        if q != d.n_head * d.head_dim or layer.self_attn.k_proj.out_features != d.n_kv * d.head_dim or gate != d.n_ff:
            raise BirdboneError(f"layer {i}: q_proj/gate_proj have {q}/{gate} rows, the config says "
                                f"{d.n_head}x{d.head_dim}/{d.n_ff}; width pruning needs uniform layers")
    return d




@torch.no_grad()
def width_scores(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 4, ffn: bool = True,
                 heads: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(FFN neuron scores [n_layer, n_ff], KV group scores [n_layer, n_kv]) from the dense model run on
    blocks [n_samples, seq_len] (see module doc); float64 on the CPU."""
    d = model_dims(model)
    layers = decoder_layers(model)
    device = model_device(model)
    ffn_sq = torch.zeros(d.n_layer, d.n_ff, dtype=torch.float64, device=device)  # sum_t h_j(t)^2
    grp_sq = torch.zeros(d.n_layer, d.n_kv, dtype=torch.float64, device=device)  # sum_t ||y_g(t)||^2
    gw = d.group * d.head_dim  # o_proj input columns per KV group

    def down_hook(i: int):
        def hook(mod, args):
            h = args[0].reshape(-1, d.n_ff)  # [tokens, n_ff] = act(gate(x)) * up(x)
            ffn_sq[i] += h.double().pow(2).sum(0)
        return hook

    def o_hook(i: int):
        def hook(mod, args):
            a = args[0].reshape(-1, d.n_head * d.head_dim).float()  # [tokens, n_head*head_dim], head-major
            w = mod.weight.float()  # [hidden, n_head*head_dim]
            for g in range(d.n_kv):
                y = a[:, g * gw:(g + 1) * gw] @ w[:, g * gw:(g + 1) * gw].T  # [tokens, hidden]: group g's share
                grp_sq[i, g] += y.double().pow(2).sum()
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            if ffn:
                handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
            if heads:
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
        backbone = text_backbone(model)
        for batch in blocks.split(batch_size):
            backbone(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    down_norm = torch.stack([layer.mlp.down_proj.weight.detach().double().norm(dim=0) for layer in layers])
    ffn_scores = (ffn_sq.sqrt() * down_norm).cpu() if ffn else None  # [n_layer, n_ff]
    return ffn_scores, (grp_sq.sqrt().cpu() if heads else None)
