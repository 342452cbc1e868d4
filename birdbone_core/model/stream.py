"""Models too big to hold: a Hugging Face safetensors directory read one decoder layer at a time.

    state = SafetensorsState(directory, dtype=torch.float32)   # name -> tensor, read from disk on access
    sm = StreamedModel.open(directory, placement)              # the model on the meta device, except the
                                                               # embedding, final norm and head (materialized)
    for i in range(sm.n_layers):
        sm.load_layer(i)          # layer i's weights from disk onto the device
        ...                       # walk it (birdbone_core.model.walk)
        out.write(f"layer-{i:05d}", sm.layer_state(i)); sm.release_layer(i)   # one shard; freed (meta)
    out.write("rest", sm.rest_state()); out.finish(config, tokenizer)        # + the index, config, tokenizer

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
from safetensors import safe_open
from safetensors.torch import save_file

from birdbone_core.errors import BirdboneError
from birdbone_core.model import checks
from birdbone_core.model.layers import decoder_layers
from birdbone_core.runtime import Placement

STREAMED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INDEX = "model.safetensors.index.json"


class SafetensorsState(Mapping):
    """The tensors of a directory's *.safetensors files by name, each read from disk when asked for (and
    cast to `dtype` when given): a state dict whose memory is the one tensor the caller holds. `shapes`
    and `dtypes` come from the file headers without reading any data."""

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None):
        self.directory, self.dtype = Path(directory), dtype
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.stored: dict[str, torch.dtype] = {}
        for f in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    self.files[name], self.shapes[name] = f, tuple(sl.get_shape())
                    self.stored[name] = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
        if not self.files:
            raise BirdboneError(f"{self.directory}: no .safetensors weights")

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), framework="pt") as h:
            t = h.get_tensor(name)
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def nbytes(self) -> int:
        """Bytes of the tensors as stored."""
        return sum(_numel(s) * self.stored[n].itemsize for n, s in self.shapes.items())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def streamable(directory: str | Path) -> bool:
    """Whether `directory` is a safetensors checkpoint of a plain text causal LM that StreamedModel opens."""
    d = Path(directory)
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

    def __init__(self, model, state: SafetensorsState, device: torch.device, dtype: torch.dtype, directory: Path):
        self.model, self.state, self.device, self.dtype, self.directory = model, state, device, dtype, directory
        self.n_layers = len(decoder_layers(model))

    @classmethod
    def open(cls, directory: str | Path, placement: Placement | None = None, keep_dtype: bool = False):
        """keep_dtype: the directory is a run's own weights, which keep their stored dtype (runtime.Placement)."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        directory = Path(directory)
        placement = placement or Placement(torch.device("cpu"), "float32")
        state = SafetensorsState(directory)
        stored = next(iter(state.stored.values()))
        dtype = placement.dtype_for(stored, keep=keep_dtype)
        state.dtype = dtype
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with init_empty_weights(include_buffers=False):       # parameters on meta, buffers real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        expected = {n for n, _ in model.named_parameters(remove_duplicate=True)}
        tied = bool(getattr(config, "tie_word_embeddings", False))
        missing = sorted(expected - set(state) - ({"lm_head.weight"} if tied else set()))
        extra = sorted(set(state) - {n for n, _ in model.named_parameters(remove_duplicate=False)})
        if missing or extra:
            raise BirdboneError(f"{directory}: weights {'missing' if missing else 'without a place'} for this "
                                f"config.json (e.g. {(missing or extra)[0]})")
        sm = cls(model, state, placement.device, dtype, directory)
        sm._materialize([n for n in state if not n.startswith("model.layers.")])
        if tied:
            model.tie_weights()
        return sm

    def checkpoint_state(self, directory: str | Path | None = None) -> "ModelState":
        """The state of the model as `directory`'s checkpoint holds it (default: the one opened), in the
        model's dtype, named and ordered as `model.state_dict()` would be (a tied head under both names),
        each tensor read when asked for: what the ledger records of an in-memory model, without holding it."""
        state = self.state if directory is None else SafetensorsState(directory, self.dtype)
        return ModelState(list(self.model.state_dict().keys()), state)

    def _materialize(self, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name in names:
            t = self.state[name]
            want = self.state.shapes[name]
            if tuple(t.shape) != want:
                raise BirdboneError(f"{self.directory}: {name} has shape {tuple(t.shape)}, expected {want}")
            checks.check_values(name, t, str(self.directory))
            set_module_tensor_to_device(self.model, name, self.device, value=t)

    def layer_names(self, i: int) -> list[str]:
        return [n for n in self.state if n.startswith(layer_prefix(i))]

    def load_layer(self, i: int) -> None:
        self._materialize(self.layer_names(i))

    def release_layer(self, i: int) -> None:
        decoder_layers(self.model)[i].to("meta")

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
            raise BirdboneError(f"{state.directory}: no tensor {missing[0]}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[name if name in self.state else "model.embed_tokens.weight"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class ShardedWriter:
    """Writes a model directory one shard at a time into `directory` (the caller's atomic.staged_dir): a
    safetensors file per decoder layer plus one for the rest, then the index transformers reads, the config
    and the tokenizer."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{key}.safetensors"
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total += t.numel() * t.element_size()

    def finish(self, config, tokenizer, generation_config=None) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(self.directory)
        if generation_config is not None:
            generation_config.save_pretrained(self.directory)
        tokenizer.save_pretrained(self.directory)
