"""Run exported GGUF files in llama.cpp (through llama-cpp-python): tokenize, perplexity, greedy generation.

`llama_perplexity` follows llama.cpp's `llama-perplexity` tool: the token ids are cut into consecutive
chunks of n_ctx (a trailing partial chunk is dropped), each chunk's first token is replaced by BOS when
the vocab adds BOS, each chunk is evaluated from an empty KV cache with logits for every position, and
the n_ctx/2 - 1 tokens at positions n_ctx/2+1 .. n_ctx-1 are scored, each from the logits at the
previous position. ppl = exp(mean NLL), accumulated in float64. (The tool itself refuses fewer than
2*n_ctx tokens; here one full chunk is enough.)
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from birdbone_core.errors import BirdboneError
from birdbone_core.progress import progress_bar

DEFAULT_THREADS = int(os.environ.get("BIRDBONE_LLAMA_THREADS", "1"))


_LOG_CALLBACK: Any = None
_ERRORS: list[str] = []  # recent llama.cpp ERROR-level log lines, for error messages


def llama_cpp_module() -> Any:
    """The llama_cpp module, its log routed to birdbone's error capture; BirdboneError when not installed."""
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError:
        raise BirdboneError("llama-cpp-python is not installed: pip install 'birdbone-core[llamacpp]'") from None
    if _LOG_CALLBACK is None:
        # llama-cpp-python 0.3.36 maps ggml's log levels with an outdated enum and prints warnings even
        # with verbose=False; keep only ERROR lines (ggml: DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5), quietly.
        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, user_data: Any) -> None:
            if level == 4:
                _ERRORS.append(text.decode("utf-8", "replace").strip())
                del _ERRORS[:-8]

        _LOG_CALLBACK = _log
        import ctypes
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    return llama_cpp


@contextmanager
def open_llama(gguf_path: str | os.PathLike, *, n_ctx: int = 512, logits_all: bool = False,
               n_threads: int = DEFAULT_THREADS, vocab_only: bool = False) -> Iterator[Any]:
    """A `llama_cpp.Llama` for `gguf_path`, closed on exit. Load failures become BirdboneError."""
    llama_cpp = llama_cpp_module()
    path = Path(gguf_path)
    if not path.is_file():
        raise BirdboneError(f"GGUF file {path} does not exist")
    _ERRORS.clear()
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                              n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all,
                              vocab_only=vocab_only, verbose=False)
    except (ValueError, RuntimeError) as e:
        detail = "; ".join(m for m in _ERRORS if m) or str(e)
        _ERRORS.clear()
        raise BirdboneError(f"llama.cpp could not load {path}: {detail}") from None
    try:
        yield llm
    finally:
        llm.close()


def llama_tokenize(gguf_path: str | os.PathLike, text: str) -> list[int]:
    """Token ids llama.cpp gives `text` (BOS first when the vocab adds it; special tokens not parsed),
    as `llama-perplexity` tokenizes its input."""
    with open_llama(gguf_path, vocab_only=True) as llm:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))


def llama_perplexity(gguf_path: str | os.PathLike, token_ids: list[int], n_ctx: int, *,
                     n_threads: int = DEFAULT_THREADS, max_chunks: int | None = None) -> tuple[float, int]:
    """(perplexity, number of tokens scored) with the `llama-perplexity` protocol (see module doc)."""
    if n_ctx < 4 or n_ctx % 2:
        raise BirdboneError(f"n_ctx must be an even number >= 4, got {n_ctx}")
    n_chunks = len(token_ids) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise BirdboneError(f"perplexity needs at least n_ctx={n_ctx} tokens, got {len(token_ids)}")
    first = n_ctx // 2
    nll, count = 0.0, 0
    with open_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_threads=n_threads) as llm:
        add_bos = bool(llm._model.add_bos_token())
        bos = llm.token_bos()
        with progress_bar(f"llama.cpp perplexity {Path(gguf_path).name}", total=n_chunks) as advance:
            for c in range(n_chunks):
                chunk = [int(t) for t in token_ids[c * n_ctx:(c + 1) * n_ctx]]
                if add_bos:
                    chunk[0] = bos
                llm.reset()
                llm.eval(chunk)
                logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
                targets = np.asarray(chunk[first + 1:], dtype=np.int64)
                nll += float(np.sum(_nll(logits, targets)))
                count += len(targets)
                advance()
    return float(np.exp(nll / count)), count


def llama_bits_per_byte(gguf_path: str | os.PathLike, text: str, *, segment_bytes: int = 2048, max_segments: int = 8,
                        n_threads: int = DEFAULT_THREADS) -> dict:
    """Bits per byte of held-out text, comparable across tokenizers: each segment (`text_segments`) is
    tokenized by the model's own tokenizer, evaluated from BOS, and every token of it is scored; the
    total negative log-likelihood in bits is divided by the segments' UTF-8 bytes."""
    from birdbone_core.data.text import text_segments

    segments = text_segments(text, segment_bytes, max_segments)
    if not segments:
        raise BirdboneError(f"bits per byte needs at least {segment_bytes} bytes of text")
    with open_llama(gguf_path, vocab_only=True) as llm:
        ids = [list(llm.tokenize(s.encode("utf-8"), add_bos=True, special=False)) for s in segments]
    n_ctx = max(len(i) for i in ids) + 1
    nll, n_tok = 0.0, 0
    with open_llama(gguf_path, n_ctx=n_ctx + n_ctx % 2, logits_all=True, n_threads=n_threads) as llm:
        for seg in ids:
            llm.reset()
            llm.eval(seg)
            targets = np.asarray(seg[1:], dtype=np.int64)
            for c in range(0, len(targets), 64):   # float64 64 rows at a time: a 262k vocabulary is large
                logits = np.asarray(llm.scores[c:min(c + 64, len(targets))], dtype=np.float64)
                nll += float(np.sum(_nll(logits, targets[c:c + 64])))
            n_tok += len(seg) - 1
    n_bytes = sum(len(s.encode("utf-8")) for s in segments)
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "bytes": n_bytes, "tokens": n_tok, "segments": len(segments)}


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1))
    return logz - logits[np.arange(len(targets)), targets]


def llama_logits(gguf_path: str | os.PathLike, token_ids: list[int], *, n_threads: int = DEFAULT_THREADS) -> np.ndarray:
    """llama.cpp's logits (float32, one row per position) for `token_ids` evaluated as one sequence."""
    n_ctx = max(16, len(token_ids))
    with open_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_threads=n_threads) as llm:
        llm.eval([int(t) for t in token_ids])
        return np.array(llm.scores[: len(token_ids)], dtype=np.float32)


def llama_greedy_ids(gguf_path: str | os.PathLike, prompt: str, n_tokens: int, *,
                     n_threads: int = DEFAULT_THREADS) -> tuple[list[int], list[int]]:
    """(prompt token ids, greedily generated token ids): argmax of the logits at every step, stopping
    after n_tokens or at an end-of-generation token (which is not included)."""
    llama_cpp = llama_cpp_module()
    prompt_ids = llama_tokenize(gguf_path, prompt)
    n_ctx = max(16, len(prompt_ids) + n_tokens)
    with open_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads) as llm:
        if n_ctx > llm._model.n_ctx_train() > 0:
            raise BirdboneError(f"prompt ({len(prompt_ids)} tokens) + {n_tokens} new tokens exceed the model's "
                                f"context of {llm._model.n_ctx_train()}")
        vocab, n_vocab = llm._model.vocab, llm.n_vocab()
        out: list[int] = []
        llm.reset()
        pending = prompt_ids
        for _ in range(n_tokens):
            llm.eval(pending)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            tid = int(np.argmax(logits))
            if llama_cpp.llama_vocab_is_eog(vocab, tid):
                break
            out.append(tid)
            pending = [tid]
        return prompt_ids, out


def llama_detokenize(gguf_path: str | os.PathLike, token_ids: list[int]) -> str:
    """Text of `token_ids` as llama.cpp renders it (control tokens omitted)."""
    with open_llama(gguf_path, vocab_only=True) as llm:
        return llm.detokenize(token_ids, special=False).decode("utf-8", errors="replace")


def llama_generate(gguf_path: str | os.PathLike, prompt: str, n_tokens: int, *,
                   n_threads: int = DEFAULT_THREADS) -> str:
    """Greedy continuation of `prompt`: up to n_tokens new tokens, stopping early at end-of-generation."""
    _, ids = llama_greedy_ids(gguf_path, prompt, n_tokens, n_threads=n_threads)
    return llama_detokenize(gguf_path, ids) if ids else ""
