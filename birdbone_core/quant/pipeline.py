"""One call from (model, tokenizer, recipe) to a mixed-type GGUF: calibration statistics, GPTQ
candidates, bit budget, export. Used by `birdbone export` (recipe with `quantize:`) and
`birdbone quantize`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from birdbone_core.quant.config import Quantize


def quantize_and_export(model, tokenizer, cfg: Quantize, out_path: Path, *, calibration, source_gguf: Path | None = None,
                        extra_metadata: dict | None = None, report_path: Path | None = None,
                        source_bytes: int | None = None):
    """model: a causal LM held in memory, or a model.stream.StreamedModel (read one decoder layer at a time:
    calibration and trials through quant.stream, the candidates and the export one tensor at a time, the
    Hessians spilled to a scratch directory beside out_path; the same file either way).
    calibration: the recipe's `calibration` section (text, n_samples, seq_len, seed); cfg.n_samples
    overrides its n_samples. source_bytes: what a share (`target_size: 60%`) is of: the model file the user
    started from (default: source_gguf's size, else the model's F16 bytes). Returns (ExportResult, QuantResult)."""
    import tempfile

    from birdbone_core import atomic
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.model.stream import StreamedModel
    from birdbone_core.quant.calibration import collect_sensitivity
    from birdbone_core.quant.engine import budget_bytes, check_budget, choose, measure_candidates
    from birdbone_core.quant.importance import read_imatrix
    from birdbone_core.quant.stream import SpilledArrays, SpilledTensors, stream_measured_kl, stream_sensitivity
    from birdbone_core.quant.trials import choose_measured
    from birdbone_core.runtime import describe

    sm = model if isinstance(model, StreamedModel) else None
    net, state = (sm.model, sm.checkpoint_state()) if sm else (model, None)
    cfg = resolve_size(net, tokenizer, cfg, out_path, source_gguf, extra_metadata, source_bytes, state)
    check_budget(net, cfg, state)  # before the calibration pass
    imatrix = read_imatrix(cfg.imatrix) if cfg.imatrix else None
    text, text_desc = read_text(calibration.text, "calib")
    n = cfg.n_samples or calibration.n_samples
    blocks = calibration_blocks(tokenizer, text, n, calibration.seq_len, calibration.seed)
    held = (calibration_blocks(tokenizer, text, cfg.measure_blocks, calibration.seq_len, calibration.seed + 1)
            if cfg.measure_blocks else None)
    runtime = describe(net)
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".birdbone-quant-") as scratch:
        if sm is None:
            sens = collect_sensitivity(net, blocks)
            cands = measure_candidates(net, cfg, sens, imatrix, source_gguf)
        else:
            sens = stream_sensitivity(sm, blocks, SpilledTensors(Path(scratch)))
            device = sm.device
            sm.release()                  # the embedding and head too: the candidates read each tensor alone
            cands = measure_candidates(net, cfg, sens, imatrix, source_gguf, state=state, device=device,
                                       spill=SpilledArrays(Path(scratch)))
        del sens
        budget = budget_bytes(cfg, cands.n_weights)
        if held is None:
            q = choose(cands, budget)
        elif sm is None:
            q, _ = choose_measured(net, cands, budget, held, release=True)
        else:
            sm.materialize_rest()
            q, _ = choose_measured(None, cands, budget, held, release=True,
                                   measure=lambda allocations: stream_measured_kl(sm, allocations, held))
            sm.release()
        # written while the scratch directory (the chosen encodings, memory-mapped) is still there
        trials = q.trials
        meta: dict[str, Any] = dict(extra_metadata or {})
        meta.update({
            "birdbone.quant.types": json.dumps(q.types, separators=(",", ":")),
            "birdbone.quant.budget_bytes": int(q.budget_bytes),
            "birdbone.quant.tensor_bytes": int(q.n_bytes),
            "birdbone.quant.target": target_text(cfg),
            "birdbone.quant.method": ("gptq" + (" act-order" if cfg.gptq.act_order else "") if cfg.gptq.enabled
                                      else "rounding") + (" imatrix-file" if imatrix else ""),
            "birdbone.quant.calibration": f"{text_desc}, {n} x {calibration.seq_len}",
            "birdbone.quant.kept_source_blocks": len(q.kept_source),
        })
        if trials:
            meta["birdbone.quant.trials"] = json.dumps([{"types": t.big_types, "measured_kl": round(t.measured_kl, 6),
                                                         "chosen": t.chosen} for t in trials], separators=(",", ":"))
        result = export_gguf(net, tokenizer, out_path, out_type="f16", source_gguf=source_gguf,
                             extra_metadata=meta, quantized=q.quantized, state=state)
        if report_path is not None:
            atomic.write_json(report_path, {
                "gguf": str(result.path), "file_bytes": result.n_bytes, "tensor_bytes": q.n_bytes,
                "budget_bytes": q.budget_bytes, "bits_per_weight": q.bits_per_weight, "seconds": round(q.seconds, 1),
                "types": q.types, "kept_source_blocks": q.kept_source, "sensitivity": q.errors, "gptq_beat_rounding": q.gptq_won,
                "trials": [dict(vars(t)) for t in trials], "settings": cfg.model_dump(mode="json"),
                "runtime": runtime | ({"streamed": True} if sm else {})})
    return result, q


def target_text(cfg: Quantize) -> str:
    if cfg.target_size is not None:
        return f"file size {cfg.target_size} ({cfg.target_bytes} B of tensor data)"
    return f"{cfg.target_bpw} bpw" if cfg.target_bpw is not None else f"{cfg.target_bytes} B"


def resolve_size(model, tokenizer, cfg: Quantize, out_path: Path, source_gguf: Path | None,
                 extra_metadata: dict | None, source_bytes: int | None = None, state=None) -> Quantize:
    """A file-size target (`target_size`) as the bytes its tensors may take: the size (a share: of
    `source_bytes`, else of the source GGUF, else of the model in F16) less the file's header, metadata and
    tensor table, measured by writing them (export_gguf(header_only=True)) with this run's metadata and
    quantizer records at least as long as the real ones, and less each tensor's alignment padding."""
    from birdbone_core.errors import BirdboneError
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.quant.config import parse_size

    if cfg.target_size is None:
        return cfg
    value, share = parse_size(cfg.target_size)
    names = [n for n, _ in model.named_parameters()]
    if share:
        whole = source_bytes or (Path(source_gguf).stat().st_size if source_gguf else
                                 2 * sum(p.numel() for p in model.parameters()))
        value *= whole
    records = {"birdbone.quant.types": json.dumps({f"blk.{i}.{n}": "IQ4_NL" for i, n in enumerate(names)},
                                                  separators=(",", ":")),
               "birdbone.quant.trials": "x" * 2048, "birdbone.quant.budget_bytes": 0,
               "birdbone.quant.tensor_bytes": 0, "birdbone.quant.target": "x" * 96,
               "birdbone.quant.method": "x" * 64, "birdbone.quant.calibration": "x" * 256,
               "birdbone.quant.kept_source_blocks": 0}
    header = export_gguf(model, tokenizer, out_path, out_type="f16", source_gguf=source_gguf,
                         extra_metadata={**(extra_metadata or {}), **records}, header_only=True,
                         state=state).n_bytes
    padding = 32 * (len(names) + 8)              # GGUF aligns every tensor's data to 32 bytes
    tensor_bytes = int(value) - header - padding
    if tensor_bytes <= 0:
        raise BirdboneError(f"quantize: target_size {cfg.target_size} ({int(value):,} B) is below the file's "
                            f"header and metadata alone ({header:,} B)")
    return cfg.model_copy(update={"target_bytes": tensor_bytes})
