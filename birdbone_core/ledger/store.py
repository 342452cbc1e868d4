"""The ledger of a run: every wave's weight change, stored sparsely, so any state can be rebuilt exactly.

    RUN/ledger/index.json               the commit point: base digest + one row per recorded wave
    RUN/ledger/base.json                per-tensor hash/shape/dtype/zeros of the base state (wave 0)
    RUN/ledger/base.safetensors         optional copy of the base (init_base(..., base_snapshot=True))
    RUN/ledger/wave-0001/delta.safetensors   {name}.idx/.old/.new per changed tensor (see codec.py)
    RUN/ledger/wave-0001/entry.json     wave, time, metrics, decision, per-tensor hash/changes/sparsity/bytes

A wave directory is written whole (staged_dir), then index.json is rewritten; a wave missing from the
index does not exist, so a crash at any point leaves a consistent ledger and the write can be retried.
History is append-only: a rollback is a new wave whose delta leads back to an earlier state.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import codec
from birdbone_core.ledger.delta import (
    DeltaMismatch,
    TensorDelta,
    compute_delta,
    dtype_name,
    tensor_hash,
)
from birdbone_core.ledger.entries import TensorRecord, WaveEntry, change_digest
from birdbone_core.ledger.replay import Replay, StateDict
from birdbone_core.runtime import release_freed_memory

FORMAT = "birdbone-ledger/1"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry_text(entry: WaveEntry) -> str:
    return json.dumps(entry.to_json(), indent=2) + "\n"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _record(t: Tensor, hash_: str | None = None, **kw) -> TensorRecord:
    t = t.detach().cpu()
    return TensorRecord(hash=hash_ or tensor_hash(t), shape=tuple(t.shape), dtype=dtype_name(t.dtype),
                        numel=t.numel(), zeros=count_zeros(t), **kw)


def count_zeros(t: Tensor, chunk: int = 1 << 22) -> int:
    """Elements equal to zero, counted over chunks of the flat tensor: `t == 0` on a whole half-precision
    tensor makes float32 temporaries several times its size (a big embedding would cost gigabytes)."""
    flat = t.reshape(-1)
    return sum(int((flat[i:i + chunk] == 0).sum()) for i in range(0, flat.numel(), chunk))


def _json_safe(obj, what: str):
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise BirdboneError(f"{what} must be JSON-serialisable ({e})") from None


class Ledger(Replay):
    """The ledger of the run directory `root` (stored under root/ledger/); rebuilding states and diffs from
    it: ledger.replay."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "ledger"

    # ---- layout -------------------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    @property
    def base_path(self) -> Path:
        return self.dir / "base.json"

    @property
    def snapshot_path(self) -> Path:
        return self.dir / "base.safetensors"

    def wave_dir(self, wave: int) -> Path:
        return self.dir / f"wave-{wave:04d}"

    def _read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise BirdboneError(f"{path}: missing from the ledger") from None
        except json.JSONDecodeError as e:
            raise BirdboneError(f"{path}: corrupt ledger file ({e.msg})") from None

    def exists(self) -> bool:
        return self.index_path.is_file()

    def _index(self) -> dict:
        if not self.exists():
            raise BirdboneError(f"{self.root}: no ledger (ledger/index.json); record the base first")
        idx = self._read_json(self.index_path)
        if not isinstance(idx, dict) or idx.get("format") != FORMAT or not isinstance(idx.get("waves"), list):
            raise BirdboneError(f"{self.index_path}: not a {FORMAT} index")
        return idx

    def _commit_index(self, index: dict) -> None:
        """The single write that makes a base or wave part of the ledger."""
        atomic.write_json(self.index_path, index)

    @property
    def last_wave(self) -> int:
        return len(self._index()["waves"])

    # ---- reading ------------------------------------------------------------------------------------
    def entry(self, wave: int) -> WaveEntry:
        """A recorded wave's entry; its file is checked against the sha256 index.json recorded for it (any
        edit, metrics included), its digest against index.json's."""
        index = self._index()
        if wave == 0:
            path, expect, sha = self.base_path, index["base"], index.get("base_sha256")
        else:
            self._check_recorded(wave, index)
            rec = index["waves"][wave - 1]
            path, expect, sha = self.wave_dir(wave) / "entry.json", rec["digest"], rec.get("entry_sha256")
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise BirdboneError(f"{path}: missing from the ledger") from None
        if sha is not None and hashlib.sha256(raw).hexdigest() != sha:
            raise BirdboneError(f"{path}: its bytes differ from the sha256 ledger/index.json recorded for wave "
                                f"{wave} (damaged ledger)")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BirdboneError(f"{path}: corrupt ledger file ({getattr(exc, 'msg', exc)})") from None
        try:
            e = WaveEntry.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BirdboneError(f"{path}: not a ledger entry ({type(exc).__name__}: {exc}) (damaged ledger)") from None
        if e.wave != wave or e.digest != expect:
            raise BirdboneError(f"ledger wave {wave}: entry does not match ledger/index.json (damaged ledger)")
        return e

    def log(self) -> list[WaveEntry]:
        """Every recorded wave, base (wave 0) first."""
        return [self.entry(w) for w in range(self.last_wave + 1)]

    def _check_recorded(self, wave: int, index: dict | None = None) -> None:
        last = len((index or self._index())["waves"])
        if not 0 <= wave <= last:
            raise BirdboneError(f"ledger: wave {wave} is not recorded (waves 0..{last} are)")

    def delta_path(self, wave: int) -> Path:
        return self.wave_dir(wave) / "delta.safetensors"

    def delta_bytes(self, wave: int) -> bytes:
        """A recorded wave's delta file, checked against the sha256 index.json recorded with it (a damaged
        or swapped delta file is refused; ledgers written before the hash was kept are not checked)."""
        index = self._index()
        self._check_recorded(wave, index)
        path = self.delta_path(wave)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BirdboneError(f"{path}: missing from the ledger (wave {wave})") from None
        expected = index["waves"][wave - 1].get("delta_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise BirdboneError(f"{path}: its bytes differ from the sha256 ledger/index.json recorded for wave "
                                f"{wave} (damaged or swapped delta file)")
        return data

    def load_delta(self, wave: int) -> dict[str, TensorDelta]:
        """The deltas of a recorded wave (wave >= 1), by tensor name, hash-checked."""
        self._check_recorded(wave)
        if wave == 0:
            return {}
        return codec.unpack(self.delta_bytes(wave), f"{self.delta_path(wave)} (wave {wave})")

    def verify(self) -> int:
        """Check every entry against index.json and every delta file against its recorded hash; returns
        the number of waves checked. Raises BirdboneError at the first damaged file."""
        for w in range(self.last_wave + 1):
            self.entry(w)
            if w:
                self.delta_bytes(w)
        return self.last_wave

    def _uncommitted(self, wave: int, digest: str) -> tuple[str, str] | None:
        """(entry text, delta file sha256) of a wave directory written completely for this very change (same
        digest: the same tensors before and after) by a process killed before index.json named it; it is
        then committed as it is, time included, so a retried step leaves the bytes it would have. Else None."""
        d = self.wave_dir(wave)
        try:
            text = (d / "entry.json").read_text()
            if json.loads(text).get("digest") != digest:
                return None
            return text, atomic.sha256_file(d / "delta.safetensors")
        except (OSError, ValueError, AttributeError):
            return None

    def _table(self, wave: int) -> dict[str, TensorRecord]:
        """Every tensor's record in the state after `wave` (base order)."""
        table = dict(self.entry(0).tensors)
        for w in range(1, wave + 1):
            table.update(self.entry(w).tensors)
        return table

    def base_state(self) -> dict[str, Tensor] | None:
        """The stored copy of the base, when init_base was asked for one."""
        return load_file(str(self.snapshot_path)) if self.snapshot_path.is_file() else None

    # ---- writing ------------------------------------------------------------------------------------
    def init_base(self, state_dict: StateDict, meta: dict | None = None, metrics: dict | None = None,
                  base_snapshot: bool = False) -> WaveEntry:
        """Record the base state (wave 0) by per-tensor hashes; with base_snapshot, also a copy of it.
        Again with the same base: no-op; with a different one: error."""
        tensors = {n: _record(t) for n, t in state_dict.items()}
        digest = change_digest("base", None, None, tensors)
        if self.exists():
            if self._index()["base"] != digest:
                raise BirdboneError(f"{self.dir}: ledger already records a different base state")
            if base_snapshot and not self.snapshot_path.is_file():
                self._write_snapshot(state_dict)
            return self.entry(0)
        if base_snapshot:
            self._write_snapshot(state_dict)
        total = sum(r.numel for r in tensors.values())
        entry = WaveEntry(wave=0, kind="base", time=_now(), metrics=_json_safe(metrics or {}, "metrics"),
                          tensors=tensors, sparsity=sum(r.zeros for r in tensors.values()) / max(total, 1),
                          digest=digest, meta=_json_safe(meta or {}, "meta"))
        text = _entry_text(entry)
        atomic.write_text(self.base_path, text)
        self._commit_index({"format": FORMAT, "base": digest, "base_sha256": _sha256(text), "waves": []})
        return entry

    def _write_snapshot(self, state_dict: StateDict) -> None:
        seen: set[int] = set()
        out = {}
        for n, t in state_dict.items():             # safetensors refuses shared storage (tied weights)
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            out[n] = t.clone() if ptr in seen else t
            seen.add(ptr)
        with atomic.staged_file(self.snapshot_path) as tmp:
            save_file(out, str(tmp), metadata={"format": "birdbone-ledger-base/1"})

    def record_wave(self, wave: int, old_state: StateDict, new_state: StateDict, metrics: dict,
                    decision: str | None = None, kind: str = "wave") -> WaveEntry:
        """Record the change old_state -> new_state as `wave` (the next one). `old_state` must be the
        ledger's state after wave-1 (checked by hashes). Recording a wave again: same change -> no-op
        (the first entry, with its metrics, is kept); different change -> error. `kind` names what made
        the change ("wave": a pruning wave; "gradual": a partial rollback, see loop/gradual.py)."""
        if kind in ("base", "revert"):   # those kinds promise a state (the base / reverts_to's) by name
            raise ValueError(f"record_wave cannot record kind {kind!r}; use init_base / revert_marker")
        index = self._index()
        last = len(index["waves"])
        if not 1 <= wave <= last + 1:
            raise BirdboneError(f"ledger: cannot record wave {wave}; the next wave is {last + 1}")
        before = self._table(wave - 1)
        self._check_names(old_state, before, wave - 1, "old state")
        self._check_names(new_state, before, wave - 1, "new state")
        after: dict[str, TensorRecord] = {}
        with self._delta_writer() as writer:       # each delta encoded and set aside as it is computed
            for name, rec in before.items():
                # a state read from disk holds one tensor at a time: the old one is checked and dropped, and
                # read again only when the new one differs (an unchanged embedding is never held twice)
                if tensor_hash(old_state[name].detach().cpu()) != rec.hash:
                    raise BirdboneError(f"ledger wave {wave}: old state's tensor '{name}' differs from the "
                                        f"recorded state after wave {wave - 1}")
                new = new_state[name].detach().cpu()
                new_hash = tensor_hash(new)
                if new_hash != rec.hash:
                    try:
                        d = compute_delta(old_state[name].detach().cpu(), new)
                    except DeltaMismatch as e:
                        raise BirdboneError(f"ledger wave {wave}: tensor '{name}': {e}") from None
                    writer.add(name, d)
                    after[name] = _record(new, changed=d.n_changed, hash_before=rec.hash, hash_=new_hash)
                    del d
                del new
                release_freed_memory(collect=False)
            return self._record(wave, kind, writer, after, before, metrics, decision, None, index)

    def revert_marker(self, to_wave: int, metrics: dict | None = None,
                      decision: str | None = None) -> WaveEntry:
        """Record a rollback to `to_wave` as a new wave whose delta takes the latest state back to it.
        Built from the recorded deltas alone (no base needed); nothing is deleted. If the latest wave
        already is a revert to `to_wave` (a retried command), it is returned and nothing is recorded."""
        index = self._index()
        last = len(index["waves"])
        if not 0 <= to_wave < last:
            raise BirdboneError(f"ledger: cannot revert to wave {to_wave}; choose one of 0..{last - 1}")
        latest = self.entry(last)
        if latest.kind == "revert" and latest.reverts_to == to_wave:
            return latest
        deltas = self._net(last, to_wave)
        now, target = self._table(last), self._table(to_wave)
        after = {n: TensorRecord(hash=target[n].hash, shape=target[n].shape, dtype=target[n].dtype,
                                 numel=target[n].numel, zeros=target[n].zeros, changed=d.n_changed,
                                 hash_before=now[n].hash) for n, d in deltas.items()}
        with self._delta_writer() as writer:
            for name, d in deltas.items():
                writer.add(name, d)
            return self._record(last + 1, "revert", writer, after, now, metrics or {},
                                decision or f"revert to wave {to_wave}", to_wave, index)

    @contextlib.contextmanager
    def _delta_writer(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        writer = codec.DeltaWriter(self.dir / f".delta-{os.getpid()}.parts")
        try:
            yield writer
        finally:
            writer.close()

    def _check_names(self, state: StateDict, table: dict, wave: int, what: str) -> None:
        missing = [n for n in table if n not in state]
        extra = [n for n in state if n not in table]
        if missing or extra:
            which = f"lacks tensor '{missing[0]}'" if missing else f"has unrecorded tensor '{extra[0]}'"
            raise BirdboneError(f"ledger wave {wave}: {what} {which} "
                                f"({len(missing)} missing, {len(extra)} extra)")

    def _record(self, wave: int, kind: str, writer: codec.DeltaWriter, after: dict[str, TensorRecord],
                before: dict[str, TensorRecord], metrics: dict, decision: str | None, reverts_to: int | None,
                index: dict) -> WaveEntry:
        tensors = {n: replace(r, delta_bytes=writer.sizes[n]) for n, r in after.items()}
        digest = change_digest(kind, decision, reverts_to, tensors)
        if wave <= len(index["waves"]):
            old = self.entry(wave)
            if old.digest != digest:
                raise BirdboneError(f"ledger: wave {wave} is already recorded with a different change; "
                                    f"record wave {len(index['waves']) + 1} or revert instead")
            return old
        state = {**before, **tensors}
        total = sum(r.numel for r in state.values())
        entry = WaveEntry(wave=wave, kind=kind, time=_now(), metrics=_json_safe(metrics, "metrics"),
                          tensors=tensors, sparsity=sum(r.zeros for r in state.values()) / max(total, 1),
                          digest=digest, decision=decision, reverts_to=reverts_to)
        found = self._uncommitted(wave, digest)
        if found is None:
            text = _entry_text(entry)
            with atomic.staged_dir(self.wave_dir(wave)) as tmp:
                delta_sha = writer.finish(tmp / "delta.safetensors")
                atomic.write_text(tmp / "entry.json", text)
        else:
            text, delta_sha = found
            entry = WaveEntry.from_json(json.loads(text))
        self._commit_index({**index, "waves": [*index["waves"], {"wave": wave, "kind": kind, "digest": digest,
                                                                 "entry_sha256": _sha256(text),
                                                                 "delta_sha256": delta_sha}]})
        return entry


def state_of(model: torch.nn.Module) -> dict[str, Tensor]:
    """A model's state (CPU tensors, detached), as the ledger records it."""
    return {n: t.detach().cpu() for n, t in model.state_dict().items()}
