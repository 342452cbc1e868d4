"""The two scorers task accuracy runs on (eval.tasks): a birdbone-loaded torch model (TorchLM) and a GGUF
file in llama.cpp (LlamaCppLM), with the lm-eval request logic they share (ScoringLM): how a (context,
continuation) pair is split into ids and scored is described in eval.tasks.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from birdbone_core.errors import BirdboneError


class ScoringLM:
    """Backend-independent lm-eval LM logic; subclasses give `encode`, `logprobs`, `eos_ids`, `decode`."""

    max_length = 2048

    def encode(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError

    def logprobs(self, seqs: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """For each sequence: log-softmax rows [len(positions), vocab] at the given positions."""
        raise NotImplementedError

    def eos_ids(self) -> set[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    # ---- scoring
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_space = len(context) - len(context.rstrip(" "))
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        if whole[:len(ctx)] != ctx:   # tokenization merged across the boundary: encode separately
            return ctx, self.encode(continuation, bos=False)
        return ctx, whole[len(ctx):]

    def score_pairs(self, pairs: list[tuple[str, str]], batch: int = 8) -> list[tuple[float, bool]]:
        encoded = [self._pair(c, x) for c, x in pairs]
        out: list[tuple[float, bool] | None] = [None] * len(encoded)
        # longest context first, requests sharing a context adjacent (llama.cpp reuses its KV cache)
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i][0]), encoded[i][0], i))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            seqs, poss, tgts = [], [], []
            for i in idx:
                ctx, cont = encoded[i]
                if not cont:
                    raise BirdboneError("a task asked to score an empty continuation")
                seq = (ctx + cont)[-self.max_length:]
                n = len(cont)
                seqs.append(seq[:-1])
                poss.append(list(range(len(seq) - 1 - n, len(seq) - 1)))
                tgts.append(torch.tensor(seq[-n:]))
            for i, lp, tgt in zip(idx, self.logprobs(seqs, poss), tgts):
                ll = float(lp.gather(1, tgt[:, None]).sum())
                out[i] = (ll, bool(torch.equal(lp.argmax(-1), tgt)))
        return out  # type: ignore[return-value]

    def greedy(self, context: str, max_tokens: int, until: list[str]) -> str:
        ids = self.encode(context)
        new: list[int] = []
        eos = self.eos_ids()
        for _ in range(max_tokens):
            seq = (ids + new)[-self.max_length:]
            tok = int(self.logprobs([seq], [[len(seq) - 1]])[0][0].argmax())
            if tok in eos:
                break
            new.append(tok)
            text = self.decode(new)
            cut = [text.index(u) for u in until if u and u in text]
            if cut:
                return text[:min(cut)]
        return self.decode(new)

    # ---- lm-eval LM API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([r.args for r in requests], getattr(self, "batch", 8))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self.encode(r.args[0])
            total, start = 0.0, 1
            while start < len(ids):        # disjoint windows, each scored from its own start
                end = min(len(ids), start + self.max_length - 1)
                seq = ids[max(0, start - 1):end]
                lp = self.logprobs([seq[:-1]], [list(range(len(seq) - 1))])[0]
                total += float(lp.gather(1, torch.tensor(seq[1:])[:, None]).sum())
                start = end
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kw = r.args
            until = kw.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            out.append(self.greedy(context, int(kw.get("max_gen_toks", 64)), until))
        return out


class TorchLM(ScoringLM):
    """A birdbone LoadedModel (transformers causal LM, on any device) as an lm-eval LM."""

    def __init__(self, loaded=None, batch: int = 8, *, model=None, tokenizer=None):
        """loaded: a LoadedModel; or pass model= and tokenizer= (e.g. a run's working model)."""
        self.model = model if model is not None else loaded.model
        self.tok = tokenizer if tokenizer is not None else loaded.tokenizer
        self.batch = batch
        self.max_length = int(min(getattr(self.model.config, "max_position_embeddings", 2048), 2048))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=bos)["input_ids"])

    @torch.no_grad()
    def logprobs(self, seqs, positions):
        from birdbone_core.eval.perplexity import head_logits

        width = max(len(s) for s in seqs)
        # right padding: with causal attention no real token attends to a pad, so no mask is needed
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])        # [b, width]
        emb = self.model.get_input_embeddings().weight
        h = self.model.get_decoder()(input_ids=ids.to(emb.device), use_cache=False).last_hidden_state  # [b, width, d]
        # float32 log-probs [len(p), vocab] back on the CPU, where the callers' target ids are
        return [torch.log_softmax(head_logits(self.model, h[b, p]), dim=-1).cpu() for b, p in enumerate(positions)]

    def eos_ids(self) -> set[int]:
        e = self.model.generation_config.eos_token_id if self.model.generation_config else None
        e = self.tok.eos_token_id if e is None else e
        return set(e) if isinstance(e, list) else ({e} if e is not None else set())

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class LlamaCppLM(ScoringLM):
    """A GGUF file run by llama.cpp (llama-cpp-python) as an lm-eval LM. Use as a context manager."""

    def __init__(self, gguf_path: str | os.PathLike, n_ctx: int = 1024, n_threads: int | None = None):
        from birdbone_core.eval.llamacpp import DEFAULT_THREADS, open_llama

        self.path = Path(gguf_path)
        self.max_length = n_ctx
        self._cm = open_llama(self.path, n_ctx=n_ctx, logits_all=False, n_threads=n_threads or DEFAULT_THREADS)
        self.llm = self._cm.__enter__()
        self._n_vocab = self.llm.n_vocab()
        self._bos = bool(self.llm._model.add_bos_token())

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=bos and self._bos, special=False))

    def logprobs(self, seqs, positions):
        import llama_cpp
        import numpy as np

        out = []
        for seq, pos in zip(seqs, positions):
            seq, first = [int(t) for t in seq], min(pos)
            # keep the KV cache of the prefix shared with the last sequence (the options of one
            # multiple-choice question share their context), but re-run from `first` on: logits are
            # computed for the last token of each decode only, so the 262k-row LM head runs at the
            # positions asked for, not at every context token
            keep = 0
            while keep < min(self.llm.n_tokens, first) and int(self.llm.input_ids[keep]) == seq[keep]:
                keep += 1
            self.llm.n_tokens = keep
            if first > keep:
                self.llm.eval(seq[keep:first])
            rows = {}
            for p in range(first, max(pos) + 1):
                self.llm.eval([seq[p]])
                if p in pos:
                    rows[p] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1),
                                                    shape=(self._n_vocab,)).copy()
            out.append(torch.log_softmax(torch.from_numpy(np.stack([rows[p] for p in pos])), dim=-1))
        return out

    def eos_ids(self) -> set[int]:
        import llama_cpp

        vocab = self.llm._model.vocab
        return {t for t in range(self.llm.n_vocab()) if t < 512 and llama_cpp.llama_vocab_is_eog(vocab, t)} | \
            {self.llm.token_eos()}

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=False).decode("utf-8", errors="replace")
