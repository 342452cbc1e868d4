"""The default suite's guard against a step that materializes the whole model: the baseline (`prepare`), a
one-shot prune, the GGUF export and `birdbone quantize` of a generated 0.74B llama
(tests/benchmarks/make_models.py `stream-test`, bf16 on disk), each streamed layer by layer, must each peak
below half the model's float32 bytes. Holding the model whole in bf16 alone would reach that bound, before
the interpreter, torch and transformers (~0.5 GB) are counted."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import gguf
import yaml
from clitools import run_measured
from tiny_recipes import tiny_recipe

from birdbone_core.model.tensors import SafetensorsState

ROOT = Path(__file__).resolve().parents[2]


def _make_models():
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "tests" / "benchmarks" / "make_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peak_rss(log: Path, *args: str) -> int:
    """Run `birdbone ARGS` as a process of its own (output to `log`); its peak RSS in bytes."""
    env = {**os.environ, "BIRDBONE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    code, peak, _ = run_measured([sys.executable, "-m", "birdbone_core.cli", *args], log, env)
    assert code == 0, log.read_text()
    return peak


def test_streamed_prune_export_and_quantize_stay_under_half_the_models_fp32_bytes(tmp_path):
    model = tmp_path / "stream-test"
    made = _make_models().make("stream-test", model)
    fp32_bytes = 4 * made["parameters"]
    recipe = yaml.safe_load(tiny_recipe("stream-memory", {"method": "magnitude", "pattern": "2:4"}))
    recipe["runtime"] = {"dtype": "bfloat16"}           # what the model is stored in; cpu would default to fp32
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    _peak_rss(tmp_path / "init.log", "init", str(run), "--model", str(model), "-r", str(tmp_path / "recipe.yaml"))

    peaks = {step: _peak_rss(tmp_path / f"{step}.log", step, str(run)) for step in ("baseline", "prune", "export")}
    # the quantizer: calibration forward and backward, encodings and export (Q8_0 only, to stay quick)
    gguf_out = tmp_path / "q.gguf"
    peaks["quantize"] = _peak_rss(tmp_path / "quantize.log", "quantize", str(model), "-o", str(gguf_out),
                                  "-r", str(tmp_path / "recipe.yaml"), "--bpw", "8.6", "--types", "Q8_0",
                                  "--no-gptq", "--measure-blocks", "0", "--shortlist", "all", "--n-samples", "2")
    print(f"{made['parameters']:,} parameters, fp32 {fp32_bytes / 2**30:.2f} GiB; peak RSS " +
          ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in peaks.items()))
    assert all(v < fp32_bytes / 2 for v in peaks.values()), peaks

    # and the work was done: every decoder weight 2:4 sparse, the GGUF holds every tensor
    pruned = SafetensorsState(run / "pruned")
    w = pruned["model.layers.19.mlp.down_proj.weight"]
    assert float((w == 0).float().mean()) == 0.5 and w.dtype.itemsize == 2
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps["prune"]["sparsity"] == 0.5 and steps["export"]["bytes"] > made["parameters"] * 2
    types = {t.tensor_type.name for t in gguf.GGUFReader(gguf_out).tensors}
    assert types == {"Q8_0", "F32"} and gguf_out.stat().st_size > made["parameters"]
