"""Layer-by-layer pruning on the trained fixture model."""
import copy

import pytest
import torch

from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.model.layers import decoder_layers
from birdbone_core.model.walk import capture_layer_inputs
from birdbone_core.prune.sequential import count_zeros, prune_sequential
from birdbone_core.recipe import parse_recipe


@pytest.fixture(scope="module")
def data(_tiny_loaded):
    tok = _tiny_loaded.tokenizer
    calib = calibration_blocks(tok, read_text(None, "calib")[0], n_samples=32, seq_len=128, seed=0)
    chunks = evaluation_chunks(tok, read_text(None, "eval")[0], n_ctx=128, max_chunks=48)
    return calib, chunks


def _prune(lm, calib, **prune):
    cfg = parse_recipe({"prune": prune}).prune
    return prune_sequential(lm.model, calib, cfg)


def test_captured_inputs_replay_the_dense_forward(tiny, data):
    calib, _ = data
    hidden, kwargs = capture_layer_inputs(tiny.model, calib[:4], batch_size=2)
    h = hidden[0]
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(tiny.model)):
            out = layer(h, **kwargs[i][0])
            h = out[0] if isinstance(out, tuple) else out
        h = tiny.model.model.norm(h)
        ref = tiny.model.model(input_ids=calib[:2]).last_hidden_state
    assert torch.allclose(h, ref, atol=1e-5)


def _ppl_by_method(lm0, calib, chunks, sparsity):
    out = {"dense": evaluate(lm0.model, chunks)[0].ppl}
    for method in ("magnitude", "wanda", "sparsegpt"):
        lm = copy.deepcopy(lm0)
        rep = _prune(lm, calib, method=method, sparsity=sparsity)
        assert abs(rep.overall_sparsity() - sparsity) < 1e-3
        zeros, total = count_zeros(lm.model)
        assert abs(zeros / total - sparsity) < 1e-3
        out[method] = evaluate(lm.model, chunks)[0].ppl
    return out


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_and_sparsegpt_beat_magnitude(_tiny_loaded, data, sparsity):
    """Measured on this fixture (n_ctx 128, 48 chunks): dense 30.36; at 50% magnitude 32.03, Wanda 31.78,
    SparseGPT 30.91; at 70% 44.86 / 43.07 / 33.90. A 2.6M-parameter model has no activation outliers,
    so Wanda's edge over magnitude is small here; SparseGPT's error compensation is not."""
    p = _ppl_by_method(_tiny_loaded, *data, sparsity)
    gap = {m: p[m] - p["dense"] for m in ("magnitude", "wanda", "sparsegpt")}
    assert 0 < gap["sparsegpt"] < gap["wanda"] < gap["magnitude"], p
    assert gap["sparsegpt"] < 0.5 * gap["magnitude"], p


def test_two_four_structure_and_overrides(tiny, data):
    calib, _ = data
    rep = _prune(tiny, calib, method="sparsegpt", sparsity=0.5, pattern="2:4",
                 layer_sparsity={r"layers\.0\.": 0.0}, skip=["down_proj"])
    names = {m.name for m in rep.modules}
    assert not any("layers.0." in n for n in names) and not any("down_proj" in n for n in names)
    for name, mod in tiny.model.named_modules():
        if name.endswith(("q_proj", "up_proj")) and "layers.0." not in name:
            groups = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
            assert (groups <= 2).all()
    assert (tiny.model.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert len(rep.layer_rel_error) == len(decoder_layers(tiny.model))
