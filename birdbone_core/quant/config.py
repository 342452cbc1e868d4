"""The recipe's `quantize:` section: mixed-type GGUF under a bit budget.

    quantize:
      target_bpw: 4.5            # average bits per weight over all tensor data (or target_bytes, target_size)
      types: [Q4_0, Q5_0, Q8_0, Q4_K, Q6_K]     # candidate block types of 2-D weights
      overrides: {'token_embd': Q4_0}           # regex over GGUF tensor names -> fixed type
      stress: {'blk\\.0\\.': 2.0}               # regex -> multiplier on a tensor's measured error
      importance: true           # importance-weighted scale search (imatrix)
      imatrix: path/to/imatrix.gguf             # a llama-imatrix file (GGUF or .dat) instead of our own
      gptq: {enabled: true, act_order: true, block_size: 128, damp: 0.01}
      shortlist: 1               # encode only the sizes near the budget's pick (quant/survey.py)
      measure_blocks: 4          # score the big tensors' type choices by measured KL (quant/trials.py)

1-D tensors (norms) stay F32, as llama.cpp keeps them. A tensor whose rows do not fit a type's blocks
(rows not a multiple of 256 -> no K-quants) never gets that type.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# the block types birdbone encodes (quant/grid.py TOP; kept literal so recipes load without torch)
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
OVERRIDE_TYPES = (*BLOCK_TYPES, "F16", "F32")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> tuple[float, bool]:
    """"160MB" -> (160e6, False): bytes; "60%" or "0.6" -> (0.6, True): a share of the source file."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(%|[KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"size {text!r}: give bytes with a unit (160MB, 1.5GB, 700MiB) or a share of the "
                         "source (60% or 0.6)")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit == "%" or (not unit and value < 1):
        share = value / 100 if unit == "%" else value
        if not 0 < share < 1:
            raise ValueError(f"size {text!r}: a share of the source must be between 0 and 100%")
        return share, True
    if value < 1:
        raise ValueError(f"size {text!r}: must be at least one byte")
    return value * _UNITS[unit], False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regex {pattern!r}: {e}") from None
    return pattern


def _type_name(t: str, allowed: tuple[str, ...]) -> str:
    u = str(t).upper()
    if u not in allowed:
        raise ValueError(f"unknown tensor type {t!r}; choose from {', '.join(allowed)}")
    return u


class GPTQConfig(_Strict):
    enabled: bool = Field(True, description="GPTQ error feedback on 2-D weights (false: plain rounding)")
    act_order: bool = Field(True, description="quantize columns in order of decreasing Hessian diagonal")
    static_scales: bool = Field(False, description="fit every block's grid on the original W before the "
                                                   "column loop (act_order forces it)")
    block_size: int = Field(128, ge=32, le=4096, description="columns per lazy batch update")
    damp: float = Field(0.01, gt=0, le=1, description="Hessian dampening, as a fraction of its mean diagonal")
    # the tied token embedding is both a lookup table and the LM head: GPTQ (along the head's Hessian)
    # lowers the head's error and raises the lookups'. The estimate ranks the two encodings; for a big
    # tensor such as Gemma's embedding both are kept and quant.trials measures them (on Gemma, GPTQ's
    # IQ4_NL embedding measured 29% lower KL than rounding's, where the estimate preferred rounding for Q5_0)
    skip: list[str] = Field(default_factory=list, description="regexes of GGUF names: plain rounding only")

    @field_validator("skip")
    @classmethod
    def _skip(cls, v: list[str]) -> list[str]:
        return [_regex(x) for x in v]

    def applies_to(self, gguf_name: str) -> bool:
        return self.enabled and not any(re.search(p, gguf_name) for p in self.skip)


class Quantize(_Strict):
    target_bpw: float | None = Field(None, gt=1.5, le=32, description="average bits per weight, all tensor data")
    target_bytes: int | None = Field(None, gt=0, description="bytes of tensor data (the file adds its header)")
    target_size: str | None = Field(None, description="the GGUF file's size, header included: 160MB, 1.5GB, "
                                    "160000000 (bytes), or a share of the source file: 60% or 0.6")
    types: list[str] = Field(default_factory=lambda: ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1",
                                                      "Q5_K", "Q6_K", "Q8_0", "IQ4_NL"],
                             description="candidate block types of 2-D weights", validate_default=True)
    overrides: dict[str, str] = Field(default_factory=dict, description="regex over GGUF names -> type")
    stress: dict[str, float] = Field(default_factory=dict, description="regex -> error multiplier (more bits)")
    importance: bool = Field(True, description="importance-weighted scale search (our own imatrix)")
    imatrix: str | None = Field(None, description="llama-imatrix file (GGUF or legacy .dat)")
    gptq: GPTQConfig = Field(GPTQConfig(), description="GPTQ settings")
    n_samples: int | None = Field(None, ge=1, description="calibration blocks (default: recipe calibration)")
    measure_blocks: int = Field(4, ge=0, description="blocks (fresh windows of the calibration text) on which "
                                "the allocations that differ in the big tensors' types are scored by measured KL; "
                                "0 trusts the estimate")
    shortlist: int | None = Field(1, ge=0, description="encode in full (GPTQ included) only the types a cheap "
                                  "survey on a sample of each tensor's rows puts near the budget's choice: the "
                                  "chosen size and this many sizes either side (big tensors one more); null "
                                  "encodes every allowed type")
    keep_source: bool = Field(True, description="a tensor still equal to its GGUF source's blocks may keep them "
                                                "(an exact candidate of the source type) instead of re-encoding")

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one candidate type is needed")
        return sorted({_type_name(t, BLOCK_TYPES) for t in v}, key=BLOCK_TYPES.index)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: dict[str, str]) -> dict[str, str]:
        return {_regex(k): _type_name(t, OVERRIDE_TYPES) for k, t in v.items()}

    @field_validator("stress")
    @classmethod
    def _stress(cls, v: dict[str, float]) -> dict[str, float]:
        for k, f in v.items():
            _regex(k)
            if not f > 0:
                raise ValueError(f"stress factor for {k!r} must be > 0, got {f}")
        return v

    @field_validator("target_size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @model_validator(mode="after")
    def _one_target(self) -> "Quantize":
        given = [k for k in ("target_bpw", "target_bytes", "target_size") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of target_bpw, target_bytes, target_size, not {' and '.join(given)}")
        return self

    def has_target(self) -> bool:
        return any(v is not None for v in (self.target_bpw, self.target_bytes, self.target_size))

    def override_for(self, gguf_name: str) -> str | None:
        for pat, t in self.overrides.items():
            if re.search(pat, gguf_name):
                return t
        return None

    def stress_for(self, gguf_name: str) -> float:
        f = 1.0
        for pat, m in self.stress.items():
            if re.search(pat, gguf_name):
                f *= m
        return f
