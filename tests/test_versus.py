"""`birdbone versus`: llama.cpp's own quantizer (the bundled library, with an importance matrix) at the run's
file size, scored like the run's GGUF; the imatrix reaches llama.cpp."""
from __future__ import annotations

import importlib.util
import json

import pytest
from clitools import assert_clean_failure, cli

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.eval.versus import llama_quantize
from birdbone_core.export import export_gguf
from birdbone_core.quant.importance import model_imatrix

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def source(_tiny_loaded, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny-f16.gguf"
    export_gguf(_tiny_loaded.model, _tiny_loaded.tokenizer, path, out_type="f16")
    return path


def test_the_imatrix_reaches_llama_cpp(_tiny_loaded, source, tmp_path):
    blocks = calibration_blocks(_tiny_loaded.tokenizer, read_text(None, "calib")[0], 8, 64, 0)
    im = model_imatrix(_tiny_loaded.model, blocks, "calib")
    assert "blk.0.ffn_down.weight" in im.values and "token_embd.weight" not in im.values
    plain = llama_quantize(source, tmp_path / "plain.gguf", "Q4_K_M", None, None)
    weighted = llama_quantize(source, tmp_path / "imatrix.gguf", "Q4_K_M", None, im)
    assert plain.stat().st_size == weighted.stat().st_size                 # same types, different rounding
    assert plain.read_bytes() != weighted.read_bytes()


def test_versus_compares_at_the_same_size(source, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {n_samples: 8, seq_len: 64}\nevaluation: {n_ctx: 128, max_chunks: 2}\n"
                      "structure: {vocab: 0}\nprune: {method: magnitude, sparsity: 0.0}\nexport: {type: q8_0}\n")
    run = tmp_path / "run"
    assert cli("compress", source, "-r", recipe, "-o", run).returncode == 0
    r = cli("versus", run)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "versus_llamacpp.json").read_text())
    rows = res["rows"]
    ours = rows["birdbone"]
    (name, llama), = [(k, v) for k, v in rows.items() if k.startswith("llama.cpp")]
    assert "+imatrix" in name and llama["bytes"] >= ours["bytes"] and ours["bytes"] < rows["source"]["bytes"]
    assert all(0 < v["bits_per_byte"] < 10 and v["decode_tok_s"] > 0 for v in rows.values())
    assert "bits/byte" in r.stdout


def test_versus_needs_a_finished_run_from_a_gguf(tiny_path, tmp_path):
    assert_clean_failure(cli("versus", tmp_path), "not a birdbone run")
