"""Models in: a source (model.source: what the spec names, checked cheaply) loaded as a float causal LM (on
the CPU in float32 unless a runtime placement says otherwise: birdbone_core.runtime).

Every problem a user can cause (missing/corrupt files, pickle weights, unsupported architecture, hub
access while offline) becomes a one-line BirdboneError naming the file and the problem, raised before
the expensive transformers load whenever the files themselves can tell.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported lazily, when a model is actually loaded
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from birdbone_core.errors import BirdboneError
from birdbone_core.model import checks
from birdbone_core.model.layers import decoder_layers
from birdbone_core.model.source import (
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_GGUF_ARCHS,
    ModelSource,
    check_config,
    preflight,
    resolve_source,
    stored_dtype,
    supported_list,
)
from birdbone_core.runtime import Placement


@dataclass
class LoadedModel:
    model: PreTrainedModel  # float (requested dtype), eval(), on the requested device, the *text* causal LM
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    model_type: str  # normalised HF model_type, e.g. "llama", "gemma3_text"
    gguf_arch: str  # llama.cpp architecture, e.g. "llama", "gemma3"


def load_model(
    spec: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    offline: bool = True,
    placement: Placement | None = None,
    keep_dtype: bool = False,
) -> LoadedModel:
    """Load the causal LM named by `spec` (None: the built-in default model) as a float model: on the CPU
    in `dtype`, or with `placement`, on its device in its dtype for this checkpoint (keep_dtype: the
    checkpoint is a run's own weights, whose stored dtype `auto` keeps; birdbone_core.runtime)."""
    if spec is None:
        from birdbone_core.model.default import default_model_path

        source = ModelSource("gguf", str(default_model_path()))
    else:
        source = resolve_source(spec, offline=offline)
    if placement is not None:
        dtype = placement.dtype_for(stored_dtype(source), keep=keep_dtype)

    try:
        with _quiet_transformers_progress():
            model, tokenizer = _load(source, dtype, allow_pickle, trust_remote_code)
    except BirdboneError:
        raise
    except MemoryError as exc:
        raise BirdboneError(f"{source.path}: out of memory while loading the model") from exc
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/RuntimeError/...
        raise BirdboneError(f"{source.path}: failed to load model ({_one_line(exc)})") from exc

    model_type = model.config.model_type
    if model_type not in SUPPORTED_ARCHITECTURES:  # e.g. custom code that declared a new type
        raise BirdboneError(
            f"{source.path}: model_type {model_type!r} is not supported (supported: {supported_list()})"
        )
    decoder_layers(model)  # fail now, not mid-pipeline, if the module layout is unexpected
    checks.check_config_values(model.config.to_dict(), f"{source.path} (config)")   # a GGUF's header too
    check_finite(model.state_dict(), source.path)
    model.eval()
    if placement is not None and placement.device.type != "cpu":   # loaded and checked on the host first
        model.to(placement.device)
    return LoadedModel(model, tokenizer, source, model_type, SUPPORTED_ARCHITECTURES[model_type])


# --- per-source loaders ---------------------------------------------------------------------------


def _load(source: ModelSource, dtype, allow_pickle: bool, trust_remote_code: bool):
    if source.kind == "gguf":
        return _load_gguf(source.path, dtype)
    if source.kind == "hf_dir":
        return _load_hf_dir(source.path, dtype, allow_pickle, trust_remote_code)
    return _load_hub(source.path, dtype, allow_pickle, trust_remote_code)


def _load_gguf(path: str, dtype: torch.dtype):
    """The GGUF's tensors dequantized one by one (model.gguf_state: transformers' own GGUF transforms), into
    the model its converted metadata describes; config and tokenizer from that conversion's cache."""
    from birdbone_core.model.stream import StreamedModel

    file = Path(path)
    checks.check_gguf(file, SUPPORTED_GGUF_ARCHS)
    _require_accelerate(path)
    sm = StreamedModel.open(file, Placement(torch.device("cpu"), str(dtype).removeprefix("torch.")))
    for i in range(sm.n_layers):
        sm.load_layer(i)
    tokenizer = _gguf_tokenizer(file, sm.config_dir)
    sm.model.config._name_or_path = str(file.parent)        # as transformers' own GGUF load names it
    return sm.model, tokenizer


def _load_hf_dir(path: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool):
    directory = Path(path)
    config = checks.read_config(directory / "config.json")
    check_config(config, str(directory / "config.json"), trust_remote_code)
    weights = checks.check_weights(directory, allow_pickle)
    checks.check_tokenizer_files(directory)
    model = _from_pretrained(
        str(directory), config, dtype, weights == "safetensors", trust_remote_code, local_files_only=True
    )
    tokenizer = _load_tokenizer(str(directory), path, local_files_only=True, **_trust(trust_remote_code))
    return model, tokenizer


def _load_hub(hub_id: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool):
    from transformers import AutoConfig

    # The config is tiny: check the architecture before downloading gigabytes of weights.
    config = AutoConfig.from_pretrained(hub_id, **_trust(trust_remote_code)).to_dict()
    check_config(config, f"{hub_id}/config.json", trust_remote_code)
    # Without allow_pickle, insist on safetensors: transformers then refuses pickle-only repos.
    model = _from_pretrained(hub_id, config, dtype, not allow_pickle, trust_remote_code, local_files_only=False)
    tokenizer = _load_tokenizer(hub_id, hub_id, **_trust(trust_remote_code))
    return model, tokenizer


def _from_pretrained(where, config: dict, dtype, use_safetensors, trust_remote_code, local_files_only):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, local_files_only=local_files_only, **_trust(trust_remote_code))
    if use_safetensors:
        kwargs["use_safetensors"] = True
    if config.get("model_type") == "gemma3":
        return _load_gemma3_text_only(where, kwargs)
    if config.get("birdbone_ffn_widths") or config.get("birdbone_kv_heads"):
        return _load_per_layer(where, config, kwargs)
    return _checked_load(AutoModelForCausalLM, where, where, **kwargs)


def _narrow(module: torch.nn.Linear, n_out: int | None = None, n_in: int | None = None) -> torch.nn.Linear:
    """A fresh nn.Linear like `module` with n_out rows / n_in columns (its weights are loaded after)."""
    return torch.nn.Linear(n_in or module.in_features, n_out or module.out_features, bias=module.bias is not None,
                           dtype=module.weight.dtype)


def _load_per_layer(where, config: dict, kwargs) -> PreTrainedModel:
    """A llama-family model whose layers have different FFN widths and/or KV head counts
    (birdbone_core.structure.width, per-layer cut; config.json's intermediate_size and head counts are the
    largest, birdbone_ffn_widths / birdbone_kv_heads each layer's): the model is built from its config, every
    layer narrowed to its sizes, then the safetensors loaded strictly (a missing or mis-shaped tensor is an
    error, as in _checked_load)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(where)
    model = AutoModelForCausalLM.from_config(cfg, dtype=kwargs["dtype"])
    layers = decoder_layers(model)
    for key in ("birdbone_ffn_widths", "birdbone_kv_heads"):
        if config.get(key) and len(config[key]) != len(layers):
            raise BirdboneError(f"{where}: {key} has {len(config[key])} entries for {len(layers)} layers")
    for i, layer in enumerate(layers):
        if config.get("birdbone_ffn_widths"):
            n, mlp = config["birdbone_ffn_widths"][i], layer.mlp
            mlp.gate_proj, mlp.up_proj = _narrow(mlp.gate_proj, n_out=n), _narrow(mlp.up_proj, n_out=n)
            mlp.down_proj = _narrow(mlp.down_proj, n_in=n)
            mlp.intermediate_size = n
        if config.get("birdbone_kv_heads"):
            att, head_dim = layer.self_attn, layer.self_attn.head_dim
            group = cfg.num_attention_heads // cfg.num_key_value_heads
            kv = config["birdbone_kv_heads"][i] * head_dim
            att.q_proj, att.o_proj = _narrow(att.q_proj, n_out=kv * group), _narrow(att.o_proj, n_in=kv * group)
            att.k_proj, att.v_proj = _narrow(att.k_proj, n_out=kv), _narrow(att.v_proj, n_out=kv)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(where).glob("*.safetensors")):
        state.update(load_file(str(f)))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:   # a shape mismatch
        raise BirdboneError(f"{where}: the weights do not match config.json's per-layer widths "
                            f"({str(e).splitlines()[1].strip()})") from None
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BirdboneError(f"{where}: weights {'missing' if missing else 'without a place'} for this config.json "
                            f"(e.g. {(missing or unexpected)[0]})")
    model.tie_weights()
    return model.eval()


def _load_gemma3_text_only(where, kwargs) -> PreTrainedModel:
    """Gemma 3 multimodal checkpoint -> its text model as a Gemma3ForCausalLM.

    The checkpoint's keys live under `model.language_model.*`, so the wrapper is loaded whole and its
    text half re-housed; the vision tower (a few hundred M params at most) is then dropped.
    """
    from transformers import Gemma3ForCausalLM, Gemma3ForConditionalGeneration

    full = _checked_load(Gemma3ForConditionalGeneration, where, where, **kwargs)
    text_config = full.config.get_text_config()
    text_config.tie_word_embeddings = full.config.tie_word_embeddings
    with torch.device("meta"):  # skeleton only: its modules are replaced below
        text = Gemma3ForCausalLM(text_config)
    text.model = full.model.language_model
    text.lm_head = full.lm_head
    if text_config.tie_word_embeddings:
        text.lm_head.weight = text.model.embed_tokens.weight
    text.generation_config = full.generation_config
    del full
    return text.to(dtype=kwargs["dtype"])


# --- helpers --------------------------------------------------------------------------------------


def _checked_load(cls, where: str, label: str, **kwargs) -> PreTrainedModel:
    """`cls.from_pretrained`, refusing checkpoints that leave parameters at random init.

    transformers only logs missing or mis-shaped weights and initialises them randomly; a model that
    silently is partly noise would poison every later measurement, so that is an error here.
    """
    # ignore_mismatched_sizes=True only defers the shape error to us: transformers' own message just
    # points at a log report, ours names the tensor and both shapes.
    model, info = cls.from_pretrained(where, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        name, found, expected = (list(mismatched[0]) + ["?", "?"])[:3]
        raise BirdboneError(
            f"{label}: {len(mismatched)} weight(s) have the wrong shape for config.json (e.g. {name}: "
            f"checkpoint {_shape(found)}, config expects {_shape(expected)}); the weights do not match the config"
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise BirdboneError(
            f"{label}: {len(missing)} weight(s) missing from the checkpoint for this config.json "
            f"(e.g. {missing[0]}); the weights do not match the config"
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected and not kwargs.get("gguf_file"):    # (GGUF tensors are mapped by transformers' own table)
        raise BirdboneError(
            f"{label}: {len(unexpected)} weight(s) in the checkpoint that this config.json has no place for "
            f"(e.g. {unexpected[0]}); the weights do not match the config"
        )
    return model


def _load_tokenizer(where: str, label: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:  # tokenizer files are parsed by several libraries, each with its own errors
        raise BirdboneError(f"{label}: failed to load tokenizer ({_one_line(exc)})") from exc


def _gguf_tokenizer(path: Path, metadata_dir: Path | None = None):
    """A GGUF's tokenizer from its converted metadata (model.gguf_state.converted_metadata; `metadata_dir` when
    already found), read as the tokenizer.json it is: a model-specific class (GemmaTokenizer) would rebuild its
    own normalizer and pre-tokenizer over it, which is wrong for a byte-level BPE vocabulary in a gemma3 GGUF."""
    from transformers import PreTrainedTokenizerFast

    from birdbone_core.model.gguf_state import converted_metadata

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(metadata_dir or converted_metadata(path)),
                                                       local_files_only=True)
    except Exception as exc:  # tokenizer files are parsed by several libraries, each with its own errors
        raise BirdboneError(f"{path}: failed to load tokenizer ({_one_line(exc)})") from exc


def open_streamed(spec: str, placement: Placement, keep_dtype: bool = False):
    """(StreamedModel, tokenizer) of a local safetensors directory or GGUF file that model.stream.streamable
    accepts, checked as a load checks it (model.source.preflight) but with only its embedding, final norm and
    head read: its decoder layers are read one at a time by whoever walks it."""
    from birdbone_core.model.stream import StreamedModel

    source = resolve_source(spec)
    preflight(source)
    with _quiet_transformers_progress():
        sm = StreamedModel.open(source.path, placement, keep_dtype=keep_dtype)
        p = Path(source.path)
        tokenizer = (_gguf_tokenizer(p, sm.config_dir) if source.kind == "gguf"
                     else _load_tokenizer(str(p), str(p), local_files_only=True))
    return sm, tokenizer


def load_tokenizer(directory: str | Path):
    """The tokenizer of a local model directory or GGUF file (one `error:` line when it cannot be read)."""
    p = Path(directory)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _gguf_tokenizer(p)
    return _load_tokenizer(str(p), str(p), local_files_only=True)


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse NaN/Inf and out-of-range values in a loaded model's tensors (checks.check_values)."""
    for name, t in tensors.items():
        checks.check_values(name, t, where)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)


@contextlib.contextmanager
def _quiet_transformers_progress():
    # BIRDBONE_PROGRESS=0 (tests, scripted runs) also silences transformers' own tqdm bars.
    from transformers.utils import logging as hf_logging

    quiet = os.environ.get("BIRDBONE_PROGRESS") == "0" and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _trust(trust_remote_code: bool) -> dict:
    # Only mention the flag when the user asked for it, so transformers' own default (never run
    # repository code) applies otherwise.
    return {"trust_remote_code": True} if trust_remote_code else {}


def _require_accelerate(path: str) -> None:
    # transformers refuses GGUF loading without `accelerate` (a plain runtime dependency for it).
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise BirdboneError(f"{path}: loading GGUF needs the `accelerate` package: pip install accelerate") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


__all__ = ["check_finite", "LoadedModel", "load_model", "load_tokenizer"]
