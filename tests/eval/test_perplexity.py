import math

import torch
import torch.nn.functional as F

from birdbone_core.data.text import evaluation_chunks, read_text
from birdbone_core.eval.perplexity import evaluate, score_hidden


def _chunks(lm, n_ctx=128, k=4):
    return evaluation_chunks(lm.tokenizer, read_text(None, "eval")[0], n_ctx, k)


def test_matches_naive_cross_entropy(tiny):
    chunks = _chunks(tiny)
    res, hidden = evaluate(tiny.model, chunks)
    with torch.no_grad():
        logits = tiny.model(chunks).logits                      # [k, n_ctx, vocab]
    first = 64
    ce = F.cross_entropy(logits[:, first:127].reshape(-1, logits.shape[-1]), chunks[:, first + 1:].reshape(-1))
    assert res.n_scored == 4 * 63 and hidden.shape[:2] == (4, 63)
    assert math.isclose(res.ppl, math.exp(ce.item()), rel_tol=1e-5)
    # the trained fixture is far better than uniform guessing over its vocabulary
    assert res.ppl < 0.2 * tiny.model.config.vocab_size


def test_self_kl_is_zero_and_head_chunking_is_invisible(tiny):
    chunks = _chunks(tiny)
    res, hidden = evaluate(tiny.model, chunks, reference_hidden=None)
    a = score_hidden(tiny.model, hidden, chunks, reference_hidden=hidden, head_chunk=7)
    assert abs(a.kld) < 1e-9 and a.top1 == 1.0
    assert math.isclose(a.ppl, res.ppl, rel_tol=1e-6)   # float32 head, other chunking


def test_kl_against_perturbed_model_is_positive(tiny):
    chunks = _chunks(tiny)
    _, ref = evaluate(tiny.model, chunks)
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.down_proj.weight.mul_(0.0)
    res, _ = evaluate(tiny.model, chunks, reference_hidden=ref)
    assert res.kld > 1e-3 and res.top1 < 1.0


def test_softcapping_applied(tiny):
    chunks = _chunks(tiny, k=1)
    _, hidden = evaluate(tiny.model, chunks)
    plain = score_hidden(tiny.model, hidden, chunks)
    tiny.model.config.final_logit_softcapping = 1.0   # crushes logits into [-1, 1]: near-uniform
    capped = score_hidden(tiny.model, hidden, chunks)
    assert capped.ppl > plain.ppl * 5
