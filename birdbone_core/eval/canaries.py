"""Canaries: the few prompts a user must not lose, listed in the recipe (`evaluation.canaries`).

    canaries:
      - {name: len-builtin, prompt: "To get the number of items in a list, call the built-in function",
         choices: [" len", " size", " count"], answer: 0}      # log-likelihood ranking
      - {name: none-keyword, prompt: "The null object in Python is called", expect: " None"}  # greedy match

A `choices` canary passes when the answer has the highest log-likelihood after the prompt. An `expect`
canary passes when greedy decoding reproduces the expected text token for token (lm-eval's is_greedy:
every token of `expect` is the argmax given the prompt and the tokens before it). A failed canary is
reported by name, with what the model preferred instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(..., min_length=1, description="names the canary in reports and errors")
    prompt: str = Field(..., min_length=1, description="text the model continues")
    expect: str | None = Field(None, min_length=1, description="continuation greedy decoding must produce")
    choices: list[str] | None = Field(None, min_length=2, description="continuations ranked by log-likelihood")
    answer: int = Field(0, ge=0, description="index of the right choice")

    @model_validator(mode="after")
    def _one_kind(self) -> "Canary":
        if (self.expect is None) == (self.choices is None):
            raise ValueError(f"canary {self.name!r}: give exactly one of 'expect' or 'choices'")
        if self.choices is not None and self.answer >= len(self.choices):
            raise ValueError(f"canary {self.name!r}: answer {self.answer} is out of range for "
                             f"{len(self.choices)} choices")
        return self


@dataclass(frozen=True)
class CanaryResult:
    name: str
    kind: str               # "choices" | "expect"
    passed: bool
    detail: str             # one line: what was expected and what the model preferred
    logliks: list[float]    # per choice, or [log p(expect | prompt)]

    def as_dict(self) -> dict:
        return asdict(self)


def rank_choices(logliks: list[float], answer: int) -> tuple[bool, int]:
    """(answer has the strictly highest log-likelihood, index of the best choice). Ties fail."""
    best = max(range(len(logliks)), key=lambda i: logliks[i])
    top = logliks[best]
    return best == answer and sum(1 for x in logliks if x == top) == 1, best


def check_canaries(adapter, canaries: list[Canary]) -> list[CanaryResult]:
    """Score every canary with an adapter from birdbone_core.eval.adapters (TorchLM or LlamaCppLM)."""
    out = []
    for c in canaries:
        if c.choices is not None:
            scores = adapter.score_pairs([(c.prompt, x) for x in c.choices])
            lls = [s[0] for s in scores]
            ok, best = rank_choices(lls, c.answer)
            detail = (f"{c.choices[c.answer]!r} ranked first" if ok else
                      f"expected {c.choices[c.answer]!r}, model prefers {c.choices[best]!r}")
            out.append(CanaryResult(c.name, "choices", ok, detail, lls))
        else:
            ll, ok = adapter.score_pairs([(c.prompt, c.expect)])[0]
            if ok:
                detail = f"greedy continuation is {c.expect!r}"
            else:
                n = max(1, len(adapter.encode(c.expect, bos=False)))
                detail = f"expected {c.expect!r}, greedy gives {adapter.greedy(c.prompt, n, []) !r}"
            out.append(CanaryResult(c.name, "expect", ok, detail, [ll]))
    return out


def failed(results: list[CanaryResult]) -> list[str]:
    return [r.name for r in results if not r.passed]


def summary(results: list[CanaryResult]) -> str:
    bad = failed(results)
    if not bad:
        return f"canaries: {len(results)}/{len(results)} passed"
    return f"canaries: {len(results) - len(bad)}/{len(results)} passed; failed: {', '.join(bad)}"
