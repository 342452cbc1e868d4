"""`birdbone quantize` (mixed-type GGUF under a bit budget) and `birdbone imatrix` (llama.cpp imatrix file).

    birdbone quantize MODEL_OR_RUN -o OUT.gguf --bpw 4.5 [--types Q4_0,Q4_K,...] [--override REGEX=TYPE]
                      [--imatrix FILE] [--no-gptq] [-r RECIPE] [--report FILE]
    birdbone imatrix MODEL -o imatrix.gguf      # from our calibration pass; llama-quantize --imatrix reads it

MODEL_OR_RUN: an HF dir or .gguf, or a run directory (its RUN/pruned model, its recipe's calibration and
`quantize:` section as defaults). Top-level imports stay light: the parser is built on every call.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from birdbone_core.cliargs import add_runtime_flags, positive_int, runtime_of


def _shortlist(v: str) -> int | str:
    if v == "all":
        return v
    try:
        n = int(v)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all', got {v!r}")
    return n


def _split_types(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _overrides(items: list[str]) -> dict[str, str]:
    from birdbone_core.errors import BirdboneError

    out = {}
    for it in items or []:
        if "=" not in it:
            raise BirdboneError(f"--override {it!r}: expected REGEX=TYPE (e.g. token_embd=q4_0)")
        k, v = it.rsplit("=", 1)
        out[k] = v
    return out


def _model_and_recipe(spec: str, recipe_file: str | None):
    from birdbone_core.recipe import load_recipe

    p = Path(spec)
    if (p / "run.json").is_file():
        recipe = load_recipe(recipe_file or p / "recipe.yaml")
        return str(p / "pruned"), recipe, p
    return spec, load_recipe(recipe_file), None


def _cmd_quantize(a) -> int:
    from pydantic import ValidationError

    from birdbone_core.atomic import check_output_file
    from birdbone_core.errors import BirdboneError
    from birdbone_core.model.gguf_header import written_by_birdbone
    from birdbone_core.model.load import load_model, open_streamed
    from birdbone_core.model.stream import streamable
    from birdbone_core.quant.config import Quantize
    from birdbone_core.quant.pipeline import quantize_and_export
    from birdbone_core.runtime import place

    spec, recipe, run_dir = _model_and_recipe(a.model, a.recipe)
    placement = place(runtime_of(a), recipe.runtime)   # a missing device: refused before any work
    base = recipe.quantize.model_dump() if recipe.quantize is not None else {}
    if a.bpw is not None or a.bytes is not None or a.size is not None:
        base["target_bpw"], base["target_bytes"], base["target_size"] = a.bpw, a.bytes, a.size
    if a.types:
        base["types"] = _split_types(a.types)
    if a.override:
        base["overrides"] = {**base.get("overrides", {}), **_overrides(a.override)}
    if a.imatrix:
        base["imatrix"] = a.imatrix
    if a.no_gptq:
        base.setdefault("gptq", {})["enabled"] = False
    if a.n_samples:
        base["n_samples"] = a.n_samples
    if a.no_keep_source:
        base["keep_source"] = False
    if a.measure_blocks is not None:
        base["measure_blocks"] = a.measure_blocks
    if a.shortlist is not None:
        base["shortlist"] = None if a.shortlist == "all" else a.shortlist
    try:
        cfg = Quantize.model_validate(base)
    except ValidationError as e:
        first = e.errors()[0]
        raise BirdboneError(f"quantize settings: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not cfg.has_target():
        raise BirdboneError("quantize: give --size, --bpw or --bytes (or a recipe with quantize.target_size)")
    if cfg.imatrix and not Path(cfg.imatrix).is_file():  # before minutes of model loading
        raise BirdboneError(f"imatrix file {cfg.imatrix} does not exist")
    out = Path(a.out) if a.out else (run_dir / "model-mixed.gguf" if run_dir else None)
    if out is None:
        raise BirdboneError("quantize: give -o OUT.gguf")
    check_output_file(out, "quantized GGUF", written_by_birdbone)
    keep = run_dir is not None                                # a run's pruned model keeps its stored dtype
    if streamable(spec) and not a.in_memory:                  # one decoder layer in memory at a time
        model, tokenizer = open_streamed(spec, placement, keep_dtype=keep)
    else:
        lm = load_model(spec, placement=placement, keep_dtype=keep)
        model, tokenizer = lm.model, lm.tokenizer
    src = Path(spec) if spec.endswith(".gguf") else None
    result, q = quantize_and_export(model, tokenizer, cfg, out, calibration=recipe.calibration,
                                    source_gguf=src, report_path=Path(a.report) if a.report else None)
    counts: dict[str, int] = {}
    for t in q.types.values():
        counts[t] = counts.get(t, 0) + 1
    print(f"wrote {result.path}: {result.n_bytes:,} bytes, {q.bits_per_weight:.3f} bits per weight "
          f"(budget {q.budget_bytes:,} B of tensor data); types " + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())))
    for t in q.trials:
        print(f"{'chose' if t.chosen else 'tried'} " + ", ".join(f"{n} {ty}" for n, ty in t.big_types.items())
              + f": measured KL {t.measured_kl:.5f} (estimate {t.estimate:.4g})")
    if q.kept_source:
        print(f"kept the source GGUF's own blocks for {len(q.kept_source)} unchanged tensors (no re-rounding)")
    return 0


def _cmd_imatrix(a) -> int:
    from birdbone_core.atomic import check_output_file
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.model.gguf_header import written_by_birdbone
    from birdbone_core.model.load import load_model
    from birdbone_core.quant.importance import model_imatrix, write_imatrix
    from birdbone_core.runtime import place

    placement = place(runtime_of(a))
    check_output_file(Path(a.out), "imatrix file", written_by_birdbone)
    lm = load_model(a.model, placement=placement)
    text, desc = read_text(a.text, "calib")
    blocks = calibration_blocks(lm.tokenizer, text, a.n_samples, a.seq_len, 0)
    im = model_imatrix(lm.model, blocks, desc)
    write_imatrix(a.out, im)
    print(f"wrote {a.out}: {len(im.values)} tensors from {blocks.numel()} tokens of {desc}")
    return 0


def add_commands(sub) -> None:
    q = sub.add_parser("quantize", help="mixed-type GGUF under a bit budget (grid-aware GPTQ)")
    q.add_argument("model", help="HF dir, .gguf file, or run directory (its pruned model)")
    q.add_argument("-o", "--out", help="GGUF to write (default for a run: RUN/model-mixed.gguf)")
    q.add_argument("-r", "--recipe", help="recipe for calibration and quantize: settings")
    q.add_argument("--bpw", type=float, help="target bits per weight (all tensor data)")
    q.add_argument("--bytes", type=int, help="target bytes of tensor data")
    q.add_argument("--size", help="target size of the GGUF file: 160MB, 1.5GB, or a share of the source: 60%%")
    q.add_argument("--types", help="comma-separated candidate block types, e.g. Q4_0,Q4_K,Q6_K")
    q.add_argument("--override", action="append", metavar="REGEX=TYPE", help="fixed type for matching tensors")
    q.add_argument("--imatrix", help="llama-imatrix file (GGUF or .dat) for the scale search")
    q.add_argument("--no-gptq", action="store_true", help="plain importance-weighted rounding")
    q.add_argument("--n-samples", type=positive_int, help="calibration blocks (default: the recipe's)")
    q.add_argument("--no-keep-source", action="store_true",
                   help="re-encode every tensor, even those still equal to the source GGUF's blocks")
    q.add_argument("--measure-blocks", type=int, metavar="N",
                   help="score the big tensors' type choices by measured KL on N calibration blocks (0: off)")
    q.add_argument("--shortlist", type=_shortlist, metavar="N|all",
                   help="encode in full only the sizes within N of the survey's pick (default 1); all: every type")
    q.add_argument("--report", help="write a JSON report (types, per-type sensitivity)")
    q.add_argument("--in-memory", action="store_true",
                   help="hold the whole model (default: a safetensors or GGUF model of a plain text LM is read "
                        "one decoder layer at a time; the same file either way)")
    add_runtime_flags(q)
    q.set_defaults(fn=_cmd_quantize)

    m = sub.add_parser("imatrix", help="write a llama.cpp imatrix (GGUF format) from calibration text")
    m.add_argument("model")
    m.add_argument("-o", "--out", required=True)
    m.add_argument("--text", help="calibration text (.txt/.jsonl[.gz]); default: built-in slice")
    m.add_argument("--n-samples", type=positive_int, default=32)
    m.add_argument("--seq-len", type=positive_int, default=256)
    add_runtime_flags(m)
    m.set_defaults(fn=_cmd_imatrix)

