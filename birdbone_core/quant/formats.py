"""The one table of GGUF tensor formats birdbone writes or reads.

Block geometry (weights per block, bytes per block) comes from `gguf.constants.GGML_QUANT_SIZES`, the
same numbers llama.cpp's ggml uses; nothing here is retyped. `quantizable` says whether the `gguf`
Python package (0.19) can *produce* the format (`gguf.quants.quantize`); every listed format can be
read back (dequantized) by it.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf.quants
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from birdbone_core.errors import BirdboneError


@dataclass(frozen=True)
class TensorFormat:
    name: str  # upper-case GGML name, e.g. "Q8_0"
    qtype: GGMLQuantizationType
    block_size: int  # weights per block (1 for plain float types)
    type_size: int  # bytes per block
    quantizable: bool  # gguf.quants.quantize can write it

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def n_bytes(self, n_weights: int) -> int:
        """Bytes taken by `n_weights` weights (must be a whole number of blocks)."""
        if n_weights % self.block_size:
            raise BirdboneError(
                f"{n_weights} weights are not a whole number of {self.name} blocks of {self.block_size}")
        return n_weights // self.block_size * self.type_size


_NAMES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def _gguf_can_quantize(qtype: GGMLQuantizationType, block: int) -> bool:
    """Ask the installed `gguf` package itself (0.19: F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0)."""
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def _build() -> dict[str, TensorFormat]:
    table = {}
    for name in _NAMES:
        qtype = GGMLQuantizationType[name]
        block, size = GGML_QUANT_SIZES[qtype]
        table[name] = TensorFormat(name, qtype, block, size, _gguf_can_quantize(qtype, block))
    return table


FORMATS: dict[str, TensorFormat] = _build()
_BY_QTYPE: dict[GGMLQuantizationType, TensorFormat] = {f.qtype: f for f in FORMATS.values()}


def get_format(name: str | GGMLQuantizationType) -> TensorFormat:
    """Look a format up by name (case-insensitive) or by `GGMLQuantizationType`."""
    if isinstance(name, GGMLQuantizationType):
        fmt = _BY_QTYPE.get(name)
        if fmt is None:
            raise BirdboneError(f"GGUF tensor type {name.name} is not supported; supported: {', '.join(FORMATS)}")
        return fmt
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise BirdboneError(f"unknown GGUF tensor format {name!r}; known: {', '.join(FORMATS)}")
    return fmt


def bits_per_weight(name: str | GGMLQuantizationType) -> float:
    """Storage bits per weight of a format, block scales included (Q8_0: 8.5, Q4_K: 4.5, F16: 16)."""
    return get_format(name).bits_per_weight


def can_apply(name: str | GGMLQuantizationType, row_length: int) -> bool:
    """Whether a tensor whose rows (innermost dimension) hold `row_length` weights fits the format's blocks."""
    return row_length > 0 and row_length % get_format(name).block_size == 0


def quantizable_formats() -> list[str]:
    """Names of the formats the `gguf` package can write."""
    return [f.name for f in FORMATS.values() if f.quantizable]
