"""Vocabulary trimming: keep the tokens a domain corpus needs, drop every other row of the embedding and
the LM head, and rewrite the tokenizer (HF tokenizer.json and the GGUF `tokenizer.*` keys) to match.

Why the corpus tokenizes exactly as before. Both tokenizer families build a token by merging adjacent
pieces, and a merge is applied only when its result is a token: SPM (llama.cpp "llama") merges the
adjacent pair whose concatenation has the highest score (leftmost on ties), BPE the adjacent pair with the
lowest merge rank. Keep every token the corpus tokenizes to and every piece merged on the way to it, and
every merge that happened on the corpus still happens, in the same order; merges whose result was dropped
never happened there. The pieces inside a final token never merged across its edges, so the pieces merged
on the way to it are those of tokenizing its own text alone (`merge_trace`). llama.cpp's user-defined
tokens (Gemma's whitespace runs) are matched before merging; those the corpus uses are final tokens, so
they are kept. Text outside the corpus falls back to shorter pieces and, at worst, byte tokens, which are
always kept (SPM `<0xXX>`; byte-level BPE's 256-character alphabet), as are the special tokens.

The token budget (`keep`) is filled by corpus frequency first (each token with its merge trace), then by
the tokenizer's own prior (SPM score, BPE rank) so text outside the corpus keeps common pieces.

Ids: kept tokens keep their original order (new id i = `kept[i]`), so the leading specials keep their ids.
`trim_embeddings` returns a record with the removed rows; `restore_embeddings` puts them back bit for bit.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from birdbone_core.errors import BirdboneError

UNUSED_NAME = re.compile(r"<unused\d+>|\[PAD\d+\]")   # placeholder specials nothing ever emits


@dataclass
class Vocab:
    """One tokenizer's pieces as its merge algorithm sees them.

    pieces: token text by id (SPM: spaces as U+2581; byte-level BPE: its byte alphabet); kind: "spm"
    merges by `scores`, "bpe" by `ranks` ((left, right) -> rank); always: ids kept whatever the corpus
    (bytes, specials).
    """
    pieces: list[str]
    kind: Literal["spm", "bpe"]
    always: set[int]
    scores: list[float] | None = None
    ranks: dict[tuple[str, str], int] | None = None
    _ids: dict[str, int] = field(default_factory=dict, repr=False)

    def id_of(self, piece: str) -> int | None:
        if not self._ids:
            for i, p in enumerate(self.pieces):
                self._ids.setdefault(p, i)
        return self._ids.get(piece)

    def prior(self) -> list[int]:
        """Ids from most to least likely a priori (SPM: score; BPE: id, which follows merge order)."""
        if self.kind == "spm" and self.scores is not None:
            return sorted(range(len(self.pieces)), key=lambda i: (-self.scores[i], i))
        return list(range(len(self.pieces)))


def merge_trace(vocab: Vocab, text: str) -> list[str]:
    """Every piece tokenizing `text` alone needs: the pieces its merges create, in merge order, and for BPE
    its characters first (a BPE word starts as characters looked up in the vocabulary; one missing falls
    back to bytes and merges no further; SPM merges on the text and never needs a lone character).

    SPM as llama.cpp's llm_tokenizer_spm: a max-heap of adjacent pairs keyed by (score of the merged
    token, -left position); stale pairs are skipped. BPE: repeatedly the lowest-ranked adjacent pair.
    """
    sym = list(text)
    made: list[str] = list(dict.fromkeys(sym)) if vocab.kind == "bpe" else []
    if len(sym) < 2:
        return made
    if vocab.kind == "bpe":
        ranks = vocab.ranks or {}
        while len(sym) > 1:
            best = min(range(len(sym) - 1), key=lambda i: (ranks.get((sym[i], sym[i + 1]), 1 << 62), i))
            if (sym[best], sym[best + 1]) not in ranks:
                break
            sym[best:best + 2] = [sym[best] + sym[best + 1]]
            made.append(sym[best])
        return made
    scores = vocab.scores or []
    nxt = list(range(1, len(sym))) + [-1]
    prv = list(range(-1, len(sym) - 1))
    heap: list[tuple[float, int, str, str]] = []

    def push(i: int) -> None:
        j = nxt[i]
        if i < 0 or j < 0:
            return
        tid = vocab.id_of(sym[i] + sym[j])
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], i, sym[i], sym[j]))

    for i in range(len(sym) - 1):
        push(i)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if j < 0 or sym[i] != left or sym[j] != right:     # stale: a neighbour merged first
            continue
        sym[i], sym[j] = left + right, ""
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        made.append(sym[i])
        push(prv[i])
        push(i)
    return made


def plan_vocab(vocabs: Sequence[Vocab], counts: Counter, keep: int | None = None) -> list[int]:
    """The ids to keep, ascending. `counts`: id -> occurrences in the corpus (under every tokenizer in
    `vocabs`, which share ids, e.g. a model's HF tokenizer and its GGUF one). `keep`: the number of tokens
    to keep (None: exactly what the corpus needs)."""
    n = len(vocabs[0].pieces)
    if any(len(v.pieces) != n for v in vocabs):
        raise BirdboneError("the tokenizers disagree on the vocabulary size: " +
                            ", ".join(str(len(v.pieces)) for v in vocabs))
    kept = set().union(*(v.always for v in vocabs))
    if keep is not None and keep < len(kept):
        raise BirdboneError(f"a vocabulary of {keep} tokens is smaller than the {len(kept)} tokens that are always "
                            "kept (byte tokens and special tokens)")
    if keep is not None and keep > n:
        raise BirdboneError(f"cannot keep {keep} tokens: the vocabulary has {n}")

    def closure(tid: int) -> set[int]:
        need = {tid}
        for v in vocabs:
            for piece in merge_trace(v, v.pieces[tid]):
                pid = v.id_of(piece)
                if pid is not None:
                    need.add(pid)
        return need

    used = [tid for tid, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if 0 <= tid < n]
    for tid in used:
        need = closure(tid) - kept
        if keep is not None and len(kept) + len(need) > keep:
            continue
        kept |= need
    if keep is not None:
        for tid in vocabs[0].prior():
            if len(kept) >= keep:
                break
            if tid in kept:
                continue
            need = closure(tid) - kept
            if len(kept) + len(need) <= keep:
                kept |= need
    return sorted(kept)


# ----------------------------------------------------------------------------------------------------
# The model's rows


@dataclass
class VocabRecord:
    """What `trim_embeddings` removed: kept ids (original numbering, ascending), the original size, the
    removed rows of the input embedding and (when not tied to it) of the LM head and its bias, and the
    config/generation-config token ids as they were."""
    kept: list[int]
    n_before: int
    removed: dict[str, torch.Tensor]
    tied: bool
    config_ids: list[tuple[int, str, Any]]


_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _rows(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.detach().index_select(0, idx.to(weight.device)).clone()


def _kept_and_dropped(kept: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept row indices, removed row indices), both ascending, of n rows."""
    keep_idx = torch.tensor(list(kept), dtype=torch.long)
    drop_mask = torch.ones(n, dtype=torch.bool)
    drop_mask[keep_idx] = False
    return keep_idx, drop_mask.nonzero().flatten()


def trim_embeddings(model: nn.Module, kept: Sequence[int]) -> VocabRecord:
    """Keep only rows `kept` of the embedding and the LM head (tied heads stay tied); config ids follow."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n = emb.weight.shape[0]
    kept = sorted(set(int(k) for k in kept))
    if not kept or kept[0] < 0 or kept[-1] >= n:
        raise BirdboneError(f"kept token ids must lie in [0, {n})")
    new_id = {old: new for new, old in enumerate(kept)}
    keep_idx, drop_idx = _kept_and_dropped(kept, n)
    tied = head is not None and head.weight is emb.weight
    removed = {"embed": _rows(emb.weight, drop_idx)}
    if head is not None and not tied:
        removed["head"] = _rows(head.weight, drop_idx)
        if getattr(head, "bias", None) is not None:
            removed["head_bias"] = _rows(head.bias, drop_idx)
    config_ids = _config_ids(model)
    emb.weight = nn.Parameter(_rows(emb.weight, keep_idx), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = len(kept)
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = new_id.get(emb.padding_idx)
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(_rows(head.weight, keep_idx), requires_grad=head.weight.requires_grad)
            if getattr(head, "bias", None) is not None:
                head.bias = nn.Parameter(_rows(head.bias, keep_idx), requires_grad=head.bias.requires_grad)
        head.out_features = len(kept)
    _set_vocab_config(model, len(kept), [(c, k, _remap(v, new_id)) for c, k, v in config_ids])
    return VocabRecord(kept, n, removed, tied, config_ids)


def restore_embeddings(model: nn.Module, record: VocabRecord) -> None:
    """Undo `trim_embeddings`: the kept rows (as they are now) and the removed rows back in their places."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    keep_idx, drop_idx = _kept_and_dropped(record.kept, record.n_before)

    def full(now: torch.Tensor, gone: torch.Tensor) -> torch.Tensor:
        out = torch.empty((record.n_before, *now.shape[1:]), dtype=now.dtype, device=now.device)
        out[keep_idx.to(now.device)] = now.detach()
        out[drop_idx.to(now.device)] = gone.to(now.device, now.dtype)
        return out

    emb.weight = nn.Parameter(full(emb.weight, record.removed["embed"]), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = record.n_before
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = record.kept[emb.padding_idx]
    if head is not None:
        if record.tied:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(full(head.weight, record.removed["head"]), requires_grad=head.weight.requires_grad)
            if "head_bias" in record.removed:
                head.bias = nn.Parameter(full(head.bias, record.removed["head_bias"]), requires_grad=head.bias.requires_grad)
        head.out_features = record.n_before
    _set_vocab_config(model, record.n_before, record.config_ids)


def _configs(model: nn.Module) -> list:
    cfgs = [model.config]
    text = getattr(model.config, "text_config", None)
    if text is not None:
        cfgs.append(text)
    gen = getattr(model, "generation_config", None)
    return cfgs + ([gen] if gen is not None else [])


def _config_ids(model: nn.Module) -> list[tuple[int, str, Any]]:
    return [(c, k, getattr(cfg, k)) for c, cfg in enumerate(_configs(model)) for k in _ID_KEYS
            if getattr(cfg, k, None) is not None]


def _remap(value: Any, new_id: dict[int, int]) -> Any:
    if isinstance(value, int):
        return new_id.get(value)
    if isinstance(value, (list, tuple)):
        return [new_id[v] for v in value if v in new_id]
    return value


def _set_vocab_config(model: nn.Module, n: int, ids: list[tuple[int, str, Any]]) -> None:
    cfgs = _configs(model)
    for cfg in cfgs:
        if hasattr(cfg, "vocab_size"):
            cfg.vocab_size = n
    for c, k, v in ids:
        setattr(cfgs[c], k, v)


def renumber(ids: torch.Tensor, kept: Sequence[int], n_before: int) -> torch.Tensor:
    """Token ids of the full vocabulary -> ids of the trimmed one; BirdboneError if one was not kept."""
    to_new = torch.full((n_before,), -1, dtype=torch.long)
    to_new[torch.tensor(list(kept), dtype=torch.long)] = torch.arange(len(kept))
    out = to_new[ids]
    if (out < 0).any():
        raise BirdboneError(f"{int((out < 0).sum())} token(s) of the text are not in the trimmed vocabulary")
    return out
