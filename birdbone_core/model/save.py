"""Write a model + tokenizer as a plain Hugging Face directory (float safetensors), atomically."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is heavy to import; only needed for annotations here
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from birdbone_core.atomic import staged_dir
from birdbone_core.errors import BirdboneError

# Larger than any model we handle, so the weights land in one `model.safetensors` (no index file).
_SINGLE_SHARD = "1000GB"


def strip_gguf_traces(model: PreTrainedModel) -> None:
    """Forget that `model` was read from a GGUF file; its weights are already plain dequantized floats.

    transformers leaves `config.quantization_config` (quant_method "gguf") and `model.hf_quantizer`
    behind. Saved, the config would make the directory look quantized; in memory, tools such as
    llm-compressor refuse an "already quantized" model. `_model_name_or_path` is GGUF `general.name`.
    """
    config = model.config
    qcfg = getattr(config, "quantization_config", None)
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    if qcfg is not None and str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        model.is_quantized = False
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, mark: bool = False) -> Path:
    """Save to `out_dir` (config.json, model.safetensors, tokenizer files) and return it.

    Everything is written into a temporary sibling directory first; only when it is complete does it
    take `out_dir`'s place, so a crash never leaves a half-written model where a good one was. `mark`: a
    user-named output (atomic.OUTPUT_MARK), which a later save may replace; check_output_dir refuses others.
    Tied embeddings stay tied: transformers stores the shared tensor once and re-ties on load.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BirdboneError(f"{out_dir}: exists and is not a directory; cannot save a model there")
    strip_gguf_traces(model)
    try:
        with staged_dir(out_dir, mark=mark) as tmp:
            model.save_pretrained(tmp, max_shard_size=_SINGLE_SHARD)
            tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise BirdboneError(f"{out_dir}: failed to save model ({exc})") from exc
    return out_dir
