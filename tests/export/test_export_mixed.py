"""Mixed-type GGUF from birdbone's quantizer: every block type it writes loads in llama.cpp, and llama.cpp's
perplexity equals torch's on the very weights the file holds (dequantized)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.quant.config import Quantize

N_CTX = 128
# one tensor per block type (the rest Q4_K), so a single file holds all eleven
EVERY_TYPE = {r"blk\.0\.attn_q\.": "Q2_K", r"blk\.0\.attn_k\.": "Q3_K", r"blk\.0\.attn_v\.": "Q5_K",
              r"blk\.0\.attn_output\.": "Q6_K", r"blk\.0\.ffn_gate\.": "Q4_0", r"blk\.0\.ffn_up\.": "Q4_1",
              r"blk\.0\.ffn_down\.": "Q5_0", r"blk\.1\.attn_q\.": "Q5_1", r"blk\.1\.attn_k\.": "Q8_0",
              r"blk\.1\.attn_v\.": "F16", r"blk\.1\.attn_output\.": "IQ4_NL", "token_embd": "Q6_K",
              r"blk\.[23]\.": "F16"}


@pytest.fixture(scope="module")
def sensitivity(tiny_llama):
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.quant.calibration import collect_sensitivity

    model, tok = tiny_llama
    text, _ = read_text(None, "calib")
    return collect_sensitivity(model, calibration_blocks(tok, text, 8, 128, 0), batch_size=4)


@pytest.fixture(scope="module")
def every_type(tiny_llama, sensitivity, tmp_path_factory):
    from birdbone_core.quant.engine import quantize_model

    model, tok = tiny_llama
    cfg = Quantize(target_bpw=16.0, types=["Q4_K"], overrides=EVERY_TYPE,
                   gptq={"skip": [r"blk\.[1-3]\.", "token_embd"]})  # GPTQ levels in layer 0 only: fast
    q = quantize_model(model, cfg, sensitivity)
    path = tmp_path_factory.mktemp("mixed") / "every.gguf"
    res = export_gguf(model, tok, path, out_type="f16", quantized=q.quantized,
                      extra_metadata={"birdbone.quant.types": json.dumps(q.types)})
    return q, res


def test_types_and_metadata(every_type):
    q, res = every_type
    r = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == q.types == res.tensor_types
    assert set(types.values()) == {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                                   "IQ4_NL", "F16", "F32"}
    assert json.loads(r.fields["birdbone.quant.types"].contents()) == types
    assert r.fields["birdbone.out_type"].contents() == "mixed"
    # general.file_type names the type holding the most bytes: here the F16 layers 2 and 3
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    data = sum(int(t.n_bytes) for t in r.tensors)
    assert data == q.n_bytes  # what the budget counted is what the file holds
    for t in r.tensors:  # the bytes written are the quantizer's, unchanged
        if t.name in q.quantized and types[t.name] not in ("F16", "F32"):
            assert np.array_equal(np.asarray(t.data).reshape(-1), q.quantized[t.name][1].reshape(-1)), t.name


@pytest.mark.llamacpp
def test_llama_cpp_perplexity_matches_torch_on_the_stored_weights(every_type, tiny_llama, eval_text):
    from transformers import AutoModelForCausalLM

    from birdbone_core.eval.llamacpp import llama_perplexity
    from tests.export.test_export_tiny_llama import torch_perplexity

    _, tok = every_type[1], tiny_llama[1]
    path = every_type[1].path
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok(eval_text)["input_ids"]
    ref, n_ref = torch_perplexity(back, ids, N_CTX, tok.bos_token_id)
    ppl, n = llama_perplexity(path, ids, N_CTX)
    assert n == n_ref
    assert abs(ppl / ref - 1) < 2e-3, (ppl, ref)


def test_budget_is_met_and_mixes_types(tiny_llama, sensitivity, tmp_path):
    from birdbone_core.quant.engine import quantize_model

    model, tok = tiny_llama
    cfg = Quantize(target_bpw=5.0, types=["Q4_K", "Q6_K"], gptq={"enabled": False})
    q = quantize_model(model, cfg, sensitivity)
    assert q.bits_per_weight <= 5.0
    assert q.bits_per_weight > 4.7  # the budget is spent, not left over
    quant_types = {t for t in q.types.values() if t != "F32"}
    assert len(quant_types) >= 2, q.types
    res = export_gguf(model, tok, tmp_path / "b.gguf", out_type="f16", quantized=q.quantized)
    assert res.bits_per_weight == pytest.approx(q.bits_per_weight)
    # uniform Q4_K (4.5 bpw + F32 norms) also fits 5.0 bpw: the allocation must measure lower total error
    uniform = sum(e["Q4_K"] for e in q.errors.values())
    chosen = sum(q.errors[n][t] for n, t in q.types.items() if n in q.errors)
    assert chosen < uniform


def test_gptq_beats_rounding_with_the_models_own_statistics(tiny_llama, sensitivity):
    """On real activations (fixture layer 1), grid-aware GPTQ lowers the layer's output error well below
    the codec's importance-weighted rounding."""
    from birdbone_core.quant.gptq import GPTQSettings, gptq_quantize

    model, _ = tiny_llama
    for mod in ("model.layers.1.mlp.down_proj",):
        W = model.get_submodule(mod).weight.detach()
        H = sensitivity.hessian[mod]
        for t in ("Q4_K", "Q4_0"):
            r = gptq_quantize(W, H, t, GPTQSettings(act_order=True))
            assert r.error < 0.85 * r.plain_error, (mod, t, r.error, r.plain_error)


def test_bad_quantized_input(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(BirdboneError, match="not a tensor of this model"):
        export_gguf(model, tok, tmp_path / "x.gguf", quantized={"nope.weight": ("Q4_0", np.zeros((1, 18), np.uint8))})
    with pytest.raises(BirdboneError, match="expected packed Q4_0 bytes"):
        export_gguf(model, tok, tmp_path / "x.gguf",
                    quantized={"blk.0.attn_q.weight": ("Q4_0", np.zeros((256, 10), np.uint8))})
    with pytest.raises(BirdboneError, match="cannot be stored as Q4_K"):
        export_gguf(model, tok, tmp_path / "x.gguf",
                    quantized={"blk.0.attn_norm.weight": ("Q4_K", np.zeros((1,), np.uint8))})
    assert list(tmp_path.iterdir()) == []
