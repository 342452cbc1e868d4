"""`birdbone structure`: cut the vocabulary, whole layers, FFN neurons and KV head groups from a model.

    birdbone structure MODEL -o OUT [--vocab 32768 [--vocab-corpus FILE]] [--layers N] [--ffn 0.3]
                                    [--heads 0.25] [--metric angular|bi|kl]
                                    [--waves N --heal-steps S [--stop-loss 0.05]]

Vocabulary first (the LM head is the largest matmul of a small model, and every later calibration forward
pays for it), then depth (fewer layers to score for width), then width. OUT is a Hugging Face directory
(the model, its tokenizer, `tokenizer.gguf` when the source was a GGUF, and structure.json: what was
removed, each wave in the numbering it found; waves/: every wave's record) that every other command takes:
`birdbone quantize OUT -o model.gguf --bpw 4.5`, `birdbone eval OUT --reference MODEL`, and
`birdbone revert OUT --structure K -o DIR` for the exact model after wave K (0: the uncut model).
"""
from __future__ import annotations

from pathlib import Path

from birdbone_core.cliargs import add_runtime_flags, positive_int, runtime_of


def _ratio(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of units to remove, in [0, 1)")
    return v


def _cmd_structure(a) -> int:
    from pydantic import ValidationError

    from birdbone_core import atomic
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.errors import BirdboneError
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.export.vocab import TOKENIZER_GGUF
    from birdbone_core.model.gguf_header import written_by_birdbone
    from birdbone_core.run_init import load_with_options
    from birdbone_core.runtime import place
    from birdbone_core.structure.apply import apply_structure, records_staging, save_structured
    from birdbone_core.structure.config import Structure

    try:
        cfg = Structure(vocab=a.vocab, vocab_corpus=a.vocab_corpus, layers=a.layers, ffn=a.ffn, heads=a.heads,
                        per_layer=a.per_layer, metric=a.metric, multiple=a.multiple, heal_steps=a.heal_steps,
                        heal_lr=a.heal_lr, waves=a.waves, stop_loss=a.stop_loss)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise BirdboneError(f"{'--' + where.replace('_', '-') + ': ' if where else ''}"
                            f"{first['msg'].removeprefix('Value error, ')}") from None
    out = Path(a.out)
    atomic.check_output_dir(out, "output model directory")
    if a.gguf:
        atomic.check_output_file(Path(a.gguf), "GGUF", written_by_birdbone)
    corpus = read_text(cfg.vocab_corpus, "calib") if cfg.vocab is not None else None
    text, text_desc = read_text(a.text, "calib")
    held = read_text(a.held_out, "eval")                           # (text, description)
    lm = load_with_options(a.model, {}, place(runtime_of(a)))
    source_gguf = Path(a.model) if a.model.endswith(".gguf") else None
    blocks = calibration_blocks(lm.tokenizer, text, a.n_samples, a.seq_len, 0)
    with records_staging(out) as records:
        cut = apply_structure(lm.model, lm.tokenizer, cfg, blocks, corpus=corpus, source_gguf=source_gguf,
                              held=held, records=records)
        record = {"source": a.model, "calibration": {"text": text_desc, "n_samples": a.n_samples,
                                                     "seq_len": a.seq_len}, **cut.record}
        save_structured(lm.model, cut, out, record, mark=True, records=records)
    print(f"{record['params_before'] / 1e6:.1f}M -> {record['params_after'] / 1e6:.1f}M parameters; wrote {out}")
    if a.gguf:
        res = export_gguf(lm.model, cut.tokenizer, Path(a.gguf), out_type=a.gguf_type,
                          source_gguf=out / TOKENIZER_GGUF if cut.gguf_tokenizer is not None else None)
        print(f"wrote {res.path}: {res.n_bytes:,} bytes ({a.gguf_type})")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("structure", help="remove whole layers, FFN neurons and KV head groups (llama.cpp runs "
                                         "the result faster)")
    p.add_argument("model", help="HF dir or .gguf file")
    p.add_argument("-o", "--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--vocab", type=int, default=None, metavar="N",
                   help="keep N tokens: those the corpus needs, then the most common (0: only what the corpus "
                        "needs); the corpus tokenizes exactly as before")
    p.add_argument("--vocab-corpus", help="domain text for --vocab (.txt/.jsonl[.gz]; default: the built-in "
                                          "calibration slice)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers to drop (never the first or last)")
    p.add_argument("--ffn", type=_ratio, default=0.0, help="share of FFN neurons to remove in every layer")
    p.add_argument("--per-layer", action="store_true",
                   help="--ffn and --heads by one ranking over all layers: each layer keeps its own width and KV "
                        "head count (llama/mistral only; the GGUF is llama.cpp's deci architecture)")
    p.add_argument("--heads", type=_ratio, default=0.0, help="share of KV head groups to remove in every layer")
    p.add_argument("--metric", choices=("angular", "bi", "kl"), default="angular",
                   help="layer importance: angular distance, block influence (1 - cos), or the logits' KL "
                        "with the layer skipped")
    p.add_argument("--multiple", type=positive_int, default=32,
                   help="kept widths are multiples of this (32: Q4_0/Q8_0 blocks; 256 for K-quants)")
    p.add_argument("--heal-steps", type=int, default=0, metavar="N",
                   help="after the cuts, N steps of distillation from the dense model's top-k logits on the "
                        "calibration windows (0: no healing)")
    p.add_argument("--heal-lr", type=float, default=None, help="healing learning rate (default 3e-5)")
    p.add_argument("--waves", type=positive_int, default=1,
                   help="cut layers / FFN / heads in N even waves, each healed by --heal-steps and checked by "
                        "--stop-loss (the vocabulary goes with the first)")
    p.add_argument("--stop-loss", type=float, default=None, metavar="SHARE",
                   help="revert (exactly) the first wave whose held-out bits per byte rise more than SHARE over "
                        "the uncut model's, and stop there (e.g. 0.05)")
    p.add_argument("--held-out", help="held-out text for bits per byte after each wave (default: the built-in "
                                      "held-out slice)")
    p.add_argument("--gguf", metavar="FILE", help="also write the result as a GGUF file stock llama.cpp runs "
                                                  "(or quantize OUT later: birdbone quantize OUT -o F --bpw 4.5)")
    p.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="q8_0", help="type of --gguf")
    p.add_argument("--text", help="calibration text (.txt/.jsonl[.gz]; default: the built-in slice)")
    p.add_argument("--n-samples", type=positive_int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration window")
    add_runtime_flags(p)
    p.set_defaults(fn=_cmd_structure)

