"""Task accuracy with lm-evaluation-harness: lm-eval `LM` adapters over a birdbone-loaded torch model and
over a GGUF file in llama.cpp, the shipped offline tasks, and one entry point `run_tasks`.

Both adapters score a (context, continuation) pair the way lm-eval's HFLM does: the context's trailing
spaces move to the continuation, context ids = encode(context) (BOS first when the tokenizer adds it),
continuation ids = encode(context + continuation)[len(context ids):]. The log-likelihood is the sum of
log p(continuation token | everything before); is_greedy = every continuation token is the argmax.
Only the continuation's positions go through the LM head, so a 262k vocabulary stays cheap.

Standard tasks (mmlu, arc_easy, arc_challenge, hellaswag, piqa, lambada_openai, ...) need their dataset
in the Hugging Face cache (or `online=True`); without it a BirdboneError names the task and the fix.
Nothing here waits on the network: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set unless online.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from birdbone_core.errors import BirdboneError

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
OFFLINE_TASKS = ("pydocs_lastword", "pydocs_cloze")
# accuracy of guessing: the fraction of items a uniform random choice gets right (generative tasks ~0)
CHANCE = {"pydocs_lastword": 0.0, "pydocs_cloze": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25,
          "hellaswag": 0.25, "mmlu": 0.25, "piqa": 0.5, "lambada_openai": 0.0, "lambada_standard": 0.0}
# the metric a task is judged by (the guardrail uses it); others default to "acc"
PRIMARY = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


def primary_metric(task: str) -> str:
    return PRIMARY.get(task, "acc")


class _ScoringLM:
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


class TorchLM(_ScoringLM):
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


class LlamaCppLM(_ScoringLM):
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


def as_lm_eval(adapter: _ScoringLM):
    """Wrap an adapter in lm-eval's LM base class (imported lazily: lm-eval is an optional extra)."""
    LM = _lm_eval().api.model.LM

    class _Adapter(LM):
        def __init__(self):
            super().__init__()
            self.inner = adapter

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return adapter.generate_until(requests)

    return _Adapter()


def _lm_eval(online: bool = False):
    if not online:  # read by `datasets` and `huggingface_hub` at import: set before lm_eval imports them
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError:
        raise BirdboneError("lm-eval is not installed: pip install 'birdbone-core[tasks]'") from None
    if not online:  # in case `datasets` / `huggingface_hub` were imported before the variables were set
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return lm_eval


def offline_task_config(name: str) -> dict:
    """The shipped task's YAML as a dict, with data_files made absolute (lm-eval resolves them from cwd)."""
    cfg = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(TASK_DIR / v) for k, v in files.items()}
    return cfg


def _dataset_of(task: str) -> str:
    """The HF dataset a registered lm-eval task reads ("" when its YAML does not say)."""
    try:
        entry = _manager().task_index.get(task)
        cfg = (entry.cfg if entry is not None and entry.cfg else
               yaml.load(entry.yaml_path.read_text(), Loader=yaml.BaseLoader))
        return f" {cfg['dataset_path']}" if cfg.get("dataset_path") else ""
    except Exception:  # tags, groups, includes: the name alone still tells the user what to fetch
        return ""


def _missing_data(task: str, exc: BaseException, online: bool) -> BirdboneError:
    what = f"its dataset{_dataset_of(task)}"
    how = (f"downloading {what} failed" if online else
           f"{what} is not in the Hugging Face cache and downloads are off")
    return BirdboneError(
        f"task {task!r}: {how} ({type(exc).__name__}); run once with --online (or "
        f"HF_DATASETS_OFFLINE=0) on a machine with internet to fill ~/.cache/huggingface, or use the offline "
        f"tasks {', '.join(OFFLINE_TASKS)}")


def load_tasks(names: list[str], online: bool = False) -> dict:
    """lm-eval task objects by name; every problem is a BirdboneError naming the task."""
    _lm_eval(online)
    from lm_eval.tasks import get_task_dict

    if not names:
        raise BirdboneError("no tasks given")
    out: dict = {}
    for name in names:
        try:
            with _quiet():
                if name in OFFLINE_TASKS:   # a Task straight from its config: no index of lm-eval's tasks
                    from lm_eval.api.task import ConfigurableTask
                    out[name] = ConfigurableTask(config=offline_task_config(name))
                    continue
                manager = _manager()
                if name not in manager.all_tasks:
                    raise BirdboneError(f"task {name!r}: unknown to lm-eval; offline tasks: {', '.join(OFFLINE_TASKS)}")
                out.update(get_task_dict([name], manager))
        except BirdboneError:
            raise
        except Exception as exc:  # datasets/hub raise many types when data is missing offline
            raise _missing_data(name, exc, online) from None
    return out


_MANAGER: list = []


def _manager():
    """lm-eval's task index (takes seconds to build: once per process)."""
    if not _MANAGER:
        from lm_eval.tasks import TaskManager
        _MANAGER.append(TaskManager(verbosity="ERROR"))
    return _MANAGER[0]


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log at INFO/WARNING and print progress bars; keep the console readable."""
    levels = {n: logging.getLogger(n).level for n in ("lm-eval", "lm_eval", "datasets", "huggingface_hub")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # lm-eval 0.4.13 deprecates get_task_dict
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def run_tasks(adapter: _ScoringLM, names: list[str], limit: int | None = None, online: bool = False,
              bootstrap_iters: int = 1000, per_doc: bool = False) -> dict[str, dict]:
    """Evaluate `adapter` on tasks -> {task: {metric: value, metric_stderr: s, "n": docs, "chance": c,
    "primary": metric}}. Group tasks (mmlu) report the group's aggregate under the group's name.
    per_doc: also "per_doc": the primary metric of every document in doc order (for paired deltas)."""
    task_dict = load_tasks(names, online)
    from lm_eval.evaluator import evaluate

    with _quiet():
        res = evaluate(lm=as_lm_eval(adapter), task_dict=task_dict, limit=limit,
                       bootstrap_iters=bootstrap_iters, log_samples=per_doc, verbosity="ERROR")
    out = _summarise(res, names)
    for name in names if per_doc else ():
        samples = sorted(res.get("samples", {}).get(name, []), key=lambda x: x["doc_id"])
        m = out[name]["primary"]
        out[name]["per_doc"] = [float(x[m]) for x in samples if m in x]
    return out


def paired_delta(base: list[float], other: list[float]) -> tuple[float, float]:
    """(mean(other - base), its stderr) over the same documents: tighter than unpaired stderrs,
    because most documents are right (or wrong) for both models."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError("paired delta needs the same documents (at least two) for both models")
    d = [o - b for b, o in zip(base, other)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def _summarise(res: dict, names: list[str]) -> dict[str, dict]:
    out = {}
    results, n_samples = res.get("results", {}), res.get("n-samples", {})
    for name in names:
        raw = results.get(name)
        if raw is None:
            raise BirdboneError(f"task {name!r}: lm-eval returned no result")
        row: dict[str, Any] = {}
        for key, val in raw.items():
            if "," not in key or not isinstance(val, (int, float)):
                continue
            metric = key.split(",")[0]
            row[metric] = float(val)
        ns = n_samples.get(name, {})
        row["n"] = int(ns.get("effective", ns.get("original", 0))) if ns else None
        row["chance"] = CHANCE.get(name)
        row["primary"] = primary_metric(name)
        out[name] = row
    return out


def accuracy_report(adapter: _ScoringLM, evaluation, online: bool = False) -> dict:
    """Everything a recipe's `evaluation` asks about accuracy, for one model state:
    {"tasks": run_tasks(...), "accuracy": {task: primary value}, "canaries": [...], "failed_canaries": [...]}."""
    from birdbone_core.eval.canaries import check_canaries, failed

    tasks = run_tasks(adapter, list(evaluation.tasks), evaluation.task_limit, online) if evaluation.tasks else {}
    canaries = check_canaries(adapter, list(evaluation.canaries))
    return {"tasks": tasks, "accuracy": {t: r[r["primary"]] for t, r in tasks.items()},
            "canaries": [c.as_dict() for c in canaries], "failed_canaries": failed(canaries)}


def accuracy_for(model, tokenizer, evaluation, online: bool = False) -> dict | None:
    """accuracy_report of a torch model, or None when the recipe asks for no tasks and no canaries
    (the hook the evaluate steps call)."""
    if not evaluation.tasks and not evaluation.canaries:
        return None
    return accuracy_report(TorchLM(model=model, tokenizer=tokenizer), evaluation, online)


def compare(base: dict, other: dict) -> list[dict]:
    """Per-task base vs other on the primary metric, with lm-eval's stderr. The delta's stderr treats
    the two runs as independent (sqrt(a^2 + b^2)): conservative, since both score the same documents."""
    rows = []
    for task, b in base["tasks"].items():
        o = other["tasks"].get(task)
        if o is None:
            continue
        m = b["primary"]
        sb, so = b.get(f"{m}_stderr", 0.0), o.get(f"{m}_stderr", 0.0)
        rows.append({"task": task, "metric": m, "n": b.get("n"), "chance": b.get("chance"),
                     "base": b[m], "base_stderr": sb, "value": o[m], "stderr": so,
                     "delta": o[m] - b[m], "delta_stderr": (sb ** 2 + so ** 2) ** 0.5,
                     "relative": (o[m] / b[m] - 1.0) if b[m] else None})
    return rows
