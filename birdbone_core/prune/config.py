"""The `prune:` recipe section: which weights a pruning pass zeroes, and how it scores them.

    prune: {method: sparsegpt, sparsity: 0.5, pattern: unstructured, skip: ["lm_head"]}

`layer_sparsity` maps regexes over module names relative to the model ("model.layers.3.mlp.down_proj")
to per-module sparsities (first match wins); `allocation: owl` spreads the sparsity over layers by their
outliers instead (birdbone_core.prune.owl).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
_NM = re.compile(r"^(\d+):(\d+)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Owl(BaseModel):
    """OWL settings; `allocation: owl` in a recipe means the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["owl"] = Field("owl", description="outlier-weighted layerwise sparsity (Yin et al. 2023)")
    m: float = Field(5.0, gt=0, description="a score is an outlier above m times its layer's mean score")
    lam: float = Field(0.08, ge=0, lt=0.5, description="per-layer sparsity stays within target +/- lam")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward batch")


def _coerce(v):
    return {"method": "owl"} if v == "owl" else v


# `Prune.allocation`: "uniform" (every module at the global sparsity) or an Owl section ("owl" = defaults)
Allocation = Annotated[Union[Literal["uniform"], Owl], BeforeValidator(_coerce)]


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None


class SparseGPTSettings(_Strict):
    """Settings of the SparseGPT solver (birdbone_core.prune.sparsegpt)."""

    blocksize: int = Field(128, ge=1, description="columns pruned and updated together (lazy batch updates)")
    percdamp: float = Field(0.01, gt=0, le=1, description="Hessian dampening, as a fraction of its mean diagonal")


class Prune(_Strict):
    """One pruning pass (one-shot, or each wave's)."""

    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "sparsegpt", description="weight scores: |w|, Wanda's |w|·‖x‖, or SparseGPT's OBS with weight updates")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N zeros in every M inputs), e.g. 2:4")
    # regex over module names relative to the model ("model.layers.3.mlp.down_proj") -> sparsity
    layer_sparsity: dict[str, float] = Field(default_factory=dict, description="regex over module names -> "
                                             "sparsity; the first match wins over `sparsity`")
    skip: list[str] = Field(default_factory=list, description="regexes of linear modules left dense")
    sparsegpt: SparseGPTSettings = Field(SparseGPTSettings(), description="SparseGPT solver settings")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward batch")
    allocation: Allocation = Field(
        "uniform", description="'uniform', or 'owl' / {method: owl, m, lam}: outlier-weighted per-layer "
                               "sparsity (birdbone_core.prune.owl)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = _NM.match(v)
        if not m or not (0 < int(m.group(1)) < int(m.group(2))):
            raise ValueError(f"{v!r} is neither 'unstructured' nor 'N:M' with 0 < N < M (e.g. '2:4')")
        return v

    @field_validator("layer_sparsity")
    @classmethod
    def _layer_sparsity(cls, v: dict[str, float]) -> dict[str, float]:
        for pat, s in v.items():
            _compile(pat)
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity for {pat!r} must be in [0, 1), got {s}")
        return v

    @field_validator("skip")
    @classmethod
    def _skip(cls, v: list[str]) -> list[str]:
        for pat in v:
            _compile(pat)
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N zeros, M group) for N:M patterns, else None."""
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def sparsity_for(self, module_name: str) -> float | None:
        """Target sparsity of one linear module (None = skip it). First matching override wins."""
        if any(re.search(p, module_name) for p in self.skip):
            return None
        for pat, s in self.layer_sparsity.items():
            if re.search(pat, module_name):
                return s
        return self.sparsity
