"""`birdbone structure`: cut the vocabulary, whole layers, FFN neurons and KV head groups from a model.

    birdbone structure MODEL -o OUT [--vocab 32768 [--vocab-corpus FILE]] [--layers N] [--ffn 0.3]
                                    [--heads 0.25] [--metric angular|bi|kl]

Vocabulary first (the LM head is the largest matmul of a small model, and every later calibration forward
pays for it), then depth (fewer layers to score for width), then width. OUT is a Hugging Face directory
(the model, its tokenizer, `tokenizer.gguf` when the source was a GGUF, and structure.json: what was
removed, in the original numbering) that every other command takes: `birdbone quantize OUT -o model.gguf
--bpw 4.5`, `birdbone eval OUT --reference MODEL`.
"""
from __future__ import annotations

from pathlib import Path

from birdbone_core.cliargs import add_runtime_flags, positive_int, runtime_of

HEAL_TOP_K = 64   # teacher logits kept per position for healing


def _ratio(text: str) -> float:
    import argparse

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a share of units to remove, in [0, 1)")
    return v


def _vocab_size(text: str) -> int:
    import argparse

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v != 0 and v < 256:
        raise argparse.ArgumentTypeError(f"{v} tokens is fewer than the 256 byte tokens every vocabulary keeps")
    return v


def _cmd_structure(a) -> int:
    from birdbone_core import atomic
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.errors import BirdboneError
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.export.vocab import TOKENIZER_GGUF, read_gguf_tokenizer, write_tokenizer_gguf
    from birdbone_core.heal.config import Heal
    from birdbone_core.heal.distill import heal_distill, restrict_cache, teacher_topk
    from birdbone_core.model.gguf_header import written_by_birdbone
    from birdbone_core.model.save import save_hf
    from birdbone_core.runtime import place
    from birdbone_core.steps import load_with_options
    from birdbone_core.structure.depth import drop_layers
    from birdbone_core.structure.tokenizers import trim_vocab
    from birdbone_core.structure.vocab import renumber
    from birdbone_core.structure.width import prune_width

    if a.heal_steps < 0 or (a.heal_lr is not None and not 0 < a.heal_lr <= 1):
        raise BirdboneError("--heal-steps must be >= 0 and --heal-lr in (0, 1]")
    if a.layers == 0 and a.ffn == 0 and a.heads == 0 and a.vocab is None:
        raise BirdboneError("nothing to remove: give --vocab, --layers, --ffn and/or --heads")
    out = Path(a.out)
    atomic.check_output_dir(out, "output model directory")
    if a.gguf:
        atomic.check_output_file(Path(a.gguf), "GGUF", written_by_birdbone)
    corpus = read_text(a.vocab_corpus, "calib") if a.vocab is not None else None
    text, text_desc = read_text(a.text, "calib")
    lm = load_with_options(a.model, {}, place(runtime_of(a)))
    blocks = calibration_blocks(lm.tokenizer, text, a.n_samples, a.seq_len, 0)
    n_vocab = lm.model.get_input_embeddings().weight.shape[0]
    # healing distils the dense model: its top-k logits on the calibration blocks, taken before any cut
    teacher = teacher_topk(lm.model, blocks, HEAL_TOP_K, batch_size=4) if a.heal_steps else None
    source_gguf = Path(a.model) if a.model.endswith(".gguf") else None
    gguf_tok = read_gguf_tokenizer(source_gguf) if source_gguf is not None else None
    params = sum(p.numel() for p in lm.model.parameters())
    record: dict = {"source": a.model, "calibration": {"text": text_desc, "n_samples": a.n_samples,
                                                       "seq_len": a.seq_len}, "params_before": params}
    if corpus is not None:
        trim = trim_vocab(lm.model, lm.tokenizer, corpus[0], keep=a.vocab or None,
                          gguf=(source_gguf, gguf_tok) if gguf_tok is not None else None,
                          required=blocks.unique().tolist())
        lm.tokenizer, gguf_tok = trim.tokenizer, trim.gguf_tokenizer
        blocks = renumber(blocks, trim.record.kept, n_vocab)
        if teacher is not None:
            teacher = restrict_cache(teacher, trim.record.kept, n_vocab)
        record["vocab"] = {"corpus": corpus[1], **trim.summary(), "kept_ids": trim.record.kept}
        print(f"vocabulary: {trim.record.n_before} -> {len(trim.record.kept)} tokens "
              f"({trim.summary()['corpus_distinct_tokens']} distinct in the corpus); the corpus tokenizes "
              + ("identically" if trim.corpus_identical else "DIFFERENTLY (see structure.json)"))
    if a.layers:
        drop, scores = drop_layers(lm.model, blocks, a.layers, metric=a.metric)
        record["layers"] = {"removed": list(drop.removed), "of": drop.n_layers_before, "metric": a.metric,
                            "scores": [round(float(s), 6) for s in scores.by(a.metric)]}
        print(f"dropped layers {list(drop.removed)} of {drop.n_layers_before} (lowest {a.metric})")
    if a.ffn or a.heads:
        rep = prune_width(lm.model, blocks, ffn=a.ffn, heads=a.heads, multiple=a.multiple)
        r = rep.record
        record["width"] = {"ffn": a.ffn, "heads": a.heads, "multiple": a.multiple,
                           "sizes_before": r.original, "sizes_after": r.pruned,
                           "ffn_removed": r.ffn_removed, "kv_heads_removed": r.kv_heads_removed}
        print(f"width: {r.original} -> {r.pruned}")
    if teacher is not None:
        cfg = Heal(method="distill", steps=a.heal_steps, lr=a.heal_lr, batch_size=4, top_k=HEAL_TOP_K)
        rep = heal_distill(lm.model, None, blocks, cfg, cache=teacher, description="healing (distillation)")
        record["heal"] = {"method": "distill", "steps": rep.steps, "lr": rep.lr, "kl_before": rep.kl_before,
                          "kl_after": rep.kl_after, "seconds": round(rep.seconds, 1)}
        print(f"healed: top-{HEAL_TOP_K} KL to the dense model {rep.kl_before:.4f} -> {rep.kl_after:.4f} "
              f"({rep.steps} steps, {rep.seconds:.0f} s)")
    record["params_after"] = sum(p.numel() for p in lm.model.parameters())
    save_hf(lm.model.to("cpu"), lm.tokenizer, out, mark=True)
    if gguf_tok is not None:    # llama.cpp's tokenizer travels with the model (GGUF export copies it)
        write_tokenizer_gguf(gguf_tok, out / TOKENIZER_GGUF)
    atomic.write_json(out / "structure.json", record)
    if a.gguf:
        res = export_gguf(lm.model, lm.tokenizer, Path(a.gguf), out_type=a.gguf_type,
                          source_gguf=out / TOKENIZER_GGUF if gguf_tok is not None else None)
        print(f"wrote {res.path}: {res.n_bytes:,} bytes ({a.gguf_type})")
    print(f"{record['params_before'] / 1e6:.1f}M -> {record['params_after'] / 1e6:.1f}M parameters; wrote {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("structure", help="remove whole layers, FFN neurons and KV head groups (llama.cpp runs "
                                         "the result faster)")
    p.add_argument("model", help="HF dir or .gguf file")
    p.add_argument("-o", "--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--vocab", type=_vocab_size, default=None, metavar="N",
                   help="keep N tokens: those the corpus needs, then the most common (0: only what the corpus "
                        "needs); the corpus tokenizes exactly as before")
    p.add_argument("--vocab-corpus", help="domain text for --vocab (.txt/.jsonl[.gz]; default: the built-in "
                                          "calibration slice)")
    p.add_argument("--layers", type=int, default=0, help="decoder layers to drop (never the first or last)")
    p.add_argument("--ffn", type=_ratio, default=0.0, help="share of FFN neurons to remove in every layer")
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
    p.add_argument("--gguf", metavar="FILE", help="also write the result as a GGUF file stock llama.cpp runs "
                                                  "(or quantize OUT later: birdbone quantize OUT -o F --bpw 4.5)")
    p.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"), default="q8_0", help="type of --gguf")
    p.add_argument("--text", help="calibration text (.txt/.jsonl[.gz]; default: the built-in slice)")
    p.add_argument("--n-samples", type=positive_int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per calibration window")
    add_runtime_flags(p)
    p.set_defaults(fn=_cmd_structure)

