"""One llm-compressor one-shot job, run inside its own venv (.venv-llmc, see Makefile here).

    .venv-llmc/bin/python tests/benchmarks/llmc/run_llmc.py --model BASE_HF_DIR --calib calib.safetensors \
        --method sparsegpt|wanda|gptq [--sparsity 0.5] [--pattern unstructured|2:4] --out OUT.safetensors

The harness (tests/benchmarks/harness.py, main venv) hands over:
  * BASE_HF_DIR: a plain safetensors copy of the model plus the tokenizer saved by birdbone's loader
    (no GGUF: transformers 5.17, which llmcompressor 0.14 pins, misbuilds the Gemma GGUF tokenizer;
    and a GGUF-loaded model needs two patches before oneshot, see STACK-NOTES);
  * calib.safetensors: {"input_ids": int64 [n_samples, seq_len]}, the very calibration blocks birdbone
    prunes with (tokenized once in the main venv, so both tools see identical tokens).
It writes OUT.safetensors holding only the decoder layers' Linear weights after oneshot (fp32; for GPTQ
the fake-quantized = dequantized int4 values) and OUT.json (settings, versions, timings). The harness
scores them with birdbone's evaluator in the main venv, same chunks and protocol as everything else.
Only the standard library, torch, safetensors, transformers, datasets and llmcompressor are used.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch


def build_modifier(method: str, sparsity: float, pattern: str):
    ignore = ["lm_head"]  # tied to the embedding in both test models; birdbone leaves it dense too
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        mask = "0:0" if pattern == "unstructured" else pattern
        return SparseGPTModifier(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=ignore,
                                 block_size=128, dampening_frac=0.01)
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        mask = "0:0" if pattern == "unstructured" else pattern
        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask, targets=["Linear"], ignore=ignore)
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        # W4A16: symmetric int4 weights, group size 128, activations untouched
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)
    raise SystemExit(f"unknown method {method!r}")


def linear_weights(model) -> dict[str, torch.nn.Module]:
    """Linear modules inside the decoder layers, by module name (e.g. model.layers.0.mlp.up_proj)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def dequantized_weight(module) -> tuple[torch.Tensor, float | None]:
    """Weight as the quantized model computes with it: fake_quantize(W) with the stored scale/zero
    point when the module carries a quantization scheme, else W. Also max |W - fq(W)| (0 when GPTQ
    already wrote dequantized values into W)."""
    w = module.weight.data.float()
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or getattr(scheme, "weights", None) is None or not hasattr(module, "weight_scale"):
        return w.clone(), None
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    zp = getattr(module, "weight_zero_point", None)
    fq = fake_quantize(w, module.weight_scale.data, None if zp is None else zp.data, scheme.weights).float()
    return fq, float((fq - w).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", required=True, choices=["sparsegpt", "wanda", "gptq"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    load_s = time.perf_counter() - t0
    ids = load_file(a.calib)["input_ids"]                     # [n_samples, seq_len] int64
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    modifier = build_modifier(a.method, a.sparsity, a.pattern)
    t1 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=modifier, num_calibration_samples=n,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=1)
    oneshot_s = time.perf_counter() - t1

    out, fq_gap, zeros, total = {}, 0.0, 0, 0
    for name, mod in linear_weights(model).items():
        w, gap = dequantized_weight(mod)
        if gap is not None:
            fq_gap = max(fq_gap, gap)
        out[f"{name}.weight"] = w.contiguous()
        zeros += int((w == 0).sum())
        total += w.numel()
    if not out:
        raise SystemExit("no Linear modules found under .layers.")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(a.out) + ".tmp")
    save_file(out, str(tmp))
    tmp.rename(a.out)
    info = {"tool": "llmcompressor", "method": a.method, "sparsity": a.sparsity, "pattern": a.pattern,
            "modifier": modifier.model_dump(mode="json", exclude_none=True) if hasattr(modifier, "model_dump") else repr(modifier),
            "n_samples": n, "seq_len": seq_len, "load_s": round(load_s, 2), "oneshot_s": round(oneshot_s, 2),
            "zeros_fraction": zeros / total, "n_weights": total, "max_fakequant_gap": fq_gap,
            "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads(),
            "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch",
                                                  "datasets", "accelerate")},
            "python": platform.python_version()}
    Path(str(a.out) + ".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in ("method", "pattern", "oneshot_s", "zeros_fraction", "max_fakequant_gap")}))


if __name__ == "__main__":
    main()
