"""Keep a GGUF source's own blocks where re-encoding could only add error.

A model loaded from a quantized GGUF holds, in float, exactly the dequantization of the file's blocks.
Re-encoding such a tensor in the *same* block type can at best reproduce those blocks (llama.cpp's
`llama-quantize` from an F16/F32 export re-searches scales and usually lands on a slightly different
grid: rounding error on top of rounding error). So when a tensor's weights are bit-identical to the
dequantized source tensor, the source's packed bytes are an exact candidate for that type, with zero
error; the bit budget weighs it against every other type as usual. Tensors that pruning or healing
changed fail the equality check and are encoded from their weights.

    source_blocks(path, plans, types) -> {gguf name: (type, packed uint8 [rows, row_bytes])}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.formats import FORMATS, get_format


def source_blocks(path: Path, plans, allowed: dict[str, list[str]]) -> dict[str, tuple[str, np.ndarray]]:
    """plans: export TensorPlans (gguf_name, shape, load() -> float32 in GGUF layout); allowed: gguf name
    -> candidate types. Only tensors whose source type is allowed for them are read and compared."""
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises bare ValueError/struct errors on corrupt files
        raise BirdboneError(f"source GGUF {path}: cannot read it ({e})") from None
    by_name = {p.gguf_name: p for p in plans}
    kept: dict[str, tuple[str, np.ndarray]] = {}
    for t in reader.tensors:
        p = by_name.get(t.name)
        name = t.tensor_type.name
        if p is None or name not in FORMATS or get_format(name).block_size == 1 or name not in allowed.get(t.name, ()):
            continue
        # gguf shapes are innermost-first; plans are outermost-first (rows, row length)
        if tuple(int(d) for d in reversed(t.shape.tolist())) != tuple(p.shape):
            continue
        data = np.asarray(t.data)
        W_src = dequantize(data, t.tensor_type).reshape(p.shape)
        if np.array_equal(W_src.astype(np.float32), p.load()):
            kept[t.name] = (name, np.ascontiguousarray(data.reshape(p.shape[0], -1), dtype=np.uint8))
    return kept
