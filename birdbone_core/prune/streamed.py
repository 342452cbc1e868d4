"""One-shot pruning of a model that is never whole in memory: the layer-by-layer pruning of
birdbone_core.prune.sequential on a StreamedModel (birdbone_core.model.stream), each decoder layer read from
the checkpoint just before its turn and written out, then freed, just after. The results are those of the
in-memory path, bit for bit: the same kernels see the same tensors in the same order."""
from __future__ import annotations

from pathlib import Path

import torch

from birdbone_core.atomic import staged_dir
from birdbone_core.errors import BirdboneError
from birdbone_core.model.stream import ShardedWriter, StreamedModel
from birdbone_core.prune.config import Prune
from birdbone_core.prune.sequential import PruneReport, prune_sequential


def prune_streamed(sm: StreamedModel, blocks: torch.Tensor, cfg: Prune, out_dir: Path, tokenizer,
                   description: str = "pruning") -> PruneReport:
    """Prune `sm` layer by layer per `cfg` on the calibration `blocks` [n_samples, seq_len] and write the
    result to `out_dir` (one safetensors shard per layer, then the rest, the index, config and tokenizer;
    nothing is left there unless all of it was written)."""
    with staged_dir(Path(out_dir)) as tmp:
        writer = ShardedWriter(tmp)

        def finish_layer(i: int) -> None:
            tensors = sm.layer_state(i)
            bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise BirdboneError(f"pruning produced NaN/Inf in {bad[0]} (and {len(bad) - 1} more); "
                                    f"nothing was saved")
            writer.write(f"layer-{i:05d}", tensors)
            sm.release_layer(i)

        report = prune_sequential(sm.model, blocks, cfg, description,
                                  before_layer=sm.load_layer, after_layer=finish_layer)
        writer.write("rest", sm.rest_state())
        writer.finish(sm.model.config, tokenizer, getattr(sm.model, "generation_config", None))
    return report
