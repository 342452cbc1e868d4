"""Rebuilding any recorded state of a ledger, and the difference between two, from its base and deltas.

Mixed into ledger.store.Ledger, whose readers it uses (entry, load_delta, delta_path, the index); every
tensor rebuilt is checked against the hash recorded when its wave was written.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from torch import Tensor

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import codec
from birdbone_core.ledger.delta import (
    DeltaMismatch,
    TensorDelta,
    apply_forward,
    change_norm,
    compose,
    compute_delta,
    tensor_hash,
)
from birdbone_core.ledger.entries import TensorDiff, WaveDiff
from birdbone_core.model.tensors import read_header, read_metadata, read_tensor

StateDict = Mapping[str, Tensor]


class Replay:
    """State at a wave (whole or one tensor at a time), and diffs between waves."""

    def state_at(self, wave: int, base_state: StateDict | None = None, verify: bool = True) -> dict[str, Tensor]:
        """The exact state after `wave` (0 = base): base + forward deltas, every tensor checked against
        its recorded hash. Without base_state, the stored snapshot is used. Tensors no wave changed are
        the base_state's own (CPU) tensors, not copies."""
        self._check_recorded(wave)
        if base_state is None:
            base_state = self.base_state()
            if base_state is None:
                raise BirdboneError(f"{self.dir}: no base snapshot; pass the base model's state")
        base = self.entry(0)
        self._check_names(base_state, base.tensors, 0, "base state")
        state = {n: base_state[n].detach().cpu() for n in base.tensors}
        if verify:
            for n, rec in base.tensors.items():
                if tensor_hash(state[n]) != rec.hash:
                    raise BirdboneError(f"ledger wave 0 (base): tensor '{n}' differs from the recorded base "
                                        f"(the model source changed?)")
        owned: set[str] = set()                      # tensors already copied, safe to change in place
        for w in range(1, wave + 1):
            entry, deltas = self.entry(w), self.load_delta(w)
            if set(deltas) != set(entry.tensors):
                raise BirdboneError(f"ledger wave {w}: delta file and entry.json list different tensors")
            for n, d in deltas.items():
                try:
                    state[n] = apply_forward(state[n], d, inplace=n in owned)
                except DeltaMismatch as e:
                    raise BirdboneError(f"ledger wave {w}: tensor '{n}': {e}") from None
                owned.add(n)
                if verify and tensor_hash(state[n]) != entry.tensors[n].hash:
                    raise BirdboneError(f"ledger wave {w}: tensor '{n}' does not match its recorded hash "
                                        f"after applying the delta (damaged delta file)")
        return state

    def tensors_at(self, wave: int, base_state: StateDict) -> Iterator[tuple[str, Tensor]]:
        """state_at one tensor at a time (base order), for models bigger than memory: each tensor is the base's,
        forward through every wave's delta for it (read from the delta files alone: one tensor's entries),
        and checked against its recorded hash before it is yielded. Every delta file's sha256 is checked
        first, as state_at's reads do."""
        self._check_recorded(wave)
        base = self.entry(0)
        self._check_names(base_state, base.tensors, 0, "base state")
        waves = []
        for w in range(1, wave + 1):
            self.delta_sha256_ok(w)
            path = self.delta_path(w)
            entries, metas = read_header(path), json.loads(read_metadata(path)["tensors"])
            if set(metas) != set(self.entry(w).tensors):
                raise BirdboneError(f"ledger wave {w}: delta file and entry.json list different tensors")
            waves.append((w, self.entry(w), entries, metas))
        for n, rec in base.tensors.items():
            t = base_state[n].detach().cpu()
            if tensor_hash(t) != rec.hash:
                raise BirdboneError(f"ledger wave 0 (base): tensor '{n}' differs from the recorded base "
                                    f"(the model source changed?)")
            owned = False
            for w, entry, entries, metas in waves:
                if n not in metas:
                    continue
                parts = {k: read_tensor(e) for k, e in entries.items() if k.startswith(f"{n}.")
                         and k[len(n) + 1:] in ("idx", "old", "new", "old.where", "new.where")}
                try:
                    t = apply_forward(t, codec.decode(n, parts, metas[n]), inplace=owned)
                except (DeltaMismatch, ValueError, KeyError) as e:
                    raise BirdboneError(f"ledger wave {w}: tensor '{n}': {e}") from None
                owned = True
                if tensor_hash(t) != entry.tensors[n].hash:
                    raise BirdboneError(f"ledger wave {w}: tensor '{n}' does not match its recorded hash "
                                        f"after applying the delta (damaged delta file)")
            yield n, t

    def delta_sha256_ok(self, wave: int) -> None:
        """delta_bytes' check, reading the file in blocks (a wave's delta can be as big as the model)."""
        index = self._index()
        self._check_recorded(wave, index)
        path = self.delta_path(wave)
        if not path.is_file():
            raise BirdboneError(f"{path}: missing from the ledger (wave {wave})")
        expected = index["waves"][wave - 1].get("delta_sha256")
        if expected is not None and atomic.sha256_file(path) != expected:
            raise BirdboneError(f"{path}: its bytes differ from the sha256 ledger/index.json recorded for wave "
                                f"{wave} (damaged or swapped delta file)")

    def _net(self, a: int, b: int) -> dict[str, TensorDelta]:
        """Net change from the state after wave a to the state after wave b, from the deltas alone."""
        lo, hi = min(a, b), max(a, b)
        chains: dict[str, list[TensorDelta]] = {}
        for w in range(lo + 1, hi + 1):
            for n, d in self.load_delta(w).items():
                chains.setdefault(n, []).append(d)
        out = {}
        for n in self.entry(0).tensors:              # base order
            if n not in chains:
                continue
            try:
                d = compose(chains[n])
            except DeltaMismatch as e:
                raise BirdboneError(f"ledger waves {lo + 1}..{hi}: tensor '{n}': {e}") from None
            if d is not None:
                out[n] = d if a <= b else d.inverse()
        return out

    def diff(self, a: int, b: int, base_state: StateDict | None = None) -> WaveDiff:
        """Per changed tensor: elements changed, L2 norm of the change, sparsity in a and b; plus both
        waves' entries. Without base_state it is computed from the deltas alone; with it, from both
        rebuilt (hash-verified) states."""
        self._check_recorded(a)
        self._check_recorded(b)
        if base_state is None:
            deltas = self._net(a, b)
        else:
            sa, sb = self.state_at(a, base_state), self.state_at(b, base_state)
            deltas = {n: d for n in sa if (d := compute_delta(sa[n], sb[n])) is not None}
        ta, tb = self._table(a), self._table(b)
        rows = [TensorDiff(name=n, changed=d.n_changed, numel=ta[n].numel, l2=change_norm(d),
                           sparsity_a=ta[n].sparsity, sparsity_b=tb[n].sparsity) for n, d in deltas.items()]
        return WaveDiff(a=self.entry(a), b=self.entry(b), tensors=rows)
