"""The bit budget compares tensors by their estimated loss increase, so the estimates must be on one scale:
for the fixture model, half of each estimate (a second-order loss change is half the Fisher quadratic
form) matches the measured KL(base || perturbed) on the calibration blocks, for the tied embedding (its
lookups and its LM-head use) as well as for every kind of linear layer."""
import pytest
import torch

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.quant.calibration import collect_sensitivity
from birdbone_core.quant.codecs import decode, encode_torch
from birdbone_core.quant.error import estimated_loss as _sens


@pytest.fixture(scope="module")
def calibrated(_tiny_loaded):
    model, tok = _tiny_loaded.model.eval(), _tiny_loaded.tokenizer
    text, _ = read_text(None, "calib")
    blocks = calibration_blocks(tok, text, 8, 128, 0)
    sens = collect_sensitivity(model, blocks, batch_size=4)
    with torch.no_grad():
        base = model(input_ids=blocks, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    return model, blocks, sens, base


def _measured_kl(model, blocks, base) -> float:
    with torch.no_grad():
        lq = model(input_ids=blocks, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    return float((base.exp() * (base - lq)).sum(-1).mean())


def _q4_0_noise(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    packed, _ = encode_torch("Q4_0", W, torch.diag(H).clamp_min(0))
    return decode("Q4_0", packed.numpy(), tuple(W.shape)) - W


@pytest.mark.parametrize("name", ["embed", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                  "model.layers.2.self_attn.o_proj", "model.layers.3.mlp.gate_proj",
                                  "model.layers.0.mlp.down_proj"])
def test_estimate_matches_measured_kl(calibrated, name):
    model, blocks, sens, base = calibrated
    if name == "embed":
        W, H, F = model.get_input_embeddings().weight, sens.hessian["lm_head"], sens.fisher["lm_head"]
        lookups = (sens.embed_ids, sens.embed_g2)
    else:
        W, H, F = model.get_submodule(name).weight, sens.hessian[name], sens.fisher[name]
        lookups = None
    W0 = W.data.clone()
    dW = _q4_0_noise(W0, H)
    estimate = _sens(dW, H, F, lookups) / 2
    W.data.copy_(W0 + dW)
    try:
        measured = _measured_kl(model, blocks, base)
    finally:
        W.data.copy_(W0)
    assert measured > 0
    # measured 0.64-1.95x over all 29 tensors; the lookup term alone was 145x too large before it used
    # the per-dimension diagonal (|g|^2 |dW|^2 instead of sum_i g_i^2 dW_i^2)
    assert 0.4 < estimate / measured < 2.5, (estimate, measured)


def test_lookup_term_only_counts_rows_seen(calibrated):
    model, blocks, sens, _ = calibrated
    W = model.get_input_embeddings().weight.data
    unseen = torch.ones(W.shape[0], dtype=torch.bool)
    unseen[sens.embed_ids] = False
    assert unseen.any() and not unseen[blocks.unique()].any()
    dW = torch.zeros_like(W)
    dW[unseen] = 1.0
    assert _sens(dW, None, None, (sens.embed_ids, sens.embed_g2)) == 0.0
    dW[blocks[0, 5]] = 1.0
    assert _sens(dW, None, None, (sens.embed_ids, sens.embed_g2)) > 0.0


def test_chunked_head_gives_the_whole_sequence_statistics(calibrated, monkeypatch):
    """The calibration pass runs the LM head on chunks of positions; its statistics equal those of one
    whole-sequence loss (the pre-chunking path, forced here by hiding the decoder)."""
    from birdbone_core.quant import calibration

    model, blocks, sens, _ = calibrated
    monkeypatch.setattr(calibration, "HEAD_CHUNK_ELEMENTS", 37 * model.config.vocab_size)  # 9 chunks of 128 positions
    chunked = collect_sensitivity(model, blocks[:4], batch_size=1)

    class Whole(torch.nn.Module):  # the same model, seen without `.model`: the plain path
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, **kw):
            return self.m(**kw)

        def get_output_embeddings(self):
            return self.m.get_output_embeddings()

        def get_input_embeddings(self):
            return self.m.get_input_embeddings()

    whole = collect_sensitivity(Whole(model), blocks[:4], batch_size=1)
    assert set(chunked.hessian) == {k.removeprefix("m.") for k in whole.hessian}
    for k, H in whole.hessian.items():
        torch.testing.assert_close(chunked.hessian[k.removeprefix("m.")], H, rtol=1e-5, atol=1e-7)
    for k, F in whole.fisher.items():
        torch.testing.assert_close(chunked.fisher[k.removeprefix("m.")], F, rtol=1e-4, atol=1e-10)
    assert torch.equal(chunked.embed_ids, whole.embed_ids)
    torch.testing.assert_close(chunked.embed_g2, whole.embed_g2, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("with_stats", [True, False])
def test_encoded_loss_scores_row_chunks_as_the_whole(monkeypatch, with_stats):
    """Candidates are scored from their packed bytes a chunk of rows at a time (no decoded copy of a
    262k-row embedding): the same figure as the whole-matrix estimate."""
    from birdbone_core.quant import error

    g = torch.Generator().manual_seed(3)
    W = torch.randn(1000, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H, F = (X.T @ X / 256, torch.rand(1000, generator=g)) if with_stats else (None, None)
    ids = torch.tensor([997, 3, 500, 12, 640])  # unsorted, as the calibration pass may give them
    lookups = (ids, torch.rand(5, 64, generator=g))
    packed, _ = encode_torch("Q4_0", W)
    whole = _sens(decode("Q4_0", packed.numpy(), W.shape) - W, H, F, lookups)
    monkeypatch.setattr(error, "LOSS_CHUNK_WEIGHTS", 64 * 37)  # 28 chunks, the last one short
    assert error.encoded_loss("Q4_0", packed.numpy(), W, H, F, lookups) == pytest.approx(whole, rel=1e-9)
    plain = _sens(decode("Q4_0", packed.numpy(), W.shape) - W, H, F, None)
    assert error.encoded_loss("Q4_0", packed.numpy(), W, H, F, None) == pytest.approx(plain, rel=1e-9)
