"""Models too big to hold: a Hugging Face safetensors directory (or a GGUF file: model/gguf_state.py) read one
decoder layer at a time.

    sm = StreamedModel.open(directory, placement)              # the model on the meta device, except the
                                                               # embedding, final norm and head (materialized)
    for i in range(sm.n_layers):
        sm.load_layer(i)          # layer i's weights from disk onto the device
        ...                       # walk it (birdbone_core.model.walk)
        for name, t in sm.layer_state(i).items(): out.write(name, t)   # into OUT/model.safetensors
        sm.release_layer(i)                                            # freed (meta again)
    for name, t in sm.rest_state().items(): out.write(name, t)       # embedding, norm, head last

Peak memory is one layer, the embedding/head and whatever the caller holds (calibration activations), not
the model. Only plain text causal LMs stream (llama, mistral, qwen2, qwen3, gemma3_text as written by
save_pretrained or the scale benchmark's generator); Gemma 3's multimodal wrapper and per-layer FFN
widths take the in-memory path (`streamable` says which).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.model import checks
from birdbone_core.model.layers import decoder_layers
from birdbone_core.model.tensors import ST_NAMES, SafetensorsState
from birdbone_core.runtime import Placement, release_freed_memory

STREAMED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
STREAMED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def streamable(directory: str | Path) -> bool:
    """Whether `directory` is a safetensors checkpoint of a plain text causal LM, or a GGUF file of one,
    that StreamedModel opens."""
    d = Path(directory)
    if d.is_file() and d.suffix.lower() == ".gguf":
        from birdbone_core.model.gguf_header import GgufHeaderError, read_gguf_header

        try:
            return read_gguf_header(d).metadata.get("general.architecture") in STREAMED_GGUF_ARCHS
        except (GgufHeaderError, OSError, ValueError):
            return False
    if not d.is_dir() or not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return False
    config = checks.read_config(d / "config.json")
    return config.get("model_type") in STREAMED_TYPES and not config.get("birdbone_ffn_widths")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class StreamedModel:
    """A causal LM whose decoder layers live on the meta device until loaded one at a time.

    model: the transformers model; its embedding, final norm and (untied) head are materialized on the
    placement's device, its buffers (RoPE frequencies, embedding scale) computed as at a normal load.
    state: the checkpoint's tensors in the placement's dtype (SafetensorsState).
    """

    def __init__(self, model, state: SafetensorsState, device: torch.device, dtype: torch.dtype, directory: Path,
                 config_dir: Path | None = None):
        self.model, self.state, self.device, self.dtype, self.directory = model, state, device, dtype, directory
        # where config.json and the tokenizer files are: the directory, or a GGUF's converted metadata
        self.config_dir = config_dir or directory
        self.n_layers = len(decoder_layers(model))

    @classmethod
    def open(cls, directory: str | Path, placement: Placement | None = None, keep_dtype: bool = False,
             materialize: bool = True):
        """keep_dtype: the directory is a run's own weights, which keep their stored dtype (runtime.Placement);
        materialize=False: nothing is read but the headers (all of the model stays on meta: for export)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        placement = placement or Placement(torch.device("cpu"))
        gguf_file = directory.suffix.lower() == ".gguf"
        if gguf_file:       # dequantized tensor by tensor (model.gguf_state): float32 unless placed otherwise
            from birdbone_core.model.gguf_state import converted_metadata

            config_dir = converted_metadata(directory)
            dtype = placement.dtype_for(None)
        else:
            config_dir = directory
            state = SafetensorsState(checks.safetensors_files(directory))
            dtype = placement.dtype_for(next(iter(state.stored.values())), keep=keep_dtype)
            state.dtype = dtype
        config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
        with init_empty_weights(include_buffers=False):       # parameters on meta, buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        if gguf_file:
            from birdbone_core.model.gguf_state import GGUFState

            state = GGUFState(directory, model, dtype)
        expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
        extra = sorted(set(state) - {n for n, _ in model.named_parameters(remove_duplicate=False)})
        if missing or extra:
            raise BirdboneError(f"{directory}: weights {'missing' if missing else 'without a place'} for this "
                                f"config.json (e.g. {(missing or extra)[0]})")
        if placement.device.type != "cpu":           # buffers (RoPE frequencies, embedding scale) join the layers
            for module in model.modules():
                for k, buf in module._buffers.items():
                    if buf is not None:
                        module._buffers[k] = buf.to(placement.device)
        sm = cls(model, state, placement.device, dtype, directory, config_dir)
        if materialize:
            sm.materialize_rest()
        else:
            sm._tie()
        return sm

    def materialize_rest(self) -> None:
        """The embedding, final norm and head from the checkpoint onto the device (again, after `release`)."""
        self._materialize([n for n in self.state if not n.startswith("model.layers.")])
        self._tie()

    def _tie(self) -> None:
        # a tied head shares the embedding's Parameter; moving or materializing either makes a new one
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def checkpoint_state(self, directory: str | Path | None = None) -> "ModelState":
        """The state of the model as `directory`'s checkpoint holds it (default: the one opened), in the
        model's dtype, named and ordered as `model.state_dict()` would be (a tied head under both names),
        each tensor read when asked for: what the ledger records of an in-memory model, without holding it."""
        state = self.state if directory is None else \
            SafetensorsState(checks.safetensors_files(Path(directory)), self.dtype)
        return ModelState(list(self.model.state_dict().keys()), state)

    def _materialize(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        params = dict(self.model.named_parameters(remove_duplicate=False))
        for name in names:
            t = self.state[name]
            want = tuple(params[name].shape)              # what config.json builds; the meta parameter's shape
            if tuple(t.shape) != want:
                raise BirdboneError(f"{self.directory}: {name} has shape {tuple(t.shape)}, config.json builds {want}")
            checks.check_values(name, t, str(self.directory))
            set_module_tensor_to_device(self.model, name, self.device, value=t)

    def layer_names(self, i: int) -> list[str]:
        return [n for n in self.state if n.startswith(layer_prefix(i))]

    def write_order(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every checkpoint tensor in the order a layer walk finishes them: layer 0's
        parameters, layer 1's, ..., then the rest (what a SafetensorsWriter needs up front)."""
        names = [layer_prefix(i) + n for i, layer in enumerate(decoder_layers(self.model))
                 for n, _ in layer.named_parameters()]
        names += [n for n in self.state if not n.startswith("model.layers.")]
        return [(n, self.dtype, self.state.shapes[n]) for n in names]

    def load_layer(self, i: int) -> None:
        self._materialize(self.layer_names(i))

    def release_layer(self, i: int) -> None:
        decoder_layers(self.model)[i].to("meta")
        release_freed_memory()

    def release(self) -> None:
        """Every parameter back to the meta device (the embedding and head a walk kept), memory handed back.
        The buffers (RoPE frequencies, embedding scale) stay: they are computed, not read."""
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(self.model.named_parameters()):
            set_module_tensor_to_device(self.model, name, "meta")
        self._tie()
        release_freed_memory()

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's parameters as CPU tensors under their checkpoint names (detached)."""
        layer = decoder_layers(self.model)[i]
        return {layer_prefix(i) + n: p.detach().cpu().contiguous() for n, p in layer.named_parameters()}

    def rest_state(self) -> dict[str, torch.Tensor]:
        """Everything but the decoder layers, as the checkpoint names it (a tied head is not repeated)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {n: params[n].detach().cpu().contiguous() for n in self.state if not n.startswith("model.layers.")}


class ModelState(Mapping):
    """A model's state dict in its own key order, each tensor read from a SafetensorsState on access; a key
    the checkpoint lacks (a tied head) reads the input embedding, which it shares."""

    def __init__(self, names: list[str], state: SafetensorsState):
        self.names, self.state = names, state
        missing = [n for n in names if n not in state and n != "lm_head.weight"]
        if missing:
            raise BirdboneError(f"checkpoint: no tensor {missing[0]}")

    def _source(self, name: str) -> str:
        return name if name in self.state else "model.embed_tokens.weight"

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[self._source(name)]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the checkpoint's headers (no data read)."""
        return {n: self.state.shapes[self._source(n)] for n in self.names}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class SafetensorsWriter:
    """One safetensors file written a tensor at a time: the header first (every name, dtype and shape is
    known before any data: pruning keeps shapes), then each tensor's bytes as it is handed over, in the
    header's order. Readers find tensors through the header's offsets, so any order is a valid file."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in specs:
            n = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)               # tensor data starts 8-byte aligned, as safetensors writes
        self._todo = [(n, d, tuple(s)) for n, d, s in specs]
        self._f = open(path, "wb")
        self._f.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self._todo[0] if self._todo else None
        if want is None or want != (name, t.dtype, tuple(t.shape)):
            raise ValueError(f"safetensors writer: got {name} {t.dtype}{list(t.shape)}, expected {want}")
        self._todo.pop(0)
        self._f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)

    def abort(self) -> None:
        """Close the file without checking it (the caller is failing; its staged directory goes away)."""
        self._f.close()

    def close(self) -> None:
        """Close the file; an error if any tensor was never written."""
        self._f.close()
        if self._todo:
            raise ValueError(f"safetensors writer: {len(self._todo)} tensors never written (e.g. {self._todo[0][0]})")


def write_config(directory: Path, model, tokenizer) -> None:
    """config.json, generation_config.json (when the model has one) and the tokenizer's files."""
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
