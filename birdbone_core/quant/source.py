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
from birdbone_core.quant.codecs import codec_names, decode
from birdbone_core.runtime import drop_mapped_pages


def source_blocks(path: Path, plans, allowed: dict[str, list[str]]) -> dict[str, tuple[str, np.ndarray]]:
    """plans: export TensorPlans (gguf_name, shape, load() -> float32 in GGUF layout); allowed: gguf name
    -> candidate types. Only tensors whose source type is allowed for them are read and compared.
    The tensor table comes from the fast header walk (gguf.GGUFReader would first build every metadata
    item: ~45 s for a 262k-token vocabulary); the data is read through a memory map."""
    from gguf.constants import GGMLQuantizationType

    from birdbone_core.model.gguf_header import GgufHeaderError, read_gguf_header

    try:
        header = read_gguf_header(Path(path))
    except (GgufHeaderError, OSError) as e:
        raise BirdboneError(f"source GGUF {path}: cannot read it ({e})") from None
    data_map = np.memmap(path, dtype=np.uint8, mode="r")
    by_name = {p.gguf_name: p for p in plans}
    kept: dict[str, tuple[str, np.ndarray]] = {}
    for t in header.tensors:
        p = by_name.get(t.name)
        try:
            qtype = GGMLQuantizationType(t.ggml_type)
        except ValueError:
            continue
        name = qtype.name
        if p is None or name not in codec_names() or name not in allowed.get(t.name, ()):   # block types only
            continue
        # gguf shapes are innermost-first; plans are outermost-first (rows, row length)
        if tuple(reversed(t.shape)) != tuple(p.shape):
            continue
        rows = int(np.prod(p.shape[:-1]))
        data = np.asarray(data_map[t.offset:t.offset + t.n_bytes]).reshape(rows, -1)   # [rows, row bytes]
        W_src = decode(name, data, p.shape).numpy()          # gguf-py's values, bit for bit
        if np.array_equal(W_src, p.load()):
            kept[t.name] = (name, np.ascontiguousarray(data, dtype=np.uint8))
        drop_mapped_pages(data_map)         # read again only if the budget keeps these blocks
    return kept
