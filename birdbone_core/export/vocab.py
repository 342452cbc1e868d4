"""Tokenizer metadata (`tokenizer.*` GGUF keys) for llama.cpp.

Three sources, in order of preference:
(a) the GGUF file the model was loaded from: every `tokenizer.*` key is copied verbatim (raw bytes);
(b) a HF fast tokenizer whose model is byte-level BPE: llama.cpp tokenizer model "gpt2", with the
    pre-tokenizer named by recognising its regex ("gpt-2", "llama-bpe", "qwen2");
(c) a sentencepiece `tokenizer.model` next to the tokenizer: llama.cpp tokenizer model "llama"
    (pieces, scores, token types).
Anything else is a BirdboneError naming the tokenizer type.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from birdbone_core.errors import BirdboneError
from birdbone_core.model.gguf_header import read_gguf_fields

# Pre-tokenizer regexes as they appear in tokenizer.json (llama.cpp's llama-vocab.cpp quotes the same
# "original regex from tokenizer.json" for each pre-tokenizer type it implements).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPLIT_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt-2"}


# ----------------------------------------------------------------------------------------------------
# (a) copy from a source GGUF


TOKENIZER_GGUF = "tokenizer.gguf"   # a model directory's own GGUF tokenizer (tokenizer.* keys, no tensors)


@dataclass
class GGUFTokenizer:
    """The `tokenizer.*` fields of a GGUF file, raw: key -> (value type, array element type or None, value);
    strings as bytes, so copying them is verbatim."""
    fields: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]]
    source_name: str | None

    @property
    def n_tokens(self) -> int:
        return len(self.fields.get(gguf.Keys.Tokenizer.LIST, (None, None, []))[2])

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields[key][2] if key in self.fields else default

    def special_ids(self) -> dict[str, int]:
        """The `tokenizer.ggml.*_token_id` keys (bos, eos, unknown, padding, eot, fim_*, ...)."""
        return {k: int(v[2]) for k, v in self.fields.items() if k.endswith("_token_id")}

    def subset(self, kept: list[int]) -> GGUFTokenizer:
        """Only tokens `kept` (ascending original ids, renumbered in order): per-token arrays sliced, special
        ids remapped, BPE merges kept when both parts and their concatenation remain."""
        new_id = {old: new for new, old in enumerate(kept)}
        n = self.n_tokens
        out: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]] = {}
        for key, (vtype, sub, value) in self.fields.items():
            if vtype == GGUFValueType.ARRAY and len(value) == n and key != gguf.Keys.Tokenizer.MERGES:
                value = [value[i] for i in kept]
            elif key.endswith("_token_id"):
                if int(value) not in new_id:
                    raise BirdboneError(f"{key} {value} is not among the kept tokens")
                value = new_id[int(value)]
            out[key] = (vtype, sub, value)
        if gguf.Keys.Tokenizer.MERGES in out:
            vtype, sub, merges = out[gguf.Keys.Tokenizer.MERGES]
            toks = set(out[gguf.Keys.Tokenizer.LIST][2])
            out[gguf.Keys.Tokenizer.MERGES] = (vtype, sub, [m for m in merges if _merge_kept(m, toks)])
        return GGUFTokenizer(out, self.source_name)

    def write(self, writer: gguf.GGUFWriter) -> None:
        for key, (vtype, sub, value) in self.fields.items():
            writer.add_key_value(key, value, vtype, sub_type=sub)


def _merge_kept(merge: bytes, tokens: set[bytes]) -> bool:
    a, _, b = merge.partition(b" ")
    return a in tokens and b in tokens and a + b in tokens


def read_gguf_tokenizer(source: Path) -> GGUFTokenizer:
    """The `tokenizer.*` fields of `source`, or BirdboneError."""
    try:
        raw = read_gguf_fields(Path(source), ("tokenizer.", gguf.Keys.General.NAME))
    except (OSError, ValueError) as e:            # GgufHeaderError is a ValueError
        raise BirdboneError(f"cannot read tokenizer from source GGUF {source}: {e}") from None
    fields: dict[str, tuple[GGUFValueType, GGUFValueType | None, Any]] = {}
    name = raw.pop(gguf.Keys.General.NAME, None)
    for key, (vtype, sub, value) in raw.items():
        if not key.startswith("tokenizer."):
            continue
        if sub == GGUFValueType.ARRAY:
            raise BirdboneError(f"{source}: nested array in {key} is not supported")
        fields[key] = (GGUFValueType(vtype), None if sub is None else GGUFValueType(sub), value)
    tok = GGUFTokenizer(fields, name[2].decode("utf-8", errors="replace") if name is not None else None)
    if tok.n_tokens == 0:
        raise BirdboneError(f"source GGUF {source} has no tokenizer.ggml.tokens")
    return tok


def write_tokenizer_gguf(tok: GGUFTokenizer, out: Path) -> Path:
    """A GGUF holding only `tok`'s keys (and general.name): a model directory's `tokenizer.gguf`."""
    from birdbone_core.atomic import staged_file

    with staged_file(Path(out)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="tokenizer")
        if tok.source_name:
            writer.add_name(tok.source_name)
        tok.write(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def copy_tokenizer_from_gguf(writer: gguf.GGUFWriter, source: Path,
                             n_vocab: int | None = None) -> tuple[int, str | None]:
    """Copy every `tokenizer.*` field of `source` verbatim. Returns (number of tokens, source general.name)."""
    tok = read_gguf_tokenizer(source)
    if n_vocab is not None and tok.n_tokens != n_vocab:
        raise BirdboneError(f"source GGUF {source} has {tok.n_tokens} tokens but the model's embedding has "
                            f"{n_vocab} rows")
    tok.write(writer)
    return tok.n_tokens, tok.source_name


# ----------------------------------------------------------------------------------------------------
# (b) HF byte-level BPE


def _backend_json(tokenizer: Any) -> dict | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return json.loads(backend.to_str())


def _bytelevel_pre_name(tj: dict) -> str:
    """llama.cpp `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, or BirdboneError."""
    pre = tj.get("pre_tokenizer") or {}
    norm = tj.get("normalizer")
    ptype = pre.get("type")
    name: str | None = None
    if ptype == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise BirdboneError("byte-level BPE tokenizer with add_prefix_space=True is not supported by llama.cpp")
        if pre.get("use_regex", True):
            name = "gpt-2"
    elif ptype == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
            name = _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None:
        raise BirdboneError(
            f"byte-level BPE pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp is known to reproduce "
            "(supported: GPT-2 ByteLevel regex, Llama 3 and Qwen2 split regexes)")
    ok_norm = norm is None or (name == "qwen2" and norm.get("type") == "NFC")
    if not ok_norm:
        raise BirdboneError(f"tokenizer normalizer {norm.get('type')!r} is not reproduced by "
                            f"llama.cpp's {name!r} pre-tokenizer")
    return name


def _special_flags(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS), observed by encoding a word with special tokens on."""
    ids = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
    add_eos = eos is not None and len(ids) > 0 and ids[-1] == eos and not (add_bos and len(ids) == 1)
    return add_bos, add_eos


def _write_special_ids(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int) -> None:
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            add(tid)
    add_bos, add_eos = _special_flags(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def write_bpe_vocab(writer: gguf.GGUFWriter, tokenizer: Any, tj: dict, n_vocab: int) -> int:
    model = tj["model"]
    pre_name = _bytelevel_pre_name(tj)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    max_id = max(vocab.values())
    if max_id >= n_vocab:
        raise BirdboneError(f"tokenizer has token id {max_id} but the model's embedding has only {n_vocab} rows")
    tokens: list[str] = [f"[PAD{i}]" for i in range(n_vocab)]
    types: list[int] = [int(TokenType.UNUSED)] * n_vocab
    for text, tid in vocab.items():
        tokens[tid] = text
        if tid in added:
            types[tid] = int(TokenType.CONTROL if added[tid].get("special") else TokenType.USER_DEFINED)
        else:
            types[tid] = int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    _write_special_ids(writer, tokenizer, n_vocab)
    return n_vocab


# ----------------------------------------------------------------------------------------------------
# (c) sentencepiece


def _spm_file(tokenizer: Any) -> Path | None:
    for attr in ("vocab_file",):
        p = getattr(tokenizer, attr, None)
        if p and str(p).endswith(".model") and Path(p).is_file():
            return Path(p)
    src = getattr(tokenizer, "name_or_path", None)
    if src and (Path(src) / "tokenizer.model").is_file():
        return Path(src) / "tokenizer.model"
    return None


def write_spm_vocab(writer: gguf.GGUFWriter, tokenizer: Any, spm_path: Path, n_vocab: int) -> int:
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    except (OSError, RuntimeError) as e:
        raise BirdboneError(f"cannot read sentencepiece model {spm_path}: {e}") from None
    # llama.cpp's "llama" (SPM) tokenizer neither normalizes Unicode nor collapses whitespace
    if sp.encode("a  b") == sp.encode("a b") or sp.encode("\ufb01") == sp.encode("fi"):
        raise BirdboneError(f"{spm_path}: sentencepiece normalization (NFKC or whitespace collapsing) is not "
                            "reproduced by llama.cpp; only identity-normalized sentencepiece models are supported")
    n_sp = sp.vocab_size()
    if n_sp > n_vocab:
        raise BirdboneError(f"{spm_path} has {n_sp} pieces but the model's embedding has only {n_vocab} rows")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i in range(n_sp):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = float(sp.get_score(i))
        types[i] = int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                       else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                       else TokenType.NORMAL)
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if n_sp <= tid < n_vocab:
            tokens[tid] = str(tok.content).encode("utf-8")
            scores[tid] = -1000.0
            types[tid] = int(TokenType.CONTROL if tok.special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # the normalizer's add_dummy_prefix, observed rather than parsed (parsing needs protobuf)
    writer.add_add_space_prefix(sp.encode("a", out_type=str)[0].startswith("\u2581"))
    for sp_id, add in ((sp.bos_id(), writer.add_bos_token_id), (sp.eos_id(), writer.add_eos_token_id),
                       (sp.unk_id(), writer.add_unk_token_id), (sp.pad_id(), writer.add_pad_token_id)):
        if 0 <= sp_id < n_sp:
            add(sp_id)
    if _encodes(tokenizer) and getattr(tokenizer, "bos_token_id", None) == sp.bos_id():
        add_bos, add_eos = _special_flags(tokenizer)
    else:  # HF side unusable: llama.cpp's defaults for a sentencepiece vocab
        add_bos, add_eos = sp.bos_id() >= 0, False
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    return n_vocab


def _encodes(tokenizer: Any) -> bool:
    try:
        return len(tokenizer("a", add_special_tokens=False)["input_ids"]) > 0
    except Exception:  # a half-built HF tokenizer (e.g. sentencepiece without protobuf) # noqa: BLE001
        return False


# ----------------------------------------------------------------------------------------------------


def write_vocab(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int,
                source_gguf: Path | None = None) -> tuple[str, str | None]:
    """Write the tokenizer.* keys. Returns (where they came from, the source GGUF's general.name or None)."""
    if source_gguf is not None:
        _, source_name = copy_tokenizer_from_gguf(writer, Path(source_gguf), n_vocab)
        return f"copied from {Path(source_gguf).name}", source_name
    if tokenizer is None:
        raise BirdboneError("GGUF export needs a tokenizer (or source_gguf to copy one from)")
    where = getattr(tokenizer, "name_or_path", "") or ""   # a model directory's own tokenizer.gguf
    if where and (Path(where) / TOKENIZER_GGUF).is_file():
        own = Path(where) / TOKENIZER_GGUF
        _, source_name = copy_tokenizer_from_gguf(writer, own, n_vocab)
        return f"copied from {own}", source_name
    tj = _backend_json(tokenizer)
    if tj is not None:
        mtype = tj["model"].get("type")
        decoder = (tj.get("decoder") or {}).get("type")
        if mtype == "BPE" and not tj["model"].get("byte_fallback") and decoder == "ByteLevel":
            write_bpe_vocab(writer, tokenizer, tj, n_vocab)
            return "byte-level BPE (gpt2)", None
    spm = _spm_file(tokenizer)
    if spm is not None:
        write_spm_vocab(writer, tokenizer, spm, n_vocab)
        return f"sentencepiece ({spm.name})", None
    kind = type(tokenizer).__name__
    if tj is not None:
        kind += f" (tokenizer.json model {tj['model'].get('type')}, decoder {(tj.get('decoder') or {}).get('type')})"
    raise BirdboneError(f"tokenizer {kind} is not supported for GGUF export; supported: byte-level BPE "
                        "tokenizer.json, sentencepiece tokenizer.model, or a source GGUF to copy from")
