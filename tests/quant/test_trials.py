"""Measured choice between allocations (quant/trials.py) on the fixture model: the fixture's embedding is
10% of its budgeted weights, so the tests lower the "big tensor" share to try its types."""
import hashlib

import numpy as np
import pytest
import torch

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.export.arch import permute_for_rope, unpermute_for_rope
from birdbone_core.quant import engine
from birdbone_core.quant.calibration import collect_sensitivity
from birdbone_core.quant.codecs import decode
from birdbone_core.quant.config import Quantize
from birdbone_core.quant.engine import choose, measure_candidates
from birdbone_core.quant.trials import _log_probs, _WeightSwap, allocations, big_tensors, choose_measured, measured_kl


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def setup(_tiny_loaded):
    model, tok = _tiny_loaded.model.eval(), _tiny_loaded.tokenizer
    text, _ = read_text(None, "calib")
    sens = collect_sensitivity(model, calibration_blocks(tok, text, 8, 128, 0), batch_size=4)
    cfg = Quantize(target_bpw=4.5, types=["Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q4_K", "Q6_K"])
    with pytest.MonkeyPatch.context() as mp:  # keep both encodings of the (10%) embedding, as for a big tensor
        mp.setattr(engine, "ALTERNATE_SHARE", 0.08)
        cands = measure_candidates(model, cfg, sens)
    assert set(cands.alternates) == {"token_embd.weight"}
    budget = int(4.5 * cands.n_weights / 8)
    held = calibration_blocks(tok, text, 3, 128, 1)
    return model, cands, budget, held


def test_unpermute_inverts_permute():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(32, 3)
    for n_head in (1, 2, 4):
        np.testing.assert_array_equal(unpermute_for_rope(permute_for_rope(w, n_head), n_head), w)


def test_big_tensors_by_share(setup):
    _, cands, _, _ = setup
    assert big_tensors(cands) == []  # the fixture's embedding is 10% of the weights
    assert big_tensors(cands, share=0.08) == ["token_embd.weight"]


def test_swap_puts_decoded_bytes_and_restores_exact_weights(setup):
    model, cands, budget, _ = setup
    before = _digest(model)
    r = choose(cands, budget)
    swap = _WeightSwap(model)
    swap.put(r.quantized)
    t, data = r.quantized["blk.0.attn_q.weight"]
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    gguf_layout = decode(t, data, tuple(q.shape)).numpy()  # llama: q rows are RoPE-permuted in GGUF
    np.testing.assert_array_equal(q.detach().numpy(), unpermute_for_rope(gguf_layout, model.config.num_attention_heads))
    assert _digest(model) != before
    swap.restore()
    assert _digest(model) == before


def test_measured_choice_is_the_lowest_measured_kl(setup):
    model, cands, budget, held = setup
    before = _digest(model)
    r, trials = choose_measured(model, cands, budget, held, share=0.08)
    assert _digest(model) == before
    combos = allocations(cands, budget, ["token_embd.weight"])
    assert len(trials) == len(combos) >= 3
    first = choose(cands, budget).types["token_embd.weight"]
    assert trials[0].big_types["token_embd.weight"].split(" ")[0] == first
    # each type's two encodings (GPTQ and rounding) are both tried
    labels = {t.big_types["token_embd.weight"] for t in trials}
    assert {f"{first} (gptq)", f"{first} (rounding)"} <= labels
    chosen = [t for t in trials if t.chosen]
    assert len(chosen) == 1 and chosen[0].measured_kl == min(t.measured_kl for t in trials)
    assert r.types["token_embd.weight"] == chosen[0].big_types["token_embd.weight"].split(" ")[0]
    assert r.trials == trials
    assert all(t.n_bytes <= budget and t.measured_kl > 0 for t in trials)
    # the chosen allocation, put back in, measures what its trial said
    swap = _WeightSwap(model)
    base = [lp.half() for lp in _log_probs(model, held)]
    swap.put(r.quantized)
    try:
        assert measured_kl(model, held, base) == pytest.approx(chosen[0].measured_kl, rel=1e-6)
    finally:
        swap.restore()


def test_measured_kl_is_zero_for_the_base(setup):
    model, _, _, held = setup
    base = _log_probs(model, held, torch.float32)
    assert abs(measured_kl(model, held, base)) < 1e-6
    with torch.no_grad():
        assert measured_kl(model, held, [lp.half() for lp in base]) < 1e-3  # float16 storage of the base


def test_measured_kl_over_position_chunks_equals_one_pass(setup, monkeypatch):
    """The KL terms summed over chunks of positions equal the sum over the whole [positions, vocab] at once."""
    import birdbone_core.quant.trials as trials_mod

    model, _, _, held = setup
    base = _log_probs(model, held, torch.float32)
    with torch.no_grad():
        w = model.get_submodule("model.layers.0.mlp.down_proj").weight
        saved = w.clone()
        w.mul_(1.05)                                   # a model that differs from the base
    try:
        whole = measured_kl(model, held, base)
        monkeypatch.setattr(trials_mod, "KL_CHUNK_ELEMENTS", 7 * model.config.vocab_size)   # 7 positions a chunk
        chunked = measured_kl(model, held, base)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert whole > 1e-6 and chunked == pytest.approx(whole, rel=1e-9)
