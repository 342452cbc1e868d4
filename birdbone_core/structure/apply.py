"""Every structural cut on a loaded model, in order: vocabulary, layers, FFN neurons / KV groups, healing.
Shared by `birdbone structure` and a run's `structure:` recipe section (birdbone_core.steps)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.export.vocab import GGUFTokenizer, read_gguf_tokenizer
from birdbone_core.heal.config import Heal
from birdbone_core.heal.distill import heal_distill, restrict_cache, teacher_topk
from birdbone_core.progress import console
from birdbone_core.structure.config import Structure
from birdbone_core.structure.depth import drop_layers
from birdbone_core.structure.tokenizers import trim_vocab
from birdbone_core.structure.vocab import renumber
from birdbone_core.structure.width import PER_LAYER_FFN, prune_width

HEAL_TOP_K = 64   # teacher logits kept per position for healing


@dataclass
class Structured:
    record: dict                          # structure.json: what went, in the original numbering
    tokenizer: Any                        # the HF tokenizer of the cut model
    gguf_tokenizer: GGUFTokenizer | None  # llama.cpp's tokenizer of the cut model (a GGUF source only)


def apply_structure(model: torch.nn.Module, tokenizer: Any, cfg: Structure, blocks: torch.Tensor, *,
                    corpus: tuple[str, str] | None = None, source_gguf: Path | None = None) -> Structured:
    """Cut `model` in place. blocks [n, seq_len]: calibration windows (scoring and healing), in the uncut
    tokenizer's ids; corpus: (text, description) for a vocabulary cut; source_gguf: the GGUF the model
    came from (its tokenizer is trimmed alongside)."""
    if cfg.per_layer and model.config.model_type not in PER_LAYER_FFN:   # before any work
        raise BirdboneError(f"per_layer: llama.cpp builds every {model.config.model_type} layer with layer 0's "
                            f"sizes; per-layer FFN widths are for {', '.join(PER_LAYER_FFN)} models (llama.cpp's deci)")
    gguf_tok = read_gguf_tokenizer(source_gguf) if source_gguf is not None else None
    n_vocab = model.get_input_embeddings().weight.shape[0]
    record: dict = {"config": cfg.model_dump(), "params_before": sum(p.numel() for p in model.parameters())}
    # healing distils the uncut model: its top-k logits on the calibration blocks, taken before any cut
    teacher = teacher_topk(model, blocks, HEAL_TOP_K, batch_size=4) if cfg.heal_steps else None
    if cfg.vocab is not None:
        text, desc = corpus if corpus is not None else ("", "")
        trim = trim_vocab(model, tokenizer, text, keep=cfg.vocab or None,
                          gguf=(source_gguf, gguf_tok) if gguf_tok is not None else None,
                          required=blocks.unique().tolist())
        tokenizer, gguf_tok = trim.tokenizer, trim.gguf_tokenizer
        blocks = renumber(blocks, trim.record.kept, n_vocab)
        if teacher is not None:
            teacher = restrict_cache(teacher, trim.record.kept, n_vocab)
        record["vocab"] = {"corpus": desc, **trim.summary(), "kept_ids": trim.record.kept}
        console().print(f"vocabulary: {n_vocab} -> {len(trim.record.kept)} tokens "
                        f"({trim.corpus_distinct} distinct in the corpus); the corpus tokenizes "
                        + ("identically" if trim.corpus_identical else "DIFFERENTLY (see structure.json)"))
    if cfg.layers:
        drop, scores = drop_layers(model, blocks, cfg.layers, metric=cfg.metric)
        record["layers"] = {"removed": list(drop.removed), "of": drop.n_layers_before, "metric": cfg.metric,
                            "scores": [round(float(s), 6) for s in scores.by(cfg.metric)]}
        console().print(f"dropped layers {list(drop.removed)} of {drop.n_layers_before} (lowest {cfg.metric})")
    if cfg.ffn or cfg.heads:
        r = prune_width(model, blocks, ffn=cfg.ffn, heads=cfg.heads, multiple=cfg.multiple,
                        per_layer=cfg.per_layer).record
        record["width"] = {"ffn": cfg.ffn, "heads": cfg.heads, "multiple": cfg.multiple,
                           "sizes_before": r.original, "sizes_after": r.pruned,
                           "ffn_removed": r.ffn_removed, "kv_heads_removed": r.kv_heads_removed}
        console().print(f"width: {r.original} -> {r.pruned}")
    if teacher is not None:
        heal = Heal(method="distill", steps=cfg.heal_steps, lr=cfg.heal_lr, batch_size=4, top_k=HEAL_TOP_K)
        rep = heal_distill(model, None, blocks, heal, cache=teacher, description="healing (distillation)")
        record["heal"] = {"method": "distill", "steps": rep.steps, "lr": rep.lr, "kl_before": rep.kl_before,
                          "kl_after": rep.kl_after, "seconds": round(rep.seconds, 1)}
        console().print(f"healed: top-{HEAL_TOP_K} KL to the uncut model {rep.kl_before:.4f} -> "
                        f"{rep.kl_after:.4f} ({rep.steps} steps, {rep.seconds:.0f} s)")
    record["params_after"] = sum(p.numel() for p in model.parameters())
    return Structured(record, tokenizer, gguf_tok)


STRUCTURE_JSON = "structure.json"   # what went, in the original numbering, beside the cut model


def save_structured(model: torch.nn.Module, cut: Structured, out: Path, record: dict, *, mark: bool = False) -> Path:
    """The cut model's directory: the HF model and tokenizer, llama.cpp's tokenizer as `tokenizer.gguf`
    (a GGUF source only; GGUF export copies it) and `structure.json` (`record`)."""
    from birdbone_core import atomic
    from birdbone_core.export.vocab import TOKENIZER_GGUF, write_tokenizer_gguf
    from birdbone_core.model.save import save_hf

    save_hf(model.to("cpu"), cut.tokenizer, out, mark=mark)
    if cut.gguf_tokenizer is not None:
        write_tokenizer_gguf(cut.gguf_tokenizer, out / TOKENIZER_GGUF)
    atomic.write_json(out / STRUCTURE_JSON, record)
    return out
