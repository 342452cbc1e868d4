"""A run's GGUF against what llama.cpp's own quantizer makes of the same source at the same file size.

    birdbone versus RUN        # after `birdbone compress` or the Airflow DAG; writes RUN/versus_llamacpp.json

llama.cpp's side is made with the llama.cpp library llama-cpp-python bundles (`llama_model_quantize`, as
`llama-quantize --imatrix` does it), with an importance matrix of the source model on the run's calibration
text, so it is llama.cpp's best stock recipe and not a strawman: its mixes are tried from the smallest up,
and the first one at least as large as the run's GGUF is compared (llama.cpp gets at least as many bytes).
Every file is then scored the same way: size, held-out bits per byte (each file with its own tokenizer, so a
trimmed vocabulary compares fairly: birdbone_core.eval.llamacpp.llama_bits_per_byte) and greedy decode speed.
"""
from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import TYPE_CHECKING

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError

if TYPE_CHECKING:   # the command's parser is built on every call: heavy imports happen in the functions
    from birdbone_core.quant.importance import Imatrix

# llama.cpp mixes, smallest first: (name, LLAMA_FTYPE_MOSTLY_*, token-embedding GGML type or None). A forced
# embedding type must divide the embedding's rows (llama.cpp aborts otherwise; its own choices fall back),
# so mixes whose type does not fit are skipped (Gemma 3 270M's rows of 640 take 32-weight blocks, not
# K-quants). Where a 4.5-bit embedding is forced it is IQ4_NL, not Q4_0: the same size, and with an imatrix
# clearly the better of the two, so llama.cpp's side is its strongest stock file at that size.
MIXES = (("Q2_K, q2_K embedding", "Q2_K", "Q2_K"), ("Q2_K, iq4_nl embedding", "Q2_K", "IQ4_NL"),
         ("Q3_K_M, q3_K embedding", "Q3_K_M", "Q3_K"), ("Q3_K_M, iq4_nl embedding", "Q3_K_M", "IQ4_NL"),
         ("Q4_K_M, iq4_nl embedding", "Q4_K_M", "IQ4_NL"), ("Q4_K_M", "Q4_K_M", None), ("Q5_K_M", "Q5_K_M", None),
         ("Q8_0", "Q8_0", None))


def embedding_row(source: Path) -> int:
    """Weights per row of the source's token embedding (its hidden size)."""
    from birdbone_core.model.gguf_header import read_gguf_header

    for t in read_gguf_header(Path(source)).tensors:
        if t.name == "token_embd.weight":
            return int(t.shape[0])             # GGUF order: the row (hidden size) first
    raise BirdboneError(f"{source}: no token_embd.weight")


def fits(embedding: str | None, row: int) -> bool:
    import gguf

    return embedding is None or row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[embedding]][0] == 0


def llama_quantize(src: Path, dst: Path, ftype: str, embedding: str | None, imatrix: Imatrix | None,
                   threads: int = 2) -> Path:
    """llama.cpp's quantizer on `src` (re-quantizing a quantized source, as `--allow-requantize`)."""
    import numpy as np

    from birdbone_core.eval.llamacpp import llama_cpp_module

    lc = llama_cpp_module()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    params.allow_requantize = True
    if embedding is not None:
        params.token_embedding_type = getattr(lc, f"GGML_TYPE_{embedding}")
    keep = []   # the C side reads these buffers during the call
    if imatrix is not None:
        entries = (lc.llama_model_imatrix_data * (len(imatrix.values) + 1))()   # terminated by name == NULL
        for i, (name, v) in enumerate(imatrix.values.items()):
            arr = np.ascontiguousarray(v, dtype=np.float32)
            keep += [arr, name.encode()]
            entries[i].name, entries[i].size = keep[-1], arr.size
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    with atomic.staged_file(Path(dst)) as tmp:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise BirdboneError(f"llama.cpp could not quantize {src} to {ftype} (returned {rc})")
    return Path(dst)


def decode_tok_s(gguf: Path, prompt: str, n_tokens: int = 64, threads: int = 2, repeats: int = 2) -> float:
    from birdbone_core.eval.llamacpp import llama_greedy_ids

    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = llama_greedy_ids(gguf, prompt, n_tokens, n_threads=threads)
        best = max(best, len(ids) / (time.perf_counter() - t0))
    return best


def score(gguf: Path, held_out: str, threads: int, segments: int) -> dict:
    from birdbone_core.eval.llamacpp import llama_bits_per_byte

    bpb = llama_bits_per_byte(gguf, held_out, max_segments=segments, n_threads=threads)
    return {"path": str(gguf), "bytes": gguf.stat().st_size, "bits_per_byte": bpb["bits_per_byte"],
            "decode_tok_s": decode_tok_s(gguf, "The Python tutorial explains", threads=threads)}


def versus_llamacpp(source: Path, ours: Path, imatrix: Imatrix, held_out: str, work: Path, *, threads: int = 2,
                    segments: int = 4) -> dict:
    """Rows for the source, llama.cpp's mix at (at least) our size, and ours."""
    target = ours.stat().st_size
    chosen = None
    row = embedding_row(source)
    for name, ftype, emb in (m for m in MIXES if fits(m[2], row)):
        path = work / f"llamacpp-{ftype}{'-emb_' + emb if emb else ''}.gguf".lower()
        if not path.is_file():
            llama_quantize(source, path, ftype, emb, imatrix, threads)
        chosen = (name, path)
        if path.stat().st_size >= target:
            break
    rows = {"source": score(source, held_out, threads, segments),
            f"llama.cpp {chosen[0]} +imatrix": score(chosen[1], held_out, threads, segments),
            "birdbone": score(ours, held_out, threads, segments)}
    return {"rows": rows, "segments": segments, "threads": threads}


def print_versus(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["rows"]
    src = rows["source"]
    t = Table(title=f"held-out bits per byte ({result['segments']} segments, each file's own tokenizer; lower is "
                    f"better) and greedy decode speed ({result['threads']} threads), same machine, same run")
    for col in ("model", "file", "size MB", "vs source", "bits/byte", "decode tok/s", "speed vs source"):
        t.add_column(col, justify="left" if col in ("model", "file") else "right")
    for name, r in rows.items():
        t.add_row(name, Path(r["path"]).name, f"{r['bytes'] / 1e6:.1f}", f"{r['bytes'] / src['bytes']:.0%}",
                  f"{r['bits_per_byte']:.4f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / src['decode_tok_s']:.2f}x")
    Console(width=max(120, Console().width)).print(t)


def run_versus(run_root: Path, threads: int = 2) -> dict:
    """`birdbone versus RUN`: the comparison for a finished run, written to RUN/versus_llamacpp.json."""
    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.model.load import load_model
    from birdbone_core.quant.importance import model_imatrix
    from birdbone_core.run import Run

    run = Run(Path(run_root))
    m = run.manifest()["model"]
    recipe = run.recipe()
    if m["kind"] != "gguf":
        raise BirdboneError(f"{run.root}: `versus` compares with llama.cpp's quantizer on the source GGUF; this run "
                            f"started from {m['kind']} {m['path']}")
    ours = run.gguf_path(recipe)
    if not ours.is_file():
        raise BirdboneError(f"{run.root}: no {ours.name} yet (the export step has not run)")
    cal = recipe.calibration
    text, desc = read_text(cal.text, "calib")
    held, _ = read_text(recipe.evaluation.text, "eval")
    lm = load_model(m["path"], placement=run.placement())     # the imatrix pass on the run's device
    blocks = calibration_blocks(lm.tokenizer, text, min(cal.n_samples, 16), min(cal.seq_len, 512), cal.seed)
    imatrix = model_imatrix(lm.model, blocks, desc)
    del lm
    work = run.root / "versus"
    work.mkdir(exist_ok=True)
    result = versus_llamacpp(Path(m["path"]), ours, imatrix, held, work, threads=threads)
    atomic.write_json(run.root / "versus_llamacpp.json", result)
    return result


def add_commands(sub) -> None:
    p = sub.add_parser("versus", help="a run's GGUF against llama.cpp's own quantizer (with an imatrix) at the "
                                      "same file size: size, held-out bits per byte, decode speed")
    p.add_argument("run", help="run directory (after export)")
    p.add_argument("--threads", type=int, default=2)

    def _cmd(a) -> int:
        print_versus(run_versus(Path(a.run), a.threads))
        print(f"written: {Path(a.run) / 'versus_llamacpp.json'}")
        return 0

    p.set_defaults(fn=_cmd)
