"""Structural waves on disk: what each wave removed, and every tensor it changed as it was before, so any
earlier state, the uncut model included, is rebuilt bit for bit (`revert_structure`).

    OUT/waves/K/wave.json            the wave: what went (layers, FFN neurons, KV groups, tokens, in the
                                     numbering the wave saw), healing, bits per byte, the stop-loss decision,
                                     the config before it, and the sha256 of every tensor before and after
    OUT/waves/K/before.safetensors   every tensor the wave changed, removed or reshaped, as it was before
    OUT/waves/K/tokenizer/           the tokenizer before the wave (a vocabulary wave only; with
                                     tokenizer.gguf for a GGUF source)

A tensor the wave left bit-identical is not stored: wave.json names where it went (a dropped layer renumbers
the layers after it). Healing changes every weight it trains, so a healed wave stores those in full. The
state named here is the saved one: a tied LM head is its embedding (transformers stores it once).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import state_of
from birdbone_core.ledger.delta import bits, tensor_hash

WAVES = "waves"
WAVE_JSON, BEFORE, TOKENIZER_DIR = "wave.json", "before.safetensors", "tokenizer"
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as save_pretrained writes it: the ledger's (detached CPU tensors), a tied head left out."""
    state = state_of(model)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def layer_renames(names: list[str], kept_layers: list[int]) -> dict[str, str]:
    """{name before a layer drop: name after} for the tensors of the kept layers (kept_layers: original
    indices in order, so layer kept_layers[i] becomes layer i); names outside any layer are unchanged."""
    new_index = {old: new for new, old in enumerate(kept_layers)}
    out = {}
    for name in names:
        m = _LAYER.search(name)
        if m is None:
            out[name] = name
        elif int(m.group(2)) in new_index:
            out[name] = name[:m.start(2)] + str(new_index[int(m.group(2))]) + name[m.end(2):]
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def write_wave(root: Path, k: int, meta: dict, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
               renames: dict[str, str], config_before: dict, tokenizer_before=None, gguf_tokenizer_before=None) -> Path:
    """Record wave k under root/waves/k (root: the structured model's staging directory). before/after:
    saved states around the wave; renames: {name before: name after} for every tensor that survived."""
    from birdbone_core.export.vocab import TOKENIZER_GGUF, write_tokenizer_gguf

    d = root / WAVES / str(k)
    d.mkdir(parents=True, exist_ok=True)
    carried = {b: renames[b] for b, t in before.items() if renames.get(b) in after and _same_bits(t, after[renames[b]])}
    stored = {n: t.contiguous() for n, t in before.items() if n not in carried}
    if stored:
        tmp = d / f".{BEFORE}.tmp"
        save_file(stored, str(tmp), metadata={"format": "pt"})
        tmp.replace(d / BEFORE)
    if tokenizer_before is not None:
        tokenizer_before.save_pretrained(str(d / TOKENIZER_DIR))
        if gguf_tokenizer_before is not None:
            write_tokenizer_gguf(gguf_tokenizer_before, d / TOKENIZER_DIR / TOKENIZER_GGUF)
    atomic.write_json(d / WAVE_JSON, {
        **meta, "wave": k, "config_before": config_before, "stored": sorted(stored), "carried": carried,
        "hashes_before": {n: tensor_hash(t) for n, t in before.items()},
        "hashes_after": {n: tensor_hash(t) for n, t in after.items()}})
    return d


def read_waves(src: Path) -> list[dict]:
    """Every recorded wave of a structured model directory, in order (empty: none recorded)."""
    root = src / WAVES
    if not root.is_dir():
        return []
    ks = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / WAVE_JSON).is_file())
    if ks != list(range(1, len(ks) + 1)):
        raise BirdboneError(f"{root}: waves {ks} are not 1..{len(ks)}; the records are incomplete")
    return [json.loads((root / str(k) / WAVE_JSON).read_text()) for k in ks]


def _load_state(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise BirdboneError(f"{src}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _check(state: dict[str, torch.Tensor], hashes: dict[str, str], where: str) -> None:
    if state.keys() != hashes.keys():
        raise BirdboneError(f"{where}: tensors {sorted(state.keys() ^ hashes.keys())[:3]} do not match the record")
    bad = [n for n, t in state.items() if tensor_hash(t) != hashes[n]]
    if bad:
        raise BirdboneError(f"{where}: {len(bad)} tensors differ from the record (e.g. {bad[0]})")


def state_before(wave_dir: Path, wave: dict, after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved state before a wave, from the state after it and the wave's record."""
    if wave["stored"] and not (wave_dir / BEFORE).is_file():
        raise BirdboneError(f"{wave_dir}: {BEFORE} is missing; wave {wave['wave']} cannot be reverted")
    stored = load_file(str(wave_dir / BEFORE)) if wave["stored"] else {}
    return {n: (stored[n] if n in stored else after[wave["carried"][n]]) for n in wave["hashes_before"]}


def revert_structure(src: Path, to_wave: int, out: Path) -> Path:
    """Write the model after structural wave `to_wave` (0: the uncut model) of the structured model directory
    `src` as a Hugging Face directory `out`, every tensor checked against the recorded sha256."""
    waves = read_waves(src)
    if not waves:
        raise BirdboneError(f"{src}: no structural waves recorded (a model cut before they were)")
    if not 0 <= to_wave <= len(waves):
        raise BirdboneError(f"{src}: no structural wave {to_wave}; the record holds waves 0..{len(waves)}")
    state = _load_state(src)
    _check(state, waves[-1]["hashes_after"], f"{src} (after wave {waves[-1]['wave']})")   # a rollback's: its before
    config = json.loads((src / "config.json").read_text())
    gen = src / "generation_config.json"
    generation = json.loads(gen.read_text()) if gen.is_file() else None
    tok_dir = src
    for w in reversed(waves[to_wave:]):
        if w["decision"] != "accept":    # a rolled-back wave left the state as it found it
            continue
        wd = src / WAVES / str(w["wave"])
        state = state_before(wd, w, state)
        _check(state, w["hashes_before"], f"{src} (before wave {w['wave']})")
        config = w["config_before"]
        generation = w.get("generation_config_before", generation)
        if (wd / TOKENIZER_DIR).is_dir():
            tok_dir = wd / TOKENIZER_DIR
    with atomic.staged_dir(out, mark=True) as tmp:
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in tok_dir.iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json",
                                                                            "chat_template.jinja")):
                shutil.copy2(f, tmp / f.name)
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
    return out


def describe_cut(wave: dict) -> str:
    """What one wave removed, in a few words."""
    parts = []
    if "vocab" in wave:
        parts.append(f"vocab {wave['vocab']['of']} -> {wave['vocab']['kept']}")
    if "layers" in wave:
        parts.append(f"layers {wave['layers']['removed']} of {wave['layers']['of']}")
    if "width" in wave:
        b, a = wave["width"]["sizes_before"], wave["width"]["sizes_after"]
        parts += [f"{key} {b[key]} -> {a[key]}" for key in ("intermediate_size", "num_key_value_heads")
                  if b[key] != a[key]]
        if "ffn_widths" in a:
            parts.append(f"FFN widths {min(a['ffn_widths'])}..{max(a['ffn_widths'])}")
    return "; ".join(parts) or "-"


def structure_table(src: Path):
    """A rich Table of the structural waves recorded in `src` (a structured model directory)."""
    from rich.table import Table

    t = Table(title=f"structural waves ({src}; birdbone revert ... --structure K)")
    for col in ("wave", "decision", "removed", "bits/byte", "healing KL", "stored"):
        t.add_column(col, justify="right" if col in ("wave", "bits/byte", "stored") else "left")
    for w in read_waves(src):
        f = src / WAVES / str(w["wave"]) / BEFORE
        heal = w.get("heal")
        t.add_row(str(w["wave"]), w["decision"], describe_cut(w),
                  f"{w['bits_per_byte']:.4f}" if "bits_per_byte" in w else "-",
                  f"{heal['kl_before']:.4f} -> {heal['kl_after']:.4f}" if heal else "-",
                  f"{f.stat().st_size / 1e6:.1f} MB" if f.is_file() else "-")
    return t
