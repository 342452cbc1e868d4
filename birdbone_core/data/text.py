"""Text in, token blocks out: calibration samples and evaluation token streams.

Files: .txt, or .jsonl with a "text" field per line; either may be gzipped (.gz). No path means the
Python-docs slice shipped with the package (`calib` for calibration, `eval` for evaluation).
Tokenization is fixed: the whole text is tokenized once without special tokens; calibration samples are
seeded random windows of seq_len-1 tokens with BOS prepended, so the same (text, n, seq_len, seed)
always gives the same blocks.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from birdbone_core.data.corpus import shipped_path
from birdbone_core.errors import BirdboneError


def read_text(path: str | Path | None, default_slice: str) -> tuple[str, str]:
    """Return (text, description). `default_slice` names the shipped slice used when path is None."""
    if path is None:
        p = shipped_path(default_slice)
        return gzip.open(p, "rt", encoding="utf-8").read(), f"python-docs-3.11 [{default_slice}] (built-in)"
    p = Path(path)
    if not p.is_file():
        raise BirdboneError(f"{p}: text file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    stem_suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise BirdboneError(f"{p}: cannot read text ({e})") from None
    if stem_suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BirdboneError(f"{p}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise BirdboneError(f"{p}:{i}: each JSONL line needs a string field 'text'")
            texts.append(rec["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise BirdboneError(f"{p}: text file is empty")
    return raw, str(p)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text`, no special tokens. Shape [n_tokens], int64."""
    # long texts exceed model_max_length by design; we cut them ourselves
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """BOS id when the tokenizer prepends one (llama.cpp does the same from the GGUF's add_bos_token)."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return tokenizer.bos_token_id
    return None


def calibration_blocks(tokenizer, text: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Seeded random windows of the text, BOS first when the model uses BOS. Shape [n_samples, seq_len]."""
    ids = tokenize(tokenizer, text)
    bos = bos_id(tokenizer)
    body = seq_len - 1 if bos is not None else seq_len
    if len(ids) < body + 1:
        raise BirdboneError(
            f"calibration text has {len(ids)} tokens, fewer than one sample of seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (n_samples,), generator=gen)
    blocks = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        blocks = torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), blocks], dim=1)
    return blocks


MIN_N_CTX = 16                       # the half of each chunk that is scored must hold a few tokens


def evaluation_chunks(tokenizer, text: str, n_ctx: int, max_chunks: int | None) -> torch.Tensor:
    """llama-perplexity's chunking: consecutive n_ctx-token chunks of the whole text, the first token of
    each replaced by BOS when the model uses BOS. Shape [n_chunks, n_ctx]."""
    if n_ctx < MIN_N_CTX:
        raise BirdboneError(f"n_ctx={n_ctx}: an evaluation chunk needs at least {MIN_N_CTX} tokens")
    ids = tokenize(tokenizer, text)
    n_chunks = len(ids) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise BirdboneError(f"evaluation text has {len(ids)} tokens, fewer than one chunk of n_ctx={n_ctx}")
    chunks = ids[: n_chunks * n_ctx].view(n_chunks, n_ctx).clone()
    bos = bos_id(tokenizer)
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def text_segments(text: str, segment_bytes: int, max_segments: int) -> list[str]:
    """Consecutive runs of whole paragraphs of at least `segment_bytes` UTF-8 bytes each (at most
    `max_segments`): the same text for every model, whatever its tokenizer."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur.encode("utf-8")) >= segment_bytes:
            out.append(cur)
            cur = ""
            if len(out) == max_segments:
                break
    return out
