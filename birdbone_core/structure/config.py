"""The recipe's `structure:` section: cuts applied once, before any pruning, to make the run's base model.

    structure: {vocab: 16384, ffn: 0.4, waves: 4, heal_steps: 40, stop_loss: 0.05}

Order within a wave: vocabulary (first wave only), then layers, then FFN neurons / KV groups, then healing,
then the stop-loss check (birdbone_core.structure.apply). Every wave is recorded so that any earlier state,
the uncut model included, is rebuilt exactly (birdbone_core.structure.records).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


class Structure(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab: int | None = Field(None, description="tokens to keep: those vocab_corpus needs (with every piece "
                                                "merged on the way to them), then the tokenizer's most likely "
                                                "pieces; 0 = only what the corpus needs; None = keep the vocabulary")
    vocab_corpus: str | None = Field(None, description="domain text for vocab (.txt/.jsonl[.gz]); None = the "
                                                       "built-in calibration slice")
    layers: int = Field(0, ge=0, description="decoder layers to drop (never the first or last)")
    ffn: float = Field(0.0, ge=0.0, lt=1.0, description="share of FFN neurons removed in every layer")
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="share of KV head groups removed in every layer")
    per_layer: bool = Field(False, description="ffn and heads each by one ranking over all layers, so each layer "
                                               "keeps its own width and KV head count (llama/mistral only: "
                                               "exported as llama.cpp's deci)")
    metric: Literal["angular", "bi", "kl"] = Field("angular", description="layer importance for `layers`")
    multiple: int = Field(32, ge=1, description="kept FFN / attention widths are multiples of this (256 for "
                                                "K-quants)")
    heal_steps: int = Field(0, ge=0, le=1_000_000, description="distillation steps from the uncut model after "
                                                               "the cuts (0: none)")
    heal_lr: float | None = Field(None, gt=0, le=1.0, description="healing learning rate; None = 3e-5")
    waves: int = Field(1, ge=1, le=100, description="split the layer, FFN and head cuts into this many waves, "
                                                    "each healed by heal_steps and checked by stop_loss (the "
                                                    "vocabulary goes with the first)")
    stop_loss: float | None = Field(None, gt=0, description="largest relative rise of held-out bits per byte over "
                                                            "the uncut model a wave may leave: a wave beyond it is "
                                                            "reverted exactly and cutting stops; None = no check")

    @model_validator(mode="after")
    def _something(self) -> "Structure":
        if self.vocab is None and not (self.layers or self.ffn or self.heads):
            raise ValueError("nothing to remove: give vocab, layers, ffn and/or heads")
        if self.vocab is not None and self.vocab != 0 and self.vocab < 256:
            raise ValueError(f"vocab {self.vocab} is fewer than the 256 byte tokens every vocabulary keeps")
        if self.per_layer and self.waves > 1:
            raise ValueError("per_layer ranks every layer's neurons at once: give it waves: 1")
        return self

    @model_serializer(mode="wrap")
    def _omit_later_defaults(self, handler):
        # waves / stop_loss are left out at their defaults so that a recipe without them keeps the hash
        # (Recipe.sha256) and YAML it had before they existed: existing run directories stay valid
        d = handler(self)
        if self.waves == 1:
            d.pop("waves", None)
        if self.stop_loss is None:
            d.pop("stop_loss", None)
        return d
