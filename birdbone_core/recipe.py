"""Recipes: what to do to a model, as YAML validated by pydantic (unknown keys are errors).

    name: sparsegpt-50-q8
    calibration: {n_samples: 64, seq_len: 512, seed: 0}
    evaluation:  {n_ctx: 512, max_chunks: 8}
    structure:   {vocab: 16384, ffn: 0.25}            # optional; see birdbone_core.structure.config
    prune:       {method: sparsegpt, sparsity: 0.5, pattern: unstructured}
    export:      {type: q8_0}
    runtime:     {device: auto, dtype: auto}     # optional; see birdbone_core.runtime

Every error names the file, the field path and the problem, on one line.
"""
from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from birdbone_core.errors import BirdboneError
from birdbone_core.eval.canaries import Canary
from birdbone_core.heal.config import Heal
from birdbone_core.prune.config import Prune
from birdbone_core.prune.regrow import Regrow
from birdbone_core.quant.config import Quantize
from birdbone_core.runtime import Runtime
from birdbone_core.structure.config import Structure

EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextSource(_Strict):
    """Where text comes from: a .txt/.jsonl(.gz) file, or None for the shipped Python-docs slice."""

    text: str | None = Field(None, description="path to .txt, .jsonl (field 'text') or their .gz; None = built-in slice")
    seed: int = Field(0, description="seed of the random choice of text windows")


# Calibration activations of every sample are held through each layer walk: cap the tokens so a typo
# (n_samples: 100000) is a clear error, not an out-of-memory kill hours later. 2^21 = e.g. 1024 x 2048.
MAX_CALIBRATION_TOKENS = 2 ** 21
MAX_WAVES = 200


class Calibration(TextSource):
    n_samples: int = Field(64, ge=1, le=100_000, description="calibration windows (each seq_len tokens)")
    seq_len: int = Field(512, ge=8, le=131_072, description="tokens per calibration window")

    def record(self, text_desc: str | None = None) -> dict:
        """What run records say of the windows: {text (when given), n_samples, seq_len, seed}."""
        return {**({"text": text_desc} if text_desc is not None else {}), "n_samples": self.n_samples,
                "seq_len": self.seq_len, "seed": self.seed}

    @model_validator(mode="after")
    def _tokens(self) -> "Calibration":
        if self.n_samples * self.seq_len > MAX_CALIBRATION_TOKENS:
            raise ValueError(f"n_samples x seq_len = {self.n_samples * self.seq_len:,} tokens, more than the "
                             f"{MAX_CALIBRATION_TOKENS:,} calibration tokens birdbone holds")
        return self


class AccuracyGuard(_Strict):
    """Stop when a task's accuracy is more than `threshold` (relative) below the base model's for
    `patience` waves in a row (birdbone_core.guard.accuracy_guard). Applies when `tasks` is not empty."""

    threshold: float = Field(0.03, gt=0, lt=1, description="relative accuracy drop vs the base model")
    patience: int = Field(2, ge=1, description="bad waves in a row before the run stops")


class Evaluation(TextSource):
    # llama-perplexity protocol: chunks of n_ctx tokens, second half of each chunk is scored
    n_ctx: int = Field(512, ge=16, le=131_072, description="tokens per scored chunk (llama-perplexity -c); "
                                                        "the second half of each chunk is scored")
    max_chunks: int | None = Field(8, ge=1, description="cap on chunks scored (None = whole text)")
    # task accuracy (lm-eval): offline pydocs_lastword / pydocs_cloze, or lm-eval names (mmlu, arc_easy, ...)
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks scored at evaluate steps")
    task_limit: int | None = Field(None, ge=1, description="documents per task (None = all)")
    canaries: list[Canary] = Field(default_factory=list, description="prompts with expected answers")
    accuracy_guard: AccuracyGuard = Field(AccuracyGuard(), description="stop a run whose task accuracy drops")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice")
        return v

    @field_validator("canaries")
    @classmethod
    def _canaries(cls, v: list[Canary]) -> list[Canary]:
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"canary name(s) used twice: {', '.join(dup)}")
        return v


class Export(_Strict):
    """The GGUF written by `export` when the recipe has no `quantize:` section."""

    type: Literal["f32", "f16", "bf16", "q8_0"] = Field("q8_0", description="one tensor type for every 2-D weight")


class StopLoss(_Strict):
    threshold: float = Field(0.03, gt=0, description="relative perplexity rise over the last accepted state")
    patience: int = Field(2, ge=1, description="bad waves in a row before rolling back")
    gradual: bool = Field(
        False, description="rollback restores the weights the rejected waves zeroed in `stages` equal parts, "
                           "largest accepted |w| first, measuring validation ppl after each stage; the first "
                           "stage within `threshold` of the accepted ppl is kept, and the last stage is exactly "
                           "the accepted state (birdbone_core.loop.ends, loop.gradual). false: revert at once")
    stages: int = Field(3, ge=2, le=10, description="parts of a gradual rollback (only with gradual: true)")

    @model_validator(mode="after")
    def _stages_need_gradual(self) -> "StopLoss":
        if "stages" in self.model_fields_set and not self.gradual:
            raise ValueError("stages applies only to a gradual rollback: set gradual: true")
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        # the gradual fields are left out at their defaults so that a recipe without them keeps the
        # hash (Recipe.sha256) and YAML it had before they existed: existing run directories stay valid
        d = handler(self)
        if not self.gradual:
            d.pop("gradual", None)
        if self.stages == 3:
            d.pop("stages", None)
        return d


class Waves(_Strict):
    """Reach prune.sparsity gradually: prune at most max_per_wave more each wave, heal, check, repeat."""

    max_per_wave: float = Field(0.10, gt=0, le=1, description="fraction of weights removed per wave at most")
    heal: Heal = Field(Heal(), description="training after each wave's pruning (birdbone_core.heal)")
    stop_loss: StopLoss = Field(StopLoss(), description="when a wave is accepted, struck or rolled back")
    regrow: Regrow | None = Field(None, description="after healing, swap pruned and surviving weights "
                                                    "(birdbone_core.prune.regrow); absent: no regrowth")

    def targets(self, final: float) -> list[float]:
        """Cumulative sparsity after each wave, e.g. 0.5 by 0.1 -> [0.1, 0.2, 0.3, 0.4, 0.5]."""
        n = max(1, math.ceil(round(final / self.max_per_wave, 9)))
        return [final * (k + 1) / n for k in range(n)]


class Recipe(_Strict):
    name: str = Field("default", description="a label for reports and metrics")
    calibration: Calibration = Field(Calibration(), description="text whose activations guide pruning, "
                                                                  "healing and quantization")
    evaluation: Evaluation = Field(Evaluation(), description="held-out text, tasks and canaries that score "
                                                               "every state")
    structure: Structure | None = Field(None, description="structural cuts (vocabulary, layers, FFN neurons, KV "
                                                          "groups) made once, first: the cut model is the run's "
                                                          "base for every later step (birdbone_core.structure)")
    prune: Prune = Field(Prune(), description="what is pruned and how (birdbone_core.prune.config)")
    export: Export = Field(Export(), description="the GGUF's type without a quantize section")
    waves: Waves | None = Field(None, description="absent: one-shot pruning; present: pruning in waves")
    quantize: Quantize | None = Field(None, description="mixed-type GGUF under a bit budget (export)")
    runtime: Runtime = Field(Runtime(), description="device and weight dtype of every step (birdbone_core.runtime); "
                                                    "a step's --device / --dtype wins over it")

    @model_validator(mode="after")
    def _wave_count(self) -> "Recipe":
        if self.waves is not None and len(self.waves.targets(self.prune.sparsity)) > MAX_WAVES:
            n = len(self.waves.targets(self.prune.sparsity))
            raise ValueError(f"prune.sparsity {self.prune.sparsity} at waves.max_per_wave {self.waves.max_per_wave} "
                             f"is {n:,} waves, more than {MAX_WAVES}; raise max_per_wave")
        return self

    @model_validator(mode="after")
    def _disjoint(self) -> "Recipe":
        c, e = self.calibration.text, self.evaluation.text
        if c is not None and e is not None and Path(c).resolve() == Path(e).resolve():
            raise ValueError("calibration.text and evaluation.text are the same file: evaluation must be held out")
        return self

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler):
        # `runtime:` and `structure:` are left out at their defaults so that a recipe without them keeps the
        # hash (sha256) and YAML it had before they existed: existing run directories stay valid
        d = handler(self)
        if self.runtime == Runtime():
            d.pop("runtime", None)
        if self.structure is None:
            d.pop("structure", None)
        return d

    def sha256(self) -> str:
        """Hash of the canonical JSON form: two recipes with the same meaning hash the same."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def _format_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


def parse_recipe(data: object, source: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BirdboneError(f"{source}: invalid recipe: top level must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise BirdboneError(_format_error(source, e)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a repeated key in one mapping (plain YAML lets the last one win silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str):
    """YAML as recipes are read: safe types only, duplicate keys refused (yaml.YAMLError)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def apply_targets(data: dict, targets: dict) -> dict:
    """A copy of recipe mapping `data` with {"prune.sparsity": 0.4, "export.type": "f16"} applied
    (each dotted path creates the mappings it goes through; validation happens after)."""
    out = copy.deepcopy(data)
    for dotted, value in targets.items():
        node = out
        *parents, leaf = str(dotted).split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BirdboneError(f"targets: {dotted!r} goes through {part!r}, which is not a mapping")
        node[leaf] = value
    return out


def load_recipe(path: str | Path | None, targets: dict | None = None) -> Recipe:
    """Read a YAML recipe, with `targets` (dotted path -> value) applied; None gives the default recipe
    (50% unstructured SparseGPT, Q8_0)."""
    if targets is not None and not isinstance(targets, dict):
        raise BirdboneError(f"targets: expected a mapping of dotted paths to values, got {type(targets).__name__}")
    data, source = {}, "recipe"
    if path is not None:
        p, source = Path(path), str(path)
        if not p.is_file():
            raise BirdboneError(f"{p}: recipe file not found")
        try:
            data = read_yaml(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BirdboneError(f"{p}: not valid YAML ({first})") from None
    if targets:
        if data is not None and not isinstance(data, dict):
            return parse_recipe(data, source)     # says what is wrong with the file itself
        data = apply_targets(data or {}, targets)
        source += " with --targets"
    return parse_recipe(data, source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
