"""One-shot pruning of a model that is never whole in memory: the layer-by-layer pruning of
birdbone_core.prune.sequential on a StreamedModel (birdbone_core.model.stream), each decoder layer read from
the checkpoint just before its turn and written out, then freed, just after. The results are those of the
in-memory path, bit for bit: the same kernels see the same tensors in the same order."""
from __future__ import annotations

from pathlib import Path

import torch

from birdbone_core.atomic import staged_dir
from birdbone_core.errors import BirdboneError
from birdbone_core.model.stream import SafetensorsWriter, StreamedModel, write_config
from birdbone_core.prune.config import Prune
from birdbone_core.prune.sequential import PruneReport, prune_sequential


def prune_streamed(sm: StreamedModel, blocks: torch.Tensor, cfg: Prune, out_dir: Path, tokenizer,
                   description: str = "pruning") -> PruneReport:
    """Prune `sm` layer by layer per `cfg` on the calibration `blocks` [n_samples, seq_len] and write the
    result to `out_dir` (model.safetensors, each layer written as it is finished, then config and tokenizer;
    nothing is left there unless all of it was written)."""
    with staged_dir(Path(out_dir)) as tmp:
        writer = SafetensorsWriter(tmp / "model.safetensors", sm.write_order())

        def finish_layer(i: int) -> None:
            tensors = sm.layer_state(i)
            bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise BirdboneError(f"pruning produced NaN/Inf in {bad[0]} (and {len(bad) - 1} more); "
                                    f"nothing was saved")
            for name, t in tensors.items():
                writer.write(name, t)
            sm.release_layer(i)

        try:
            report = prune_sequential(sm.model, blocks, cfg, description,
                                      before_layer=sm.load_layer, after_layer=finish_layer)
            for name, t in sm.rest_state().items():
                writer.write(name, t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_config(tmp, sm.model, tokenizer)
    return report
