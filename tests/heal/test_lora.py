"""LoRA / QLoRA healing: adapters merge into fp32 weights with the mask re-applied; QLoRA trains on a
real nf4 base."""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
from torch import nn

from birdbone_core.heal import Heal, heal
from birdbone_core.heal.blockwise import heal_block
from birdbone_core.heal.config import Lora
from birdbone_core.heal.lora import LoraSession, select_targets
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.model.walk import capture_layer_inputs, layer_out


def _block_case(model, calib, index=1, seed=0):
    """(layer copy, inputs, dense targets, kwargs, random 50% keep masks), masks applied to the layer."""
    model = copy.deepcopy(model)
    hidden, kwargs = capture_layer_inputs(model, calib[:4], batch_size=2)
    layers = decoder_layers(model)
    with torch.no_grad():
        for i in range(index):
            hidden = [layer_out(layers[i], h, kwargs[i][b]) for b, h in enumerate(hidden)]
        targets = [layer_out(layers[index], h, kwargs[index][b]) for b, h in enumerate(hidden)]
    gen = torch.Generator().manual_seed(seed)
    layer = layers[index]
    masks = {n: torch.rand(m.weight.shape, generator=gen) > 0.5 for n, m in linear_modules(layer).items()}
    with torch.no_grad():
        for n, m in linear_modules(layer).items():
            m.weight.mul_(masks[n])
    return layer, hidden, targets, kwargs[index], masks


def test_lora_config():
    assert (Heal().lora.rank, Heal().lora.alpha) == (8, 16.0)
    assert Heal(trainable="qlora", lora={"rank": 4, "targets": ["proj$"]}).lora.rank == 4
    with pytest.raises(Exception):
        Heal(lora={"rank": 0})
    with pytest.raises(Exception):
        Heal(lora={"rnak": 4})
    mods = {"self_attn.q_proj": 1, "self_attn.o_proj": 2, "mlp.up_proj": 3}
    assert select_targets(mods, []) == list(mods)
    assert select_targets(mods, [r"self_attn\.(q|o)_proj"]) == ["self_attn.q_proj", "self_attn.o_proj"]


@pytest.mark.parametrize("quantize", [False, True])
def test_merge_adds_the_adapter_delta_and_reapplies_the_mask(_tiny_loaded, heal_data, quantize):
    layer, *_, masks = _block_case(_tiny_loaded.model, heal_data[0])
    before = {n: m.weight.detach().clone() for n, m in linear_modules(layer).items()}
    flags = {n: p.requires_grad for n, p in layer.named_parameters()}
    cfg = Lora(rank=4, alpha=8.0, targets=["proj"])
    s = LoraSession(layer, linear_modules(layer), masks, cfg, quantize=quantize)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)         # a trained-looking adapter
    want = {n: (before[n] + (cfg.alpha / cfg.rank) * w.lora_B["default"].weight @ w.lora_A["default"].weight)
            * masks[n] for n, w in s.wrappers.items()}
    s.merge()
    mods = linear_modules(layer)
    assert set(mods) == set(before)                                     # plain nn.Linear back, no adapters
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in mods.values())
    assert not hasattr(layer, "is_loaded_in_4bit") and not hasattr(layer, "peft_config")
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == flags
    for n, m in mods.items():
        assert torch.equal(m.weight != 0, masks[n]), n                  # zeros stay zero, bit-exactly
        assert torch.allclose(m.weight, want[n], atol=1e-6), n
        assert not torch.equal(m.weight, before[n]), n


def test_qlora_base_is_nf4_4bit(_tiny_loaded, heal_data):
    layer, x, *_ , masks = _block_case(_tiny_loaded.model, heal_data[0])
    orig = {n: m.weight.detach().clone() for n, m in linear_modules(layer).items()}
    s = LoraSession(layer, linear_modules(layer), masks, Lora(rank=4), quantize=True)
    for n, base in s.base_layers().items():
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
        assert base.weight.numel() * 2 == orig[n].numel()                # two 4-bit codes per byte
        assert base.weight.quant_state.quant_type == "nf4"
        deq = bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state)
        err = (deq - orig[n]).abs().max().item()
        assert 0 < err < 0.25 * orig[n].abs().max().item(), n             # really quantized, still close
        inp = torch.randn(3, orig[n].shape[1])
        assert torch.allclose(base(inp), inp @ deq.T, atol=1e-4), n      # the forward uses the 4-bit codes
    s.abort()
    assert all(torch.equal(m.weight, orig[n]) for n, m in linear_modules(layer).items())


@pytest.mark.parametrize("trainable", ["lora", "qlora"])
def test_heal_block_with_adapters_lowers_loss_and_keeps_zeros(_tiny_loaded, heal_data, trainable, monkeypatch):
    layer, x, y, kw, masks = _block_case(_tiny_loaded.model, heal_data[0])
    calls = []
    fwd = bnb.nn.Linear4bit.forward

    def spy(self, inp):
        calls.append(self.weight.dtype)
        return fwd(self, inp)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", spy)
    st = heal_block(layer, x, y, kw, masks, steps=30, lr=2e-3, trainable=trainable,
                    revert_if_worse=False, lora=Lora(rank=8))
    n_lin = len(masks)
    assert st.n_trained == sum(8 * (m.weight.shape[0] + m.weight.shape[1]) for m in linear_modules(layer).values())
    assert len(linear_modules(layer)) == n_lin
    print(f"\n{trainable}: block loss {st.loss_before:.5f} -> {st.loss_after:.5f}; "
          f"curve {st.curve[0]:.5f} -> {st.curve[-1]:.5f}")
    assert sum(st.curve[-5:]) < sum(st.curve[:5])                       # training loss fell
    assert st.loss_after < st.loss_before                               # and still after merge + mask
    for n, m in linear_modules(layer).items():
        assert torch.equal(m.weight != 0, masks[n]), n
    if trainable == "qlora":
        assert len(calls) >= 30 * n_lin and set(calls) == {torch.uint8}  # every step ran the 4-bit base
    else:
        assert not calls


def test_blockwise_lora_heals_the_pruned_fixture(_tiny_loaded, pruned, heal_data, dense_eval):
    from birdbone_core.eval.perplexity import evaluate
    calib, chunks = heal_data
    dense, dense_hidden = dense_eval
    before, _ = evaluate(pruned.model, chunks, dense_hidden)
    lm = copy.deepcopy(pruned)
    zeros0 = {n: p == 0 for n, p in lm.model.named_parameters() if p.dim() == 2 and "layers." in n}
    heal(lm.model, _tiny_loaded.model, calib, Heal(steps=20, lr=2e-3, batch_size=4, trainable="lora"))
    after, _ = evaluate(lm.model, chunks, dense_hidden)
    print(f"\nblockwise lora: dense {dense.ppl:.3f} | wanda-50% {before.ppl:.3f} (KL {before.kld:.4f}) | "
          f"healed {after.ppl:.3f} (KL {after.kld:.4f})")
    assert after.kld < before.kld and after.ppl < before.ppl
    for n, p in lm.model.named_parameters():
        if n in zeros0:
            assert torch.equal(p == 0, zeros0[n]), n


def test_distill_with_qlora_lowers_kl_and_keeps_zeros(_tiny_loaded, pruned, heal_data):
    from birdbone_core.heal.distill import heal_distill
    calib = heal_data[0][:8]
    lm = copy.deepcopy(pruned)
    zeros0 = {n: p == 0 for n, p in lm.model.named_parameters() if p.dim() == 2 and "layers." in n}
    rep = heal_distill(lm.model, _tiny_loaded.model, calib,
                       Heal(method="distill", trainable="qlora", steps=8, lr=2e-3, batch_size=4, top_k=32))
    print(f"\ndistill qlora: top-k KL {rep.kl_before:.4f} -> {rep.kl_after:.4f}, {rep.n_trained} adapter weights")
    assert rep.kl_after < rep.kl_before
    assert not hasattr(lm.model, "peft_config") and not hasattr(lm.model, "is_loaded_in_4bit")
    for n, p in lm.model.named_parameters():
        assert type(p) is nn.Parameter and p.dtype == torch.float32, n
        if n in zeros0:
            assert torch.equal(p == 0, zeros0[n]), n
