"""What every codec is: a GGUF block format (facts from `formats.py`) with a block encoder and decoder."""
from __future__ import annotations

import torch

from birdbone_core.quant.formats import TensorFormat, get_format


class Codec:
    """One GGUF block format.

    `encode(x, qw)`: x float32 [R, nb, block_size] (R rows of nb blocks each), qw optional float32
    [nb, block_size] importance of each weight position of a row (the same for every row, as a
    llama.cpp imatrix) -> uint8 [R, nb, type_size]. Rows are whole, so row statistics are available.
    `decode(b)`: uint8 [N, type_size] -> float32 [N, block_size], computed with exactly the float
    operations of gguf-py / ggml so the results are bit-identical.
    """

    name: str = ""
    # The integer levels inside a block (birdbone_core.quant.grid): every weight decodes as
    # step * q + offset (table formats: step * table[q] + offset) with q in 0..top, stored in the block's
    # bytes [levels_at[0], levels_at[1]) as unpack_levels / pack_levels read and write them.
    top: int = 0
    levels_at: tuple[int, int] = (0, 0)
    table: torch.Tensor | None = None
    # weights encoded per step (None: codecs.CHUNK_WEIGHTS); a search whose temporaries are many times
    # its chunk (IQ4_NL: [R, nb, 16 tries, 32]) runs faster on a chunk that stays in cache
    chunk_weights: int | None = None

    def unpack_levels(self, fields: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """uint8 [N, b - a] (the level bytes of N blocks) -> integer levels [N, block_size]."""
        raise NotImplementedError

    def pack_levels(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Integer levels [N, block_size] (0..top) -> uint8 [N, b - a]."""
        raise NotImplementedError

    def __init__(self) -> None:
        self.fmt: TensorFormat = get_format(self.name)

    @property
    def block_size(self) -> int:
        return self.fmt.block_size

    @property
    def type_size(self) -> int:
        return self.fmt.type_size

    def encode(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode(self, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _check_packed(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate the byte fields of a block and check the block is `type_size` bytes long."""
        out = torch.cat([p.to(torch.uint8) for p in parts], dim=-1)
        if out.shape[-1] != self.type_size:
            raise AssertionError(f"{self.name}: packed {out.shape[-1]} bytes per block, format says {self.type_size}")
        return out


def split_fields(b: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split packed blocks [N, type_size] into consecutive byte fields of the given sizes."""
    if sum(sizes) != b.shape[-1]:
        raise AssertionError(f"block fields {sizes} do not add up to {b.shape[-1]} bytes")
    return list(torch.split(b, sizes, dim=-1))


def importance_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """llama.cpp's per-weight weights under an imatrix: qw * sqrt(sigma2 + x^2), sigma2 broadcast
    against x (a per-row or per-super-block mean square)."""
    return qw * torch.sqrt(sigma2 + x * x)
