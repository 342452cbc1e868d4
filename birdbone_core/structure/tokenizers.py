"""The tokenizers around a vocabulary trim: a HF fast tokenizer's BPE and a GGUF's `tokenizer.*` keys read
as `Vocab`s, rewritten for the kept ids, and `trim_vocab`, which runs the whole trim on a loaded model.
The algorithm (merge traces, the plan, the embedding rows) is in structure/vocab.py."""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.export.vocab import GGUFTokenizer
from birdbone_core.structure.vocab import UNUSED_NAME, Vocab, VocabRecord, plan_vocab, trim_embeddings

# GGUF token types (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
_UNKNOWN, _CONTROL, _BYTE = 2, 3, 6


# ----------------------------------------------------------------------------------------------------
# Vocabularies from a GGUF file and from a HF fast tokenizer


def vocab_from_gguf(tok: GGUFTokenizer) -> Vocab:
    """A GGUF tokenizer as a Vocab (pieces decoded as UTF-8, as llama.cpp matches them)."""
    def text(key: str) -> list[str] | None:
        raw = tok.get(key)
        return None if raw is None else [b.decode("utf-8", "replace") for b in raw]

    model = tok.get("tokenizer.ggml.model", b"").decode()
    return vocab_from_gguf_fields(text("tokenizer.ggml.tokens"), list(tok.get("tokenizer.ggml.token_type", [])),
                                  tok.get("tokenizer.ggml.scores"), text("tokenizer.ggml.merges"), model,
                                  tok.special_ids().values())


def vocab_from_gguf_fields(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float] | None,
                           merges: Sequence[str] | None, model: str, special_ids: Iterable[int]) -> Vocab:
    """A GGUF tokenizer (`tokenizer.ggml.*` values). Always kept: byte, unknown and control tokens except
    `<unusedN>` placeholders, and every id a `*_token_id` key names."""
    always = {i for i, t in enumerate(types)
              if t in (_BYTE, _UNKNOWN) or (t == _CONTROL and not UNUSED_NAME.fullmatch(tokens[i]))}
    always |= {i for i in special_ids if 0 <= i < len(tokens)}
    if model == "llama":
        if scores is None:
            raise BirdboneError("SPM GGUF tokenizer has no tokenizer.ggml.scores")
        return Vocab(list(tokens), "spm", always, scores=list(scores))
    if model == "gpt2":
        ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges or [])}
        always |= _byte_alphabet_ids(tokens)
        return Vocab(list(tokens), "bpe", always, ranks=ranks)
    raise BirdboneError(f"vocabulary trimming supports GGUF tokenizer models 'llama' (SPM) and 'gpt2' (BPE), "
                        f"not {model!r}")


def _byte_alphabet_ids(pieces: Sequence[str]) -> set[int]:
    """Byte-level BPE's 256 single-character base tokens (GPT-2's bytes_to_unicode alphabet)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = set(ByteLevel.alphabet())
    return {i for i, p in enumerate(pieces) if p in chars}


def hf_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BirdboneError(f"vocabulary trimming needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
    tj = json.loads(backend.to_str())
    if tj["model"].get("type") != "BPE":
        raise BirdboneError(f"vocabulary trimming supports BPE tokenizer.json models, not {tj['model'].get('type')!r}")
    return tj


def vocab_from_hf(tokenizer: Any, n_rows: int) -> Vocab:
    """The HF fast tokenizer's BPE (byte-level or byte-fallback), padded to the embedding's `n_rows`."""
    tj = hf_json(tokenizer)
    pieces = [f"\x00<row {i}>" for i in range(n_rows)]     # rows no token uses: never merged into
    for piece, tid in tj["model"]["vocab"].items():
        if tid < n_rows:
            pieces[tid] = piece
    for t in tj.get("added_tokens", []):
        if t["id"] < n_rows:
            pieces[t["id"]] = t["content"]
    ranks = {}
    for r, m in enumerate(tj["model"].get("merges") or []):
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
        ranks.setdefault(pair, r)
    always = {t["id"] for t in tj.get("added_tokens", [])
              if t.get("special") and not UNUSED_NAME.fullmatch(t["content"]) and t["id"] < n_rows}
    always |= {i for i in (getattr(tokenizer, "all_special_ids", None) or []) if 0 <= i < n_rows}
    if tj["model"].get("byte_fallback"):
        always |= {i for i, p in enumerate(pieces) if re.fullmatch(r"<0x[0-9A-F]{2}>", p)}
    else:
        always |= _byte_alphabet_ids(pieces)
    return Vocab(pieces, "bpe", always, ranks=ranks)


def trim_hf_tokenizer(tokenizer: Any, kept: Sequence[int]) -> Any:
    """A new fast tokenizer with only the `kept` ids (renumbered in order); merges whose parts or result
    are gone are dropped, post-processor ids remapped. Special tokens, chat template and flags carry over."""
    from transformers import AutoTokenizer

    tj = hf_json(tokenizer)
    new_id = {old: new for new, old in enumerate(kept)}
    model = tj["model"]
    model["vocab"] = {p: new_id[i] for p, i in model["vocab"].items() if i in new_id}
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in model["vocab"] and b in model["vocab"] and a + b in model["vocab"]:
            merges.append(m)
    model["merges"] = merges
    tj["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in tj.get("added_tokens", []) if t["id"] in new_id]
    _remap_ids(tj.get("post_processor"), new_id)
    # Reload through the tokenizer's own class from a saved copy with the new tokenizer.json, so its flags
    # (add_bos_token, ...), special tokens and chat template carry over exactly as the class reads them.
    with tempfile.TemporaryDirectory(prefix="birdbone-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        for stale in ("tokenizer.model", "vocab.json", "merges.txt"):   # slow-tokenizer files of the old vocab
            (Path(tmp) / stale).unlink(missing_ok=True)
        out = AutoTokenizer.from_pretrained(tmp)
        out.name_or_path = ""
    return out


def _remap_ids(node: Any, new_id: dict[int, int]) -> None:
    """tokenizers post-processors name special tokens with their ids (TemplateProcessing's `ids`)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "ids" and isinstance(v, list) and all(isinstance(x, int) for x in v):
                node[k] = [new_id[x] for x in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                node[k] = [v[0], new_id[v[1]]]
            else:
                _remap_ids(v, new_id)
    elif isinstance(node, list):
        for v in node:
            _remap_ids(v, new_id)


# ----------------------------------------------------------------------------------------------------
# The whole trim on a loaded model


@dataclass
class VocabTrim:
    record: VocabRecord
    tokenizer: Any                       # the trimmed HF tokenizer
    gguf_tokenizer: GGUFTokenizer | None  # the trimmed GGUF tokenizer (a GGUF source only)
    corpus_tokens: int
    corpus_distinct: int
    corpus_identical: bool               # HF tokenization of the corpus unchanged (as text pieces)

    def summary(self) -> dict:
        return {"kept": len(self.record.kept), "of": self.record.n_before, "corpus_tokens": self.corpus_tokens,
                "corpus_distinct_tokens": self.corpus_distinct, "corpus_tokenizes_identically": self.corpus_identical}


def hf_pieces(tokenizer: Any, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def trim_vocab(model: nn.Module, tokenizer: Any, corpus: str, *, keep: int | None = None,
               gguf: tuple[Path, GGUFTokenizer] | None = None, required: Iterable[int] = ()) -> VocabTrim:
    """Keep the tokens `corpus` needs (then the most common, up to `keep`) in the model, its HF tokenizer and,
    for a model loaded from a GGUF (`gguf`: its path and tokenizer), llama.cpp's tokenizer: both tokenize the
    corpus, and the plan keeps what either needs. `required`: ids kept whatever the budget (e.g. those of
    healing text). Raises BirdboneError before changing anything."""
    n_rows = model.get_input_embeddings().weight.shape[0]
    vocabs = [vocab_from_hf(tokenizer, n_rows)]
    vocabs[0].always |= {int(i) for i in required}
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    counts = Counter(ids)
    if gguf is not None:
        from birdbone_core.eval.llamacpp import llama_tokenize

        path, tok = gguf
        if tok.n_tokens != n_rows:
            raise BirdboneError(f"{path} has {tok.n_tokens} tokens but the model's embedding has {n_rows} rows")
        vocabs.append(vocab_from_gguf(tok))
        counts.update(llama_tokenize(path, corpus))
    kept = plan_vocab(vocabs, counts, keep)
    before = tokenizer.convert_ids_to_tokens(ids)
    new_tok = trim_hf_tokenizer(tokenizer, kept)
    identical = hf_pieces(new_tok, corpus) == before
    record = trim_embeddings(model, kept)
    return VocabTrim(record, new_tok, gguf[1].subset(kept) if gguf is not None else None,
                     len(ids), len(set(ids)), identical)


def tokenization_diff(before: Callable[[str], list[str]], after: Callable[[str], list[str]], text: str,
                      n_examples: int = 3) -> dict:
    """How much of `text` tokenizes differently: paragraphs (split at blank lines) whose pieces differ,
    weighted by bytes, with the first few as examples."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    total = diff = 0
    examples = []
    for p in paragraphs:
        a, b = before(p), after(p)
        n = len(p.encode("utf-8"))
        total += n
        if a != b:
            diff += n
            if len(examples) < n_examples:
                i = next(k for k in range(min(len(a), len(b)) + 1) if k == min(len(a), len(b)) or a[k] != b[k])
                examples.append({"before": a[max(0, i - 3):i + 5], "after": b[max(0, i - 3):i + 8]})
    return {"paragraphs": len(paragraphs), "bytes": total, "bytes_differing": diff,
            "share_differing": diff / total if total else 0.0, "examples": examples}
