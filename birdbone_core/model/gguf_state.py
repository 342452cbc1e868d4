"""A GGUF file's weights as a Hugging Face state dict, one tensor at a time: each tensor's blocks are read
from the file (its offset from the header, birdbone_core.model.gguf_header), dequantized (bit for bit as
gguf-py dequantizes them), and given the transform transformers' GGUF loader applies (its per-architecture
TensorProcessor: Llama's q/k rows back to HF's RoPE layout, Gemma's norms minus 1) under the name that
loader gives it. So a streamed model from a GGUF sees the very tensors `from_pretrained(..., gguf_file=...)`
builds, without the whole dequantized model in memory."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.model.default import cache_dir_default
from birdbone_core.model.gguf_header import TensorInfo, read_gguf_header
from birdbone_core.quant.codecs import codec_names, decode


def converted_metadata(path: Path) -> Path:
    """A directory with the config.json and tokenizer files transformers makes of this GGUF's metadata
    (`AutoConfig`/`AutoTokenizer.from_pretrained(..., gguf_file=...)`), converted once and kept in the cache
    ($BIRDBONE_CACHE/gguf-meta/): transformers parses the whole metadata again for each of the two (Gemma 3's
    262,144-token vocabulary: about 12 s and 15 s), the saved files load in about a second. Keyed by the
    header's bytes (everything before the tensor data, where config and tokenizer come from) and the
    transformers version, so an edited file or another converter never reads a stale copy."""
    import transformers

    path = Path(path)
    digest = hashlib.sha256(transformers.__version__.encode())
    with open(path, "rb") as f:
        left = read_gguf_header(path).data_offset
        while left > 0 and (chunk := f.read(min(left, 1 << 22))):
            digest.update(chunk)
            left -= len(chunk)
    out = cache_dir_default() / "gguf-meta" / digest.hexdigest()[:32]
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoTokenizer

    where = dict(gguf_file=path.name, local_files_only=True)
    config = AutoConfig.from_pretrained(str(path.parent), **where)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **where)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError:              # a read-only cache: convert into a temporary directory, every time
        tmp = out = Path(tempfile.mkdtemp(prefix="birdbone-gguf-meta-"))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if tmp != out:
            try:
                os.rename(tmp, out)    # atomic; a process that converted the same header first wins: the same files
            except OSError:
                if not (out / "config.json").is_file():
                    raise
    finally:
        if tmp != out:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class GGUFState(Mapping):
    """HF name -> float32 tensor (cast to `dtype` when given), for the meta-device `model` built from this
    GGUF's config. `shapes` come from the header without reading any data."""

    def __init__(self, path: Path, model, dtype: torch.dtype | None = None):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path, self.dtype = Path(path), dtype
        header = read_gguf_header(self.path)
        arch = header.metadata.get("general.architecture")
        config = model.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.infos: dict[str, TensorInfo] = {}
        for info in header.tensors:
            hf = to_hf.get(info.name)
            if hf is None:
                if info.name == "rope_freqs.weight":        # generated from the config, not a weight
                    continue
                raise BirdboneError(f"{self.path}: tensor {info.name} has no place in the {arch} model")
            self.infos[hf] = info
        self.shapes = {n: tuple(reversed(i.shape)) for n, i in self.infos.items()}
        self.stored = {n: torch.float32 for n in self.infos}

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            raw = np.frombuffer(bytearray(f.read(info.n_bytes)), dtype=np.uint8)   # writable: torch shares it
        shape = self.shapes[name]
        if qtype == gguf.GGMLQuantizationType.F32:
            a = raw.view(np.float32).reshape(shape)
        elif qtype == gguf.GGMLQuantizationType.F16:
            a = raw.view(np.float16).reshape(shape).astype(np.float32)
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
            # birdbone's torch decoders give gguf-py's values bit for bit, 6x faster on a Q8_0 embedding
            a = (decode(qtype.name, raw, shape).numpy() if qtype.name in codec_names()
                 else gguf.quants.dequantize(raw, qtype))
        a = self.processor.process(a, info.name).weights
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return t if self.dtype is None or self.dtype == torch.float32 else t.to(self.dtype)

    def __contains__(self, name: object) -> bool:      # Mapping's own would read (and dequantize) the tensor
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)
