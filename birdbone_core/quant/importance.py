"""Importance of input channels (llama.cpp's imatrix) from calibration text, and its file formats.

    collect_input_stats(model, blocks) -> {hf module name: model.walk.InputStats (sum x^2 per column)}
    model_imatrix(model, blocks, dataset) -> Imatrix   per GGUF tensor name: mean of x^2 per input column
    read_imatrix(path) / write_imatrix(path, imatrix)

File formats, as llama-imatrix (llama.cpp b11312) writes them:
- GGUF (its default, `--output-format gguf`): general.type = "imatrix", imatrix.datasets (string array),
  imatrix.chunk_count, imatrix.chunk_size (uint32); per weight tensor two F32 tensors
  `<name>.in_sum2` [n_mat, in] (sums of x^2 per input column) and `<name>.counts` [n_mat] (tokens
  summed). The importance llama-quantize uses is in_sum2 / counts.
- legacy `.dat` (`--output-format dat`): int32 n_entries, then per entry int32 name length, the name,
  int32 ncall, int32 n_values, float32 values (mean of x^2 times ncall); then int32 chunk count, int32
  dataset-name length, dataset name. llama-quantize divides the values by ncall.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from birdbone_core.atomic import staged_file
from birdbone_core.errors import BirdboneError


@dataclass
class Imatrix:
    """Per GGUF tensor name: importance [in] (mean x^2 per input column) and tokens counted."""
    values: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def get(self, name: str) -> np.ndarray | None:
        return self.values.get(name)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama-imatrix file (GGUF or legacy .dat, told apart by the GGUF magic)."""
    p = Path(path)
    if not p.is_file():
        raise BirdboneError(f"imatrix file {p} does not exist")
    with open(p, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(p) if magic == b"GGUF" else _read_dat(p)
    except BirdboneError:
        raise
    except (ValueError, struct.error, UnicodeDecodeError, KeyError, IndexError) as e:
        raise BirdboneError(f"{p}: not a readable llama.cpp imatrix file ({e})") from None


def _read_gguf(p: Path) -> Imatrix:
    import gguf

    r = gguf.GGUFReader(p)
    kind = r.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise BirdboneError(f"{p}: GGUF file is not an imatrix (general.type is not 'imatrix')")
    out = Imatrix()
    if (f := r.fields.get("imatrix.datasets")) is not None:
        out.datasets = list(f.contents())
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        if (f := r.fields.get(key)) is not None:
            setattr(out, attr, int(f.contents()))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
    for tname, arr in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        counts = tensors.get(name + ".counts")
        if counts is None:
            raise BirdboneError(f"{p}: {tname} has no matching .counts tensor")
        sums = arr.reshape(counts.size, -1)  # [n_mat, in]
        c = counts.reshape(-1, 1)
        # per expert matrix: mean x^2; experts never routed to get zero; one matrix -> [in]
        mean = np.where(c > 0, sums / np.where(c > 0, c, 1), 0).astype(np.float32)
        out.values[name] = mean.reshape(-1) if counts.size == 1 else mean
        out.counts[name] = float(counts.sum())
    return out


def _read_dat(p: Path) -> Imatrix:
    data = p.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    (n,) = take("<i")
    if not 0 < n < 1_000_000:
        raise BirdboneError(f"{p}: not a llama.cpp imatrix file (neither GGUF nor legacy .dat)")
    out = Imatrix()
    for _ in range(n):
        (ln,) = take("<i")
        if not 0 < ln < 4096:
            raise BirdboneError(f"{p}: corrupt legacy imatrix (name length {ln})")
        name = data[pos:pos + ln].decode("utf-8")
        pos += ln
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(data):
            raise BirdboneError(f"{p}: corrupt legacy imatrix entry {name!r}")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out.values[name] = vals / ncall if ncall > 0 else vals
        out.counts[name] = float(ncall)
    if pos + 8 <= len(data):
        (out.chunk_count,) = take("<i")
        (ln,) = take("<i")
        if 0 < ln <= len(data) - pos:
            out.datasets = [data[pos:pos + ln].decode("utf-8", errors="replace")]
    return out


def write_imatrix(path: str | Path, im: Imatrix) -> Path:
    """Write `im` in llama-imatrix's GGUF format (llama-quantize --imatrix reads it). Atomic."""
    import gguf

    from birdbone_core import __version__ as birdbone_version

    p = Path(path)
    with staged_file(p) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")  # writes general.architecture; llama.cpp ignores it
        w.add_type("imatrix")
        w.add_string("birdbone.version", birdbone_version)   # marks the file as one birdbone may replace
        w.add_array("imatrix.datasets", list(im.datasets) or ["birdbone"])
        w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
        for name in sorted(im.values):
            v = np.asarray(im.values[name], dtype=np.float32).reshape(1, -1)
            count = float(im.counts.get(name, 1.0))
            w.add_tensor(name + ".in_sum2", v * np.float32(count))
            w.add_tensor(name + ".counts", np.array([count], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return p


# ----------------------------------------------------------------------------------------------------
# collecting from calibration activations


@torch.no_grad()
def collect_input_stats(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                        description: str = "collecting activations") -> dict:
    """Run calibration blocks [n, seq_len] through the model and accumulate sum x^2 per input column of
    every nn.Linear (the layer walk's collector, `model.walk.attach_stats`, diagonal only; modules fed the
    same tensor share one). The output head's inputs (final hidden states) are recorded under "lm_head"
    without computing the vocabulary logits. Returns {hf module name: model.walk.InputStats}."""
    from birdbone_core.model.walk import InputStats, attach_stats
    from birdbone_core.progress import progress_bar

    head = model.get_output_embeddings()
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    stats, seen, handles = attach_stats(modules, full=False)
    try:
        decoder = model.get_decoder()
        device = model.get_input_embeddings().weight.device
        batches = list(blocks.split(batch_size))
        with progress_bar(description, total=len(batches)) as advance:
            for b in batches:
                seen.clear()
                hidden = decoder(input_ids=b.to(device), use_cache=False).last_hidden_state
                stats.setdefault("lm_head", InputStats(hidden.shape[-1], False, hidden.device)).add(hidden)
                advance()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return stats


def model_imatrix(model: torch.nn.Module, blocks: torch.Tensor, dataset: str) -> Imatrix:
    """llama.cpp's importance matrix of `model` on calibration blocks [n, seq_len], by GGUF tensor name (as
    llama-imatrix writes it: mean x^2 per input column of every 2-D weight but the token embedding)."""
    from birdbone_core.export.arch import arch_for, model_dims, plan_tensors

    stats = collect_input_stats(model, blocks)
    state = model.state_dict()
    plans = plan_tensors(model, arch_for(model.config), model_dims(model.config, state), model.config, state)
    im = Imatrix(datasets=[dataset], chunk_count=int(blocks.shape[0]), chunk_size=int(blocks.shape[1]))
    for p in plans:
        mod = p.hf_name[: -len(".weight")] if p.hf_name.endswith(".weight") else p.hf_name
        s = stats.get(mod)
        if s is None or len(p.shape) < 2:
            continue  # llama-imatrix also leaves out the token embedding (a lookup) and 1-D tensors
        v = s.mean_square()
        if v.shape[0] < p.shape[-1]:  # zero-padded FFN columns
            v = torch.nn.functional.pad(v, (0, p.shape[-1] - v.shape[0]))
        im.values[p.gguf_name] = v.cpu().numpy()
        im.counts[p.gguf_name] = float(s.n_tokens)
    return im
