"""A recipe's `structure:` section: the cut is made once, first, into RUN/structured/, which every later step
(baseline, pruning or waves, export, evaluate, revert) starts from; the GGUF carries the cut vocabulary;
metrics name the source and what the cut cost; bad sections are refused before any work."""
from __future__ import annotations

import importlib.util
import json

import gguf
import pytest
import torch
from clitools import assert_clean_failure, cli
from safetensors.torch import load_file

from birdbone_core.recipe import parse_recipe

RECIPE = """name: fixture-structure
calibration: {n_samples: 8, seq_len: 64}
evaluation: {n_ctx: 128, max_chunks: 4}
structure: {vocab: 0, ffn: 0.25, heal_steps: 6, heal_lr: 0.0002}
prune: {method: wanda, sparsity: %s}
%sexport: {type: q8_0}
"""


@pytest.mark.parametrize("mode", ["one-shot", "waves"])
def test_structured_run_starts_from_the_cut_model(tiny_path, tmp_path, mode):
    recipe = tmp_path / "r.yaml"
    waves = "waves: {max_per_wave: 0.1, heal: {method: blockwise, steps: 2}}\n" if mode == "waves" else ""
    recipe.write_text(RECIPE % ("0.2" if waves else "0.0", waves))
    run = tmp_path / "run"
    r = cli("compress", tiny_path, "-r", recipe, "-o", run)
    assert r.returncode == 0, r.stderr
    assert "structure: " in r.stdout and "bits per byte" in r.stdout
    rec = json.loads((run / "structured" / "structure.json").read_text())
    kept = rec["vocab"]["kept"]
    assert rec["vocab"]["corpus_tokenizes_identically"] and kept < 1024
    assert rec["width"]["sizes_after"]["intermediate_size"] == 384
    assert rec["heal"]["kl_after"] < rec["heal"]["kl_before"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["source"]["path"] == str(tiny_path) and metrics["base"]["path"].endswith("structured")
    assert metrics["structure"]["params_after"] < metrics["structure"]["params_before"]
    emb = next(t for t in gguf.GGUFReader(str(run / "model-q8_0.gguf")).tensors if t.name == "token_embd.weight")
    assert emb.shape[1] == kept
    if importlib.util.find_spec("llama_cpp") is not None:
        assert metrics["compressed"]["ppl_llamacpp"] is not None      # stock llama.cpp ran the cut GGUF
    # the ledger starts at the cut model: wave 0 is RUN/structured/ exactly
    out = tmp_path / "wave0"
    assert cli("revert", run, "--to", "0", "-o", out).returncode == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(run / "structured" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the cut itself is recorded (`birdbone log` shows it): revert --structure 0 is the source, bit for bit
    log = cli("log", run)
    assert log.returncode == 0 and "structural waves" in log.stdout and "accept" in log.stdout
    assert cli("revert", run, "--structure", "0", "-o", tmp_path / "uncut").returncode == 0
    a, b = load_file(str(tmp_path / "uncut" / "model.safetensors")), load_file(str(tiny_path / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_structure_section_is_validated_and_absent_by_default(tiny_path, tmp_path):
    assert "structure" not in parse_recipe({}).model_dump()           # old recipes keep their hash
    recipe = tmp_path / "r.yaml"
    for bad, needle in (("{}", "nothing to remove"), ("{vocab: 100}", "256 byte tokens"), ("{ffn: 1.0}", "ffn"),
                        ("{layers: 1, colour: red}", "unknown field")):
        recipe.write_text(f"structure: {bad}\n")
        assert_clean_failure(cli("compress", tiny_path, "-r", recipe, "-o", tmp_path / "run"), needle)
        assert not (tmp_path / "run").exists()
