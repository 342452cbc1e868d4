"""Structured compression against llama.cpp's own quants, scored the way a llama.cpp user sees a file:
size, llama-bench speed, held-out bits per byte (comparable across tokenizers), matmul FLOPs per token.

    python tests/benchmarks/structured.py [--model GGUF] [--out tests/benchmarks/results] [--threads 1]

Every GGUF in the table is quantized by stock llama-quantize with an imatrix that llama-imatrix computed
on that very model from the same calibration text, so the structured points differ from llama.cpp's only
in their structure:
- llama.cpp: the dense model (birdbone's F16 export of the source) -> Q8_0, Q4_K_M, Q4_K_M with a q4_0
  token embedding (the "169 MB point");
- birdbone: vocabulary trimmed to the tokens the calibration text needs, filled up to N by the tokenizer's
  prior (`birdbone_core.structure.tokenizers.trim_vocab`), optionally FFN neurons / layers removed
  (unhealed), then the same Q4_K_M (+ q4_0 embedding) recipe.
Speed: `llama-bench -p 128 -n 64 -r 3`, one thread unless --threads, one file after another in one run.
Bits per byte: 8 held-out segments of >= 2 KB each, each tokenized by the file's own tokenizer and scored
from BOS (`birdbone_core.eval.llamacpp.llama_bits_per_byte`). FLOPs: 2 x the weights of every matmul per
token (the embedding lookup is not one; a tied head is). The trimmed files are also checked: the
calibration text tokenizes to the same pieces under llama.cpp, and the share of held-out text that does
not is reported with examples.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

# (name, vocab tokens kept or None, layers dropped, FFN share removed, llama-quantize variant)
POINTS = [
    ("dense Q8_0", None, 0, 0.0, "Q8_0"),
    ("dense Q4_K_M", None, 0, 0.0, "Q4_K_M"),
    ("dense Q4_K_M-emb_q4_0", None, 0, 0.0, "Q4_K_M-emb_q4_0"),
    ("vocab 32k Q4_K_M", 32768, 0, 0.0, "Q4_K_M"),
    ("vocab 16k Q4_K_M", 16384, 0, 0.0, "Q4_K_M"),
    ("vocab 16k Q4_K_M-emb_q4_0", 16384, 0, 0.0, "Q4_K_M-emb_q4_0"),
    ("vocab 8k Q4_K_M", 8192, 0, 0.0, "Q4_K_M"),
    ("vocab 16k + FFN -25% Q4_K_M", 16384, 0, 0.25, "Q4_K_M"),
    ("vocab 8k + FFN -50% + 2 layers Q4_K_M", 8192, 2, 0.5, "Q4_K_M"),
]


def matmul_flops_per_token(model) -> int:
    """2 x weights of every nn.Linear (the LM head included, tied or not)."""
    import torch

    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    if head is not None and not any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        n += head.weight.numel()
    return 2 * n


def pieces(gguf: Path, text: str) -> list[str]:
    """llama.cpp's tokenization of `text` as token texts (ids differ between trimmed and full vocabularies)."""
    from birdbone_core.eval.llamacpp import open_llama

    with open_llama(gguf, vocab_only=True) as llm:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        return [llm._model.token_get_text(i) for i in ids]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in Gemma 3 270M")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/birdbone-structured"))
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import reference as ref
    import torch

    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.eval.llamacpp import llama_bits_per_byte
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.export.vocab import read_gguf_tokenizer, write_tokenizer_gguf
    from birdbone_core.model.default import default_model_path
    from birdbone_core.model.load import load_model
    from birdbone_core.structure.depth import drop_layers
    from birdbone_core.structure.tokenizers import tokenization_diff, trim_vocab
    from birdbone_core.structure.width import prune_width

    torch.set_num_threads(2)
    spec = a.model or str(default_model_path())
    base = load_model(spec)
    src_tok = read_gguf_tokenizer(Path(spec))
    calib, calib_desc = read_text(None, "calib")
    held, held_desc = read_text(None, "eval")
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "calib.txt").write_text(calib)
    dense_flops = matmul_flops_per_token(base.model)
    f16_cache: dict[tuple, Path] = {}
    rows = []
    for name, vocab, n_drop, ffn, variant in POINTS:
        t0 = time.perf_counter()
        key = (vocab, n_drop, ffn)
        row: dict = {"point": name, "vocab": vocab, "layers_dropped": n_drop, "ffn_removed": ffn, "quant": variant}
        if key not in f16_cache:
            model, tok, gtok = copy.deepcopy(base.model), base.tokenizer, src_tok
            if vocab:
                trim = trim_vocab(model, tok, calib, keep=vocab, gguf=(Path(spec), src_tok))
                tok, gtok = trim.tokenizer, trim.gguf_tokenizer
                row["vocab_trim"] = trim.summary()
            blocks = calibration_blocks(tok, calib, 16, 256, 0)
            if n_drop:
                rec, _ = drop_layers(model, blocks, n_drop, metric="angular")
                row["layers_removed"] = list(rec.removed)
            if ffn:
                prune_width(model, blocks, ffn=ffn)
            tag = f"v{vocab or 0}-d{n_drop}-f{int(ffn * 100)}"
            tok_path = write_tokenizer_gguf(gtok, a.work / f"{tag}.tokenizer.gguf")
            f16 = a.work / f"{tag}.f16.gguf"
            export_gguf(model, tok, f16, out_type="f16", source_gguf=tok_path)
            ref.llama_imatrix(f16, a.work / "calib.txt", a.work / f"{tag}.imatrix.gguf", n_ctx=512, chunks=32,
                              threads=2)
            if vocab:   # llama.cpp's own tokenizer on the trimmed file: corpus identical, held-out share
                base_f16 = f16_cache[(None, 0, 0.0)]
                row["calib_pieces_identical"] = pieces(f16, calib) == pieces(base_f16, calib)
                row["held_out_tokenization"] = tokenization_diff(lambda s: pieces(base_f16, s),
                                                                 lambda s: pieces(f16, s), held[:60000])
            row.update(layers=model.config.num_hidden_layers, intermediate_size=model.config.intermediate_size,
                       vocab_size=model.config.vocab_size, params=sum(p.numel() for p in model.parameters()),
                       flops_per_token=matmul_flops_per_token(model))
            f16_cache[key] = f16
            f16_cache[(key, "row")] = {k: row[k] for k in row if k not in ("point", "quant")}
            del model
        else:
            row.update({k: v for k, v in f16_cache[(key, "row")].items() if k not in row})
        f16 = f16_cache[key]
        tag = f16.name.removesuffix(".f16.gguf")
        out = a.work / f"{tag}.{variant}.gguf"
        ref.quantize_variant(f16, out, variant, a.work / f"{tag}.imatrix.gguf", threads=2)
        row["gguf_bytes"] = out.stat().st_size
        row.update(llama_bits_per_byte(out, held, n_threads=a.threads))
        row["gguf"] = str(out)
        row["flops_vs_dense"] = row["flops_per_token"] / dense_flops
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "held_out_tokenization"}), flush=True)
    del base
    for row in rows:    # all speeds last, back to back, with nothing else running in this process
        b = ref.bench(row["gguf"], threads=a.threads, n_prompt=128, n_gen=64, reps=3)
        row.update(pp_tps=b.get("pp_tps"), tg_tps=b.get("tg_tps"))
        print(f"{row['point']}: pp {row['pp_tps']:.0f} tok/s, tg {row['tg_tps']:.1f} tok/s", flush=True)
    write_results(a.out, Path(spec).stem, spec, held_desc, calib_desc, a.threads, rows)
    return 0


def write_results(out: Path, name: str, spec: str, held_desc: str, calib_desc: str, threads: int, rows: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"structured-{name}.json").write_text(json.dumps({"model": spec, "eval": held_desc, "calibration": calib_desc,
                                                             "threads": threads, "rows": rows}, indent=1))
    ref_row = next(r for r in rows if r["point"] == "dense Q4_K_M-emb_q4_0")
    lines = [f"# Structured compression vs llama.cpp's quants: {name}", "",
             f"Every file quantized by stock llama-quantize with an imatrix of that model ({calib_desc}); bits per "
             f"byte on {held_desc} (8 segments of >= 2 KB, each file's own tokenizer); llama-bench -p 128 -n 64 "
             f"-r 3, {threads} thread(s); same run, same machine. `python tests/benchmarks/structured.py`. "
             "Nothing was healed after a cut.", "",
             "| point | vocab | layers | FFN | GGUF MB | FLOPs/token vs dense | pp tok/s | tg tok/s | tg vs Q4_K_M-emb_q4_0 "
             "| bits/byte |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['vocab_size']} | {r['layers']} | {r['intermediate_size']} | "
                     f"{r['gguf_bytes'] / 1e6:.1f} | {r['flops_vs_dense']:.2f} | {r['pp_tps']:.0f} | {r['tg_tps']:.1f} | "
                     f"{r['tg_tps'] / ref_row['tg_tps']:.2f}x | {r['bits_per_byte']:.4f} |")
    lines += ["", "Tokenization of the trimmed files (llama.cpp's tokenizer):", ""]
    for r in rows:
        if r.get("held_out_tokenization") and r["quant"] == "Q4_K_M":
            h = r["held_out_tokenization"]
            lines.append(f"- {r['point']}: calibration text tokenizes identically: {r['calib_pieces_identical']}; "
                         f"held-out paragraphs tokenizing differently: {h['share_differing']:.1%} of bytes; e.g. "
                         f"{h['examples'][0]['before']} -> {h['examples'][0]['after']}" if h["examples"] else "")
    (out / f"structured-{name}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"structured-{name}.png", rows, name)
    print("\n".join(lines))


def plot(path: Path, rows: list, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (x, xlabel) in zip(axes, (("tg_tps", "decode tok/s (llama-bench tg64)"), ("gguf_bytes", "GGUF MB"))):
        for r in rows:
            xv = r[x] / (1e6 if x == "gguf_bytes" else 1)
            dense = r["vocab"] is None
            ax.scatter(xv, r["bits_per_byte"], marker="s" if dense else "o", color="tab:gray" if dense else "tab:blue")
            ax.annotate(r["point"], (xv, r["bits_per_byte"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits per byte (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("speed vs quality (right and down is better)")
    axes[1].set_title("size vs quality (left and down is better)")
    fig.suptitle(f"{name}: llama.cpp quants (squares) and birdbone structured points (circles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
