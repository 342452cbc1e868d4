"""Every structural cut on a loaded model, in waves: vocabulary (first wave), layers, FFN neurons / KV groups,
healing, then the stop-loss, which reverts a wave that cost too much exactly and ends the cutting.
Shared by `birdbone structure` and a run's `structure:` recipe section (birdbone_core.steps)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.export.vocab import GGUFTokenizer, read_gguf_tokenizer
from birdbone_core.heal.config import Heal
from birdbone_core.heal.distill import heal_distill, restrict_cache, teacher_topk
from birdbone_core.model.layers import decoder_layers
from birdbone_core.progress import console
from birdbone_core.structure.config import Structure
from birdbone_core.structure.depth import drop_layers, revert_drop
from birdbone_core.structure.records import saved_state
from birdbone_core.structure.tokenizers import trim_vocab
from birdbone_core.structure.vocab import renumber, restore_embeddings
from birdbone_core.structure.width import PER_LAYER_FFN, current_widths, prune_width, restore_width
from birdbone_core.structure.width_scores import model_dims

HEAL_TOP_K = 64   # teacher logits kept per position for healing


@dataclass
class Structured:
    record: dict                          # structure.json: what went (each wave in the numbering it saw)
    tokenizer: Any                        # the HF tokenizer of the cut model
    gguf_tokenizer: GGUFTokenizer | None  # llama.cpp's tokenizer of the cut model (a GGUF source only)


@dataclass(frozen=True)
class WaveCut:
    """One wave's cuts: shares are cumulative, of the original units, after the wave."""
    vocab: bool      # the vocabulary cut (first wave only)
    layers: int      # decoder layers dropped in this wave
    ffn: float       # share of the original FFN neurons gone after this wave
    heads: float     # share of the original KV head groups gone after this wave


def plan_waves(cfg: Structure) -> list[WaveCut]:
    """cfg's cuts in cfg.waves even steps: layers spread as evenly as whole layers go, shares linearly."""
    n = cfg.waves
    return [WaveCut(i == 0 and cfg.vocab is not None, cfg.layers * (i + 1) // n - cfg.layers * i // n,
                    cfg.ffn * (i + 1) / n, cfg.heads * (i + 1) / n) for i in range(n)]


def _share_now(done: int, total0: int, share: float, multiple: int) -> float:
    """The share of the `done` units left that takes them to (1 - share) of the original total0, rounded
    as the width cut rounds (0: nothing to remove in this wave)."""
    keep = multiple * round((1.0 - share) * total0 / multiple) if multiple else round((1.0 - share) * total0)
    return 0.0 if share == 0 or keep >= done else 1.0 - keep / done


@dataclass
class _Live:
    """What the waves carry besides the model: restored as a whole when a wave is rolled back."""
    tokenizer: Any
    gguf_tok: GGUFTokenizer | None
    blocks: torch.Tensor
    teacher: Any


def apply_structure(model: torch.nn.Module, tokenizer: Any, cfg: Structure, blocks: torch.Tensor, *,
                    corpus: tuple[str, str] | None = None, source_gguf: Path | None = None,
                    held: tuple[str, str] | None = None, records: Path | None = None) -> Structured:
    """Cut `model` in place, in cfg.waves waves. blocks [n, seq_len]: calibration windows (scoring and
    healing), in the uncut tokenizer's ids; corpus: (text, description) for a vocabulary cut; source_gguf:
    the GGUF the model came from (its tokenizer is trimmed alongside); held: (held-out text, description),
    scored in bits per byte after every wave (needed by cfg.stop_loss); records: a directory that receives
    every wave's record (birdbone_core.structure.records)."""
    if cfg.per_layer and model.config.model_type not in PER_LAYER_FFN:   # before any work
        raise BirdboneError(f"per_layer: llama.cpp builds every {model.config.model_type} layer with layer 0's "
                            f"sizes; per-layer widths are for {', '.join(PER_LAYER_FFN)} models (llama.cpp's deci)")
    if cfg.stop_loss is not None and held is None:
        raise BirdboneError("structure.stop_loss needs held-out text to score each wave")
    from birdbone_core.eval.perplexity import bits_per_byte

    record: dict = {"config": cfg.model_dump(), "params_before": sum(p.numel() for p in model.parameters())}
    # healing distils the uncut model: its top-k logits on the calibration blocks, taken before any cut
    teacher = teacher_topk(model, blocks, HEAL_TOP_K, batch_size=4) if cfg.heal_steps else None
    live = _Live(tokenizer, read_gguf_tokenizer(source_gguf) if source_gguf is not None else None, blocks, teacher)
    held_text, held_desc = held if held is not None else (None, None)
    scored = bits_per_byte(model, tokenizer, held_text) if held is not None else None
    bpb0 = scored["bits_per_byte"] if scored is not None else None
    d0 = model_dims(model) if (cfg.ffn or cfg.heads) else None
    record["waves"] = []
    keep_before = records is not None or cfg.stop_loss is not None   # a record or a rollback reads it
    for k, cut in enumerate(plan_waves(cfg), 1):
        before = {n: t.clone() for n, t in saved_state(model).items()} if keep_before else {}
        config_before = model.config.to_dict()
        gen = getattr(model, "generation_config", None)
        gen_before = {"generation_config_before": gen.to_dict()} if gen is not None else {}   # ids follow a trim
        prev = _Live(live.tokenizer, live.gguf_tok, live.blocks, live.teacher)
        wave, undo, kept_layers = _cut(model, cfg, cut, k, d0, live, corpus, source_gguf)
        if live.teacher is not None:
            heal = Heal(method="distill", steps=cfg.heal_steps, lr=cfg.heal_lr, batch_size=4, top_k=HEAL_TOP_K)
            rep = heal_distill(model, None, live.blocks, heal, cache=live.teacher,
                               description=f"structure wave {k}/{cfg.waves}: healing (distillation)")
            wave["heal"] = {"method": "distill", "steps": rep.steps, "lr": rep.lr, "kl_before": rep.kl_before,
                            "kl_after": rep.kl_after, "seconds": round(rep.seconds, 1)}
            console().print(f"healed: top-{HEAL_TOP_K} KL to the uncut model {rep.kl_before:.4f} -> "
                            f"{rep.kl_after:.4f} ({rep.steps} steps, {rep.seconds:.0f} s)")
        wave["decision"] = "accept"
        if held is not None:
            wave["bits_per_byte"] = bpb = bits_per_byte(model, live.tokenizer, held_text)["bits_per_byte"]
            if cfg.stop_loss is not None and bpb > bpb0 * (1 + cfg.stop_loss):
                for fn in reversed(undo):        # exact: the cuts' own records, then the weights before
                    fn()
                model.load_state_dict(before, strict=False)
                live = prev
                wave["decision"] = "rollback"
                wave["reason"] = (f"held-out bits per byte {bpb:.4f} is {bpb / bpb0 - 1:+.1%} over the uncut "
                                  f"model's {bpb0:.4f} (stop_loss {cfg.stop_loss:.1%}): wave {k} reverted")
                console().print(wave["reason"])
        if records is not None:
            from birdbone_core.structure.records import layer_renames, write_wave

            after = saved_state(model)
            renames = layer_renames(list(before), kept_layers) if wave["decision"] == "accept" else \
                {n: n for n in before}
            write_wave(records, k, {**wave, **gen_before},
                       before, after, renames, config_before,
                       prev.tokenizer if cut.vocab and wave["decision"] == "accept" else None,
                       prev.gguf_tok if cut.vocab and wave["decision"] == "accept" else None)
        del before
        record["waves"].append(wave)
        if wave["decision"] != "accept":
            break
    _summarise(record)
    if scored is not None:
        last = [w["bits_per_byte"] for w in record["waves"] if w["decision"] == "accept"]
        record["held_out"] = {"text": held_desc, "bits_per_byte_before": bpb0, "bits_per_byte_after": last[-1] if last else bpb0,
                              "bytes": scored["bytes"]}
    record["params_after"] = sum(p.numel() for p in model.parameters())
    return Structured(record, live.tokenizer, live.gguf_tok)


def _cut(model, cfg: Structure, cut: WaveCut, k: int, d0, live: _Live, corpus, source_gguf):
    """One wave's cuts on `model` and `live`, in place: (the wave's record, undo callables in the order
    made, the kept layers' indices before the wave)."""
    wave: dict = {"wave": k}
    undo: list = []
    kept_layers = list(range(len(decoder_layers(model))))
    if cut.vocab:
        n_vocab = model.get_input_embeddings().weight.shape[0]
        text, desc = corpus if corpus is not None else ("", "")
        trim = trim_vocab(model, live.tokenizer, text, keep=cfg.vocab or None,
                          gguf=(source_gguf, live.gguf_tok) if live.gguf_tok is not None else None,
                          required=live.blocks.unique().tolist())
        undo.append(lambda rec=trim.record: restore_embeddings(model, rec))
        live.tokenizer, live.gguf_tok = trim.tokenizer, trim.gguf_tokenizer
        live.blocks = renumber(live.blocks, trim.record.kept, n_vocab)
        if live.teacher is not None:
            live.teacher = restrict_cache(live.teacher, trim.record.kept, n_vocab)
        wave["vocab"] = {"corpus": desc, **trim.summary(), "kept_ids": trim.record.kept}
        console().print(f"vocabulary: {n_vocab} -> {len(trim.record.kept)} tokens "
                        f"({trim.corpus_distinct} distinct in the corpus); the corpus tokenizes "
                        + ("identically" if trim.corpus_identical else "DIFFERENTLY (see structure.json)"))
    if cut.layers:
        drop, scores = drop_layers(model, live.blocks, cut.layers, metric=cfg.metric)
        undo.append(lambda rec=drop: revert_drop(model, rec))
        kept_layers = [i for i in kept_layers if i not in set(drop.removed)]
        wave["layers"] = {"removed": list(drop.removed), "of": drop.n_layers_before, "metric": cfg.metric,
                          "scores": [round(float(s), 6) for s in scores.by(cfg.metric)]}
        console().print(f"wave {k}: dropped layers {list(drop.removed)} of {drop.n_layers_before} (lowest {cfg.metric})")
    ffn = heads = 0.0
    if d0 is not None:     # this wave's shares of what is left, so that the waves add up to cfg's shares
        n_layer, widths = len(decoder_layers(model)), current_widths(model)
        ffn = _share_now(widths["intermediate_size"] * n_layer, d0.n_ff * n_layer, cut.ffn,
                         0 if cfg.per_layer else cfg.multiple * n_layer)
        heads = _share_now(widths["num_key_value_heads"] * n_layer, d0.n_kv * n_layer, cut.heads,
                           0 if cfg.per_layer else n_layer)
    if ffn or heads:
        r = prune_width(model, live.blocks, ffn=ffn, heads=heads, multiple=cfg.multiple,
                        per_layer=cfg.per_layer).record
        undo.append(lambda rec=r: restore_width(model, rec))
        wave["width"] = {"ffn": ffn, "heads": heads, "multiple": cfg.multiple, "sizes_before": r.original,
                         "sizes_after": r.pruned, "ffn_removed": r.ffn_removed, "kv_heads_removed": r.kv_heads_removed}
        console().print(f"wave {k}: width {r.original} -> {r.pruned}")
    return wave, undo, kept_layers


def _summarise(record: dict) -> None:
    """structure.json's whole-cut keys (vocab, layers, width, heal) from the accepted waves."""
    accepted = [w for w in record["waves"] if w["decision"] == "accept"]
    for w in accepted:
        if "vocab" in w:
            record["vocab"] = w["vocab"]
        if "layers" in w:
            prev = record.get("layers")
            record["layers"] = {**w["layers"], "removed_by_wave": [*(prev or {}).get("removed_by_wave", []),
                                                                    w["layers"]["removed"]]}
        if "heal" in w:
            record["heal"] = {**w["heal"], "steps": sum(x.get("heal", {}).get("steps", 0) for x in accepted)}
    widths = [w["width"] for w in accepted if "width" in w]
    if widths:
        record["width"] = {**widths[-1], "sizes_before": widths[0]["sizes_before"], "ffn": record["config"]["ffn"],
                           "heads": record["config"]["heads"]}


STRUCTURE_JSON = "structure.json"   # what went (each wave in the numbering it found), beside the cut model


@contextmanager
def records_staging(out: Path) -> Iterator[Path]:
    """An empty directory beside `out` for the waves' records while the cut runs; save_structured moves them
    into `out`. Gone on exit, whatever happened (and what a crashed cut left there is cleared first)."""
    tmp = out.parent / f".{out.name}.waves"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_structured(model: torch.nn.Module, cut: Structured, out: Path, record: dict, *, mark: bool = False,
                    records: Path | None = None) -> Path:
    """The cut model's directory: the HF model and tokenizer, llama.cpp's tokenizer as `tokenizer.gguf`
    (a GGUF source only; GGUF export copies it), the waves' records (from `records`, see records_staging) and,
    last, `structure.json` (`record`)."""
    from birdbone_core import atomic
    from birdbone_core.export.vocab import TOKENIZER_GGUF, write_tokenizer_gguf
    from birdbone_core.model.save import save_hf
    from birdbone_core.structure.records import WAVES

    save_hf(model.to("cpu"), cut.tokenizer, out, mark=mark)
    if cut.gguf_tokenizer is not None:
        write_tokenizer_gguf(cut.gguf_tokenizer, out / TOKENIZER_GGUF)
    if records is not None and (records / WAVES).is_dir():
        os.replace(records / WAVES, out / WAVES)
    atomic.write_json(out / STRUCTURE_JSON, record)
    return out
