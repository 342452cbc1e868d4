"""Distillation from the dense teacher's cached top-k logits."""
import copy
import time

import torch
import torch.nn.functional as F

from birdbone_core.eval.perplexity import evaluate
from birdbone_core.heal import Heal, heal
from birdbone_core.heal.distill import teacher_topk, topk_kl


def test_topk_kl_is_exact_with_full_vocab_and_a_lower_bound_below():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(10, 50, generator=gen) * 3
    s = torch.randn(10, 50, generator=gen) * 3
    full = F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    lse = torch.logsumexp(t, -1)
    v, i = t.topk(50, -1)
    assert torch.allclose(topk_kl(s, v, i, lse), full, atol=1e-5)
    v, i = t.topk(8, -1)
    approx = topk_kl(s, v, i, lse)
    assert (approx <= full + 1e-6).all() and (approx >= -1e-6).all()


def test_teacher_cache_shapes_and_lse(_tiny_loaded, heal_data):
    calib = heal_data[0][:3, :32]
    c = teacher_topk(_tiny_loaded.model, calib, k=16, batch_size=2, head_chunk=40)
    assert c.values.shape == (3, 32, 16) and c.indices.shape == (3, 32, 16) and c.lse.shape == (3, 32)
    with torch.no_grad():
        logits = _tiny_loaded.model(input_ids=calib).logits
    assert torch.allclose(c.lse, torch.logsumexp(logits, -1), atol=1e-4)
    assert torch.allclose(c.values, logits.topk(16, -1).values, atol=1e-4)


def test_distill_lowers_kl_to_teacher_and_keeps_masks(_tiny_loaded, pruned, heal_data, dense_eval):
    calib, chunks = heal_data
    dense, dense_hidden = dense_eval
    before, _ = evaluate(pruned.model, chunks, dense_hidden)
    lm = copy.deepcopy(pruned)
    zeros0 = {n: p == 0 for n, p in lm.model.named_parameters() if "layers." in n and p.dim() == 2}
    t0 = time.perf_counter()
    rep = heal(lm.model, _tiny_loaded.model, calib, Heal(method="distill", steps=24, lr=3e-4, batch_size=4))
    secs = time.perf_counter() - t0
    after, _ = evaluate(lm.model, chunks, dense_hidden)
    print(f"\ndistill: dense {dense.ppl:.3f} | wanda-50% {before.ppl:.3f} (KL {before.kld:.4f}) | "
          f"healed {after.ppl:.3f} (KL {after.kld:.4f}); top-64 KL on healing data "
          f"{rep.kl_before:.4f} -> {rep.kl_after:.4f} in {secs:.1f}s")
    assert rep.kl_after < 0.5 * rep.kl_before
    assert after.kld < 0.8 * before.kld            # held-out, full-vocab KL
    assert after.ppl < before.ppl
    for n, p in lm.model.named_parameters():
        if n in zeros0:
            assert torch.equal(p == 0, zeros0[n]), n
    assert torch.equal(lm.model.lm_head.weight, _tiny_loaded.model.lm_head.weight)  # head/embeddings frozen
