"""The ledger's records: what entry.json / base.json hold, and what `log` and `diff` return."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TensorRecord:
    """One tensor after a wave (for the base: every tensor; for a wave: the tensors it changed)."""
    hash: str                     # tensor_hash after the wave
    shape: tuple[int, ...]
    dtype: str                    # "float32", "bfloat16", ...
    numel: int
    zeros: int                    # elements == 0 after the wave (-0.0 counts)
    changed: int = 0              # elements whose bits the wave changed
    delta_bytes: int = 0          # encoded size of this tensor's delta in delta.safetensors
    hash_before: str | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["sparsity"] = self.sparsity
        return d

    @classmethod
    def from_json(cls, d: dict) -> TensorRecord:
        return cls(hash=d["hash"], shape=tuple(d["shape"]), dtype=d["dtype"], numel=int(d["numel"]),
                   zeros=int(d["zeros"]), changed=int(d.get("changed", 0)),
                   delta_bytes=int(d.get("delta_bytes", 0)), hash_before=d.get("hash_before"))


@dataclass(frozen=True)
class WaveEntry:
    """One recorded wave. Wave 0 is the base (kind "base"); a rollback is a wave of kind "revert"."""
    wave: int
    kind: str                                   # "base" | "wave" | "revert" | "gradual" (partial rollback)
    time: str                                   # UTC, ISO 8601
    metrics: dict
    tensors: dict[str, TensorRecord]            # name -> record (changed tensors; all for the base)
    sparsity: float                             # whole-state zeros / elements after the wave
    digest: str                                 # identity of the weight change (see `change_digest`)
    decision: str | None = None
    reverts_to: int | None = None
    meta: dict = field(default_factory=dict)    # base only: what init_base was given

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.tensors.values())

    @property
    def delta_bytes(self) -> int:
        return sum(r.delta_bytes for r in self.tensors.values())

    def to_json(self) -> dict:
        d = {"wave": self.wave, "kind": self.kind, "time": self.time, "decision": self.decision,
             "reverts_to": self.reverts_to, "metrics": self.metrics, "sparsity": self.sparsity,
             "changed": self.changed, "delta_bytes": self.delta_bytes, "digest": self.digest,
             "tensors": {n: r.to_json() for n, r in self.tensors.items()}}
        if self.meta:
            d["meta"] = self.meta
        return d

    @classmethod
    def from_json(cls, d: dict) -> WaveEntry:
        return cls(wave=int(d["wave"]), kind=d["kind"], time=d["time"], metrics=d.get("metrics") or {},
                   tensors={n: TensorRecord.from_json(r) for n, r in d["tensors"].items()},
                   sparsity=float(d["sparsity"]), digest=d["digest"], decision=d.get("decision"),
                   reverts_to=d.get("reverts_to"), meta=d.get("meta") or {})


def change_digest(kind: str, decision: str | None, reverts_to: int | None,
                  tensors: dict[str, TensorRecord]) -> str:
    """Identity of a wave's change: the same tensors going from the same hashes to the same hashes
    (which fixes the delta bit for bit), the same kind and decision. Metrics and time are not part of it."""
    body = {"kind": kind, "decision": decision, "reverts_to": reverts_to,
            "tensors": sorted((n, r.hash_before, r.hash) for n, r in tensors.items())}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs between the states after waves a and b."""
    name: str
    changed: int                  # elements whose bits differ
    numel: int
    l2: float                     # ||W_b - W_a||_2 over the tensor, in float64
    sparsity_a: float
    sparsity_b: float


@dataclass(frozen=True)
class WaveDiff:
    """`Ledger.diff(a, b)`: the changed tensors (state order) plus both waves' entries (and metrics)."""
    a: WaveEntry
    b: WaveEntry
    tensors: list[TensorDiff]

    @property
    def changed(self) -> int:
        return sum(t.changed for t in self.tensors)
