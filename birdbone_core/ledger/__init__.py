"""The ledger of a run: sparse, exact, append-only weight history (base + one delta per wave)."""
from birdbone_core.ledger.delta import (
    DeltaMismatch,
    TensorDelta,
    apply_backward,
    apply_forward,
    compose,
    compute_delta,
    tensor_hash,
)
from birdbone_core.ledger.entries import TensorDiff, TensorRecord, WaveDiff, WaveEntry
from birdbone_core.ledger.report import format_diff, format_log
from birdbone_core.ledger.store import Ledger, state_of

__all__ = ["DeltaMismatch", "Ledger", "TensorDelta", "TensorDiff", "TensorRecord", "WaveDiff", "WaveEntry",
           "apply_backward", "apply_forward", "compose", "compute_delta", "format_diff", "format_log",
           "state_of", "tensor_hash"]
