"""The `heal:` recipe section: how a pruned model is trained back toward the dense one.

    heal: {method: blockwise, steps: 200, lr: 2.0e-4, trainable: weights, taper: true}

lr defaults by method: 2e-4 for blockwise, 3e-5 for distill (see Heal.base_lr).

Healing data defaults to the recipe's calibration blocks; n_samples / seq_len / seed override them.
With taper, wave k of R (k = 1..R) gets steps_k = steps * (1 - (k-1)/R) and lr_k = lr * (1 - (k-1)/R):
early waves, which remove the most salient structure first, get the most repair.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

HEAL_METHODS = ("blockwise", "distill", "none")
TRAINABLE = ("weights", "norms", "lora", "qlora")


class Lora(BaseModel):
    """LoRA adapters for trainable 'lora' / 'qlora' (birdbone_core.heal.lora)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=4096, description="adapter rank r")
    alpha: float = Field(16.0, gt=0, description="scaling alpha / r applied to B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input while training")
    targets: list[str] = Field(default_factory=list, description="regexes over linear module names inside "
                                                                 "a decoder layer (e.g. 'proj$'); empty = all")


class Heal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["blockwise", "distill", "none"] = Field(
        "blockwise", description="blockwise: each decoder layer toward the dense layer's outputs; distill: "
                                 "the whole model toward the dense model's top-k logits; none: no healing")
    steps: int = Field(200, ge=0, le=1_000_000,
                       description="optimizer steps (per layer for blockwise, total for distill)")
    lr: float | None = Field(
        None, gt=0, le=1.0, description="peak learning rate; None = 2e-4 for blockwise, 3e-5 for distill")
    trainable: Literal["weights", "norms", "lora", "qlora"] = Field(
        "weights", description="'weights': surviving linear weights (+ biases), pruning mask enforced; "
                               "'norms': only the norm scales; 'lora': LoRA adapters merged back, mask "
                               "re-applied; 'qlora': the same over an nf4 4-bit base")
    lora: Lora = Field(Lora(), description="adapter settings for trainable lora / qlora")
    batch_size: int = Field(8, ge=1, description="samples per minibatch")
    n_samples: int | None = Field(None, ge=1, le=100_000, description="healing samples; None = calibration's")
    seq_len: int | None = Field(None, ge=8, le=131_072, description="healing sample length; None = calibration's")
    seed: int | None = Field(None, description="healing data seed; None = calibration's")
    taper: bool = Field(False, description="shrink steps and lr linearly over pruning waves")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay (0 = Adam)")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="lr over the steps of one cycle")
    block_loss: Literal["mse", "relative"] = Field(
        "mse", description="blockwise: plain MSE, or per-token ||dY||^2/||Y||^2 (every token weighs alike)")
    top_k: int = Field(64, ge=1, le=4096, description="distill: teacher logits kept per position")
    revert_if_worse: bool = Field(
        True, description="blockwise: restore a layer whose reconstruction loss healing did not lower")

    @property
    def base_lr(self) -> float:
        """The configured lr, or the method's default (end-to-end distillation moves every layer at once
        and diverged at 2e-4 on Gemma 3 270M, where block-wise reconstruction heals best near it)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR.get(self.method, DEFAULT_LR["blockwise"])


DEFAULT_LR = {"blockwise": 2e-4, "distill": 3e-5}


def schedule(cfg: Heal, wave: int, n_waves: int) -> tuple[int, float]:
    """(steps, lr) for pruning wave `wave` (1-based) of `n_waves`; without taper, the configured values."""
    if n_waves < 1 or not 1 <= wave <= n_waves:
        raise ValueError(f"wave must be in 1..n_waves, got wave={wave}, n_waves={n_waves}")
    if not cfg.taper:
        return cfg.steps, cfg.base_lr
    f = 1.0 - (wave - 1) / n_waves
    return max(int(round(cfg.steps * f)), 0), cfg.base_lr * f


def healing_data(cfg: Heal, calibration):
    """The calibration section to draw healing blocks from: `calibration` with this section's overrides.

    `calibration` is the recipe's Calibration (any pydantic model with n_samples, seq_len, seed).
    """
    update = {k: v for k, v in (("n_samples", cfg.n_samples), ("seq_len", cfg.seq_len), ("seed", cfg.seed))
              if v is not None}
    return calibration.model_copy(update=update) if update else calibration
