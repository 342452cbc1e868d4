"""llama.cpp's own reference points for a base GGUF: quantize (with/without imatrix), KL divergence and
perplexity vs the base, speed, size. Each call runs one stock llama.cpp tool (built and cached by
`llamacpp_tools.py`) and records its exact command, wall time and peak RSS.

    base = Path("base-f32.gguf")                        # F32/F16/BF16 base
    imx = llama_imatrix(base, "calib.txt", "imatrix.gguf", n_ctx=256)
    q = llama_quantize(base, "q4km.gguf", "Q4_K_M", imatrix=imx.path)
    logits = kld_base(base, "eval.txt", n_ctx=256, chunks=32)     # -> logits file (+ .json sidecar)
    kld(q.path, logits)   # {"ppl", "ppl_base", "mean_kld", "same_top_p", ...}
    bench(q.path)         # {"pp_tps", "tg_tps", ...}  (llama-bench -t 1)
    gguf_stats(q.path)    # {"file_bytes", "tensor_bytes", "n_weights", "bpw", "types": {...}}

Every tool runs with one thread (`-t 1`) by default: on a shared 2-core machine ggml's thread pool
otherwise slows down several-fold. (llama-perplexity's KL statistics use hardware_concurrency()-1
helper threads regardless.) Failed commands raise `ToolRunError` carrying the tool's stderr tail.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

try:  # run as a script from tests/benchmarks, or imported as tests.benchmarks.reference
    from llamacpp_tools import build_info, log_drain_lib, tool
except ImportError:  # pragma: no cover
    from tests.benchmarks.llamacpp_tools import build_info, log_drain_lib, tool

# Named variants: name -> (llama-quantize type, extra arguments).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Q8_0": ("Q8_0", ()),
    "Q6_K": ("Q6_K", ()),
    "Q5_K_M": ("Q5_K_M", ()),
    "Q4_K_M": ("Q4_K_M", ()),
    "Q3_K_M": ("Q3_K_M", ()),
    "Q2_K": ("Q2_K", ()),
    "IQ4_XS": ("IQ4_XS", ()),
    "Q4_0-pure": ("Q4_0", ("--pure",)),
    "Q4_K_M-emb_q5_0": ("Q4_K_M", ("--token-embedding-type", "q5_0")),
    "Q4_K_M-emb_q4_0": ("Q4_K_M", ("--token-embedding-type", "q4_0")),
}


class ToolRunError(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr_tail: str):
        self.cmd, self.returncode, self.stderr_tail = list(cmd), returncode, stderr_tail
        super().__init__(f"{Path(cmd[0]).name} failed (exit {returncode}): {shlex.join(cmd)}\n--- stderr tail ---\n"
                         f"{stderr_tail}")


@dataclass
class Run:
    """One tool invocation: exact command, exit code, wall seconds, peak RSS (MiB) and its output."""
    cmd: list[str]
    returncode: int
    wall_s: float
    peak_rss_mib: float
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    def record(self) -> dict:
        """JSON-friendly summary (command with the tool's file name, not the cache path)."""
        return {"cmd": shlex.join([Path(self.cmd[0]).name, *self.cmd[1:]]), "wall_s": round(self.wall_s, 3),
                "peak_rss_mib": round(self.peak_rss_mib, 1)}


GNU_TIME = "/usr/bin/time"


def _has_gnu_time() -> bool:
    try:
        return subprocess.run([GNU_TIME, "-v", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_GNU_TIME_OK: bool | None = None


def run_tool(cmd: Sequence[str], *, timeout: float | None = None, check: bool = True, tail_chars: int = 4000) -> Run:
    """Run `cmd`, measuring wall time and the tool's peak RSS.

    Peak RSS comes from GNU time (`/usr/bin/time -v`) when present. Not from os.wait4/getrusage of our
    own child: on Linux a child's ru_maxrss starts from the RSS of the process it was forked from (this
    Python, hundreds of MB once torch is imported), so small tools would all report Python's size.
    Without GNU time, /proc/PID/status VmHWM of the tool is polled every 20 ms instead."""
    global _GNU_TIME_OK
    if _GNU_TIME_OK is None:
        _GNU_TIME_OK = _has_gnu_time()
    cmd = [str(c) for c in cmd]
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+b") as out, tempfile.TemporaryFile("w+b") as err, \
            tempfile.NamedTemporaryFile("w+", suffix=".time") as tf:
        argv = [GNU_TIME, "-v", "-o", tf.name, *cmd] if _GNU_TIME_OK else cmd
        env = None
        if Path(cmd[0]).name == "llama-perplexity":  # (+0.3 s wall) let llama.cpp's logger thread finish (see log_drain_lib)
            drain = log_drain_lib()
            if drain is not None:
                env = dict(os.environ, LD_PRELOAD=str(drain))
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        hwm = [0]
        done = threading.Event()

        def poll():
            status = Path(f"/proc/{p.pid}/status")
            while not done.wait(0.02):
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm[0] = max(hwm[0], int(line.split()[1]))
                except (OSError, ValueError):
                    pass

        poller = None if _GNU_TIME_OK else threading.Thread(target=poll, daemon=True)
        if poller:
            poller.start()
        timed_out = False
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        finally:
            done.set()
        wall = time.perf_counter() - t0
        if poller:
            poller.join()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
        rss_kib = float(hwm[0])
        if _GNU_TIME_OK:
            report = Path(tf.name).read_text(errors="replace")
            m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", report)
            rss_kib = float(m.group(1)) if m else float("nan")
            m = re.search(r"Command terminated by signal (\d+)", report)
            code = -int(m.group(1)) if m else p.returncode
        else:
            code = p.returncode
    r = Run(cmd, -9 if timed_out else code, wall, rss_kib / 1024, stdout, stderr)
    if check and r.returncode != 0:
        tail = (stderr.strip() or stdout.strip())[-tail_chars:]
        if timed_out:
            tail += f"\n(killed after the {timeout:g} s timeout)"
        raise ToolRunError(cmd, r.returncode, tail)
    return r


# ---------------------------------------------------------------------------------------------- sizes

def gguf_stats(path: str | os.PathLike) -> dict:
    """File size and bits per weight: tensor data bytes * 8 / number of weights (all tensors), plus the
    same over 2-D weights only, and a count of tensor types."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    n_w = n_b = n_w2 = n_b2 = 0
    types: dict[str, int] = {}
    per_tensor: dict[str, str] = {}
    for t in r.tensors:
        ne, nb = int(t.n_elements), int(t.n_bytes)
        n_w += ne
        n_b += nb
        if len([d for d in t.shape if d > 1]) >= 2:
            n_w2 += ne
            n_b2 += nb
        name = t.tensor_type.name
        types[name] = types.get(name, 0) + 1
        per_tensor[t.name] = name
    return {"file_bytes": Path(path).stat().st_size, "tensor_bytes": n_b, "n_weights": n_w,
            "bpw": 8 * n_b / n_w if n_w else float("nan"),
            "bpw_2d": 8 * n_b2 / n_w2 if n_w2 else float("nan"),
            "types": dict(sorted(types.items())), "tensor_types": per_tensor}


def gguf_file_type(path: str | os.PathLike) -> str:
    """Dominant 2-D tensor type by weight count (e.g. "F32", "F16", "Q4_K")."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    by_type: dict[str, int] = {}
    for t in r.tensors:
        if len([d for d in t.shape if d > 1]) >= 2:
            by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(by_type, key=by_type.get) if by_type else "?"


# ------------------------------------------------------------------------------------------- quantize

@dataclass
class QuantResult:
    path: Path
    qtype: str
    extra: list[str]
    imatrix: str | None
    run: dict
    stats: dict

    def record(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["stats"] = {k: v for k, v in self.stats.items() if k != "tensor_types"}
        return d


def llama_quantize(base: str | os.PathLike, out: str | os.PathLike, qtype: str, imatrix: str | os.PathLike | None = None,
                   extra: Sequence[str] = (), *, threads: int = 1, timeout: float | None = None) -> QuantResult:
    """`llama-quantize [extra] [--imatrix F] base out TYPE threads`. `extra`: e.g. ["--pure"],
    ["--token-embedding-type", "q5_0"], ["--allow-requantize"]."""
    base, out = Path(base), Path(out)
    if not base.is_file():
        raise FileNotFoundError(base)
    cmd = [tool("llama-quantize"), *extra]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(base), str(out), qtype, str(threads)]
    r = run_tool(cmd, timeout=timeout)
    if not out.is_file():
        raise ToolRunError(r.cmd, 0, f"llama-quantize exited 0 but wrote no {out}\n{r.stdout[-2000:]}")
    return QuantResult(out, qtype, list(extra), str(imatrix) if imatrix else None, r.record(), gguf_stats(out))


def quantize_variant(base, out, variant: str, imatrix=None, **kw) -> QuantResult:
    qtype, extra = VARIANTS[variant]
    return llama_quantize(base, out, qtype, imatrix, extra, **kw)


# -------------------------------------------------------------------------------------------- imatrix

@dataclass
class ImatrixResult:
    path: Path
    run: dict
    chunks_processed: int | None
    ppl: float | None


def llama_imatrix(base: str | os.PathLike, calib_text_file: str | os.PathLike, out: str | os.PathLike, *,
                  n_ctx: int = 512, chunks: int | None = None, threads: int = 1, compute_ppl: bool = False,
                  extra: Sequence[str] = (), timeout: float | None = None) -> ImatrixResult:
    """`llama-imatrix -m base -f calib -o out -c n_ctx [--chunks N]`; the output is GGUF-format imatrix
    when `out` ends in .gguf (this llama.cpp's default), legacy .dat otherwise."""
    out = Path(out)
    cmd = [tool("llama-imatrix"), "-m", str(base), "-f", str(calib_text_file), "-o", str(out),
           "-c", str(n_ctx), "-t", str(threads), "--output-format", "gguf" if out.suffix == ".gguf" else "dat"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if not compute_ppl:
        cmd += ["--no-ppl"]
    cmd += list(extra)
    r = run_tool(cmd, timeout=timeout)
    if not out.is_file():
        raise ToolRunError(r.cmd, 0, f"llama-imatrix exited 0 but wrote no {out}\n{r.stderr[-2000:]}")
    text = r.stdout + r.stderr
    m = re.findall(r"\[(\d+)\]\s*([0-9.]+)", text) if compute_ppl else []
    n = re.findall(r"processing (\d+) chunks|computing over (\d+) chunks", text)
    n_chunks = next((int(a or b) for a, b in n), None)
    return ImatrixResult(out, r.record(), n_chunks, float(m[-1][1]) if m else None)


# -------------------------------------------------------------------------------- perplexity and KLD

_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf)\s*\+/-\s*([0-9.]+|nan|inf)")
_NUM = r"(-?[0-9.]+(?:e[-+]?\d+)?|-?nan|-?inf)"
_KLD_LINES = {
    # key: (regex, scale) — percentages are turned into fractions
    "ppl": (rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "ppl_base": (rf"Mean PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "ln_ppl_cor": (rf"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\)\s*:\s*{_NUM}\s*%", 0.01),
    "ln_ppl_ratio": (rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "ppl_ratio": (rf"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "ppl_diff": (rf"Mean PPL\(Q\)-PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "mean_kld": (rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}", 1.0),
    "max_kld": (rf"Maximum KLD:\s*{_NUM}", 1.0),
    "kld_99_9": (rf"99\.9%\s+KLD:\s*{_NUM}", 1.0),
    "kld_99": (rf"99\.0%\s+KLD:\s*{_NUM}", 1.0),
    "kld_95": (rf"95\.0%\s+KLD:\s*{_NUM}", 1.0),
    "median_kld": (rf"Median\s+KLD:\s*{_NUM}", 1.0),
    "mean_dp": (rf"Mean\s+Δp:\s*{_NUM}\s*±\s*{_NUM}\s*%", 0.01),
    "max_dp": (rf"Maximum Δp:\s*{_NUM}%", 0.01),
    "min_dp": (rf"Minimum Δp:\s*{_NUM}%", 0.01),
    "rms_dp": (rf"RMS Δp\s*:\s*{_NUM}\s*±\s*{_NUM}\s*%", 0.01),
    "same_top_p": (rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%", 0.01),
}
# Per-chunk row: chunk, PPL ± u, ln ratio ± u, KLD ± u, RMS Δp ± u %, same top ± u %
_KLD_ROW = re.compile(rf"^\s*(\d+)\s+{_NUM}\s*±\s*{_NUM}\s+{_NUM}\s*±\s*{_NUM}\s+{_NUM}\s*±\s*{_NUM}\s+"
                      rf"{_NUM}\s*±\s*{_NUM}\s*%\s+{_NUM}\s*±\s*{_NUM}\s*%\s*$", re.M)


# Filled from the last per-chunk row (cumulative over all chunks) when the summary line is missing.
_ROW_KEYS = {"ppl": (1, 1.0), "ppl_unc": (2, 1.0), "ln_ppl_ratio": (3, 1.0), "ln_ppl_ratio_unc": (4, 1.0),
             "mean_kld": (5, 1.0), "mean_kld_unc": (6, 1.0), "rms_dp": (7, 0.01), "rms_dp_unc": (8, 0.01),
             "same_top_p": (9, 0.01), "same_top_p_unc": (10, 0.01)}
KLD_SUMMARY_KEYS = ("ppl", "ppl_base", "mean_kld", "kld_99", "median_kld", "same_top_p", "rms_dp")


def parse_kld_output(text: str) -> dict:
    """Numbers from `llama-perplexity --kl-divergence` output.

    llama.cpp's logger prints from a worker thread that is not joined at exit (upstream leaks it on
    purpose, ggml-org/llama.cpp#22142), so the last lines are sometimes lost; and no summary is printed
    under 100 scored tokens. Values missing from the summary are taken from the last per-chunk row
    (those columns are cumulative over all chunks so far); their keys are listed in "from_chunk_row"."""
    res: dict = {}
    for key, (rx, scale) in _KLD_LINES.items():
        m = re.search(rx, text)
        if m:
            res[key] = float(m.group(1)) * scale
            if m.lastindex and m.lastindex >= 2:
                res[key + "_unc"] = float(m.group(2)) * scale
    rows = _KLD_ROW.findall(text)
    if rows:
        last = rows[-1]
        res["n_chunks"] = int(last[0])
        filled = [k for k in _ROW_KEYS if k not in res]
        for k in filled:
            i, scale = _ROW_KEYS[k]
            res[k] = float(last[i]) * scale
        if filled:
            res["from_chunk_row"] = filled
    if "mean_kld" not in res or "ppl" not in res:
        raise ValueError("no KL-divergence results found in llama-perplexity output:\n" + text[-3000:])
    return res


def _common_eval_args(threads: int, batch: int | None) -> list[str]:
    args = ["-t", str(threads), "-tb", str(threads), "--no-warmup"]
    if batch:
        args += ["-b", str(batch), "-ub", str(batch)]
    return args


def _final_ppl(text: str) -> tuple[float, float | None] | None:
    """(ppl, uncertainty) from "Final estimate", else from the last "[i]ppl," progress item (no uncertainty;
    the logger may drop the final lines, see parse_kld_output)."""
    m = _FINAL.search(text)
    if m:
        return float(m.group(1)), float(m.group(2))
    items = re.findall(r"\[(\d+)\]\s*([0-9.]+|nan|inf),", text)
    if items:
        return float(max(items, key=lambda t: int(t[0]))[1]), None
    return None


def _n_chunks(text: str) -> int | None:
    """Chunks llama-perplexity scored: its "over N chunks" log line, else the last "[i]ppl," progress item."""
    m = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks", text)
    if m:
        return int(m.group(1))
    items = re.findall(r"\[(\d+)\]\s*[0-9.]+,", text)
    return max(map(int, items)) if items else None


def llama_perplexity(model: str | os.PathLike, eval_text: str | os.PathLike, n_ctx: int, *, chunks: int | None = None,
                     threads: int = 1, timeout: float | None = None) -> dict:
    """Plain `llama-perplexity -f eval_text -c n_ctx` -> {"ppl", "ppl_unc", "n_chunks", "run"}."""
    cmd = [tool("llama-perplexity"), "-m", str(model), "-f", str(eval_text), "-c", str(n_ctx),
           *_common_eval_args(threads, None)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    r = run_tool(cmd, timeout=timeout)
    fp = _final_ppl(r.stdout + r.stderr)
    if fp is None:
        raise ToolRunError(r.cmd, 0, "no perplexity in llama-perplexity output\n" + (r.stdout + r.stderr)[-3000:])
    return {"ppl": fp[0], "ppl_unc": fp[1], "n_chunks": _n_chunks(r.stdout + r.stderr), "run": r.record()}


def kld_base(base: str | os.PathLike, eval_text: str | os.PathLike, n_ctx: int, *, out: str | os.PathLike | None = None,
             chunks: int | None = None, threads: int = 1, timeout: float | None = None) -> Path:
    """`llama-perplexity --kl-divergence-base OUT` on the base model: writes the base's token ids and
    log-probabilities (uint16-packed, ~2 bytes x vocab x n_ctx/2 per chunk) to OUT and returns OUT.
    A sidecar OUT.json holds n_ctx, chunks, the base perplexity and the run record."""
    base = Path(base)
    out = Path(out) if out else base.with_suffix(f".kld-c{n_ctx}.bin")
    cmd = [tool("llama-perplexity"), "-m", str(base), "-f", str(eval_text), "-c", str(n_ctx),
           "--kl-divergence-base", str(out), *_common_eval_args(threads, None)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    r = run_tool(cmd, timeout=timeout)
    text = r.stdout + r.stderr
    fp = _final_ppl(text)
    if not out.is_file() or fp is None:
        raise ToolRunError(r.cmd, 0, f"no logits file {out} or no perplexity in the output\n{text[-3000:]}")
    hdr = logits_header(out)
    if hdr["n_ctx"] != n_ctx:
        raise ToolRunError(r.cmd, 0, f"{out} has n_ctx {hdr['n_ctx']}, asked for {n_ctx}")
    meta = {"base": str(base), "eval_text": str(eval_text), "n_ctx": n_ctx, "chunks_requested": chunks,
            "n_chunks": hdr["n_chunk"], "n_vocab": hdr["n_vocab"], "ppl": fp[0], "ppl_unc": fp[1],
            "logits_bytes": out.stat().st_size, "run": r.record()}
    Path(str(out) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def kld_base_info(base_logits: str | os.PathLike) -> dict:
    p = Path(str(base_logits) + ".json")
    return json.loads(p.read_text()) if p.is_file() else {}


def logits_header(path: str | os.PathLike) -> dict:
    """n_ctx, n_vocab, n_chunk from a --kl-divergence-base file ("_logits_", then three int32)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:8] != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (8, 12, 16))
    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk}


def kld(candidate: str | os.PathLike, base_logits: str | os.PathLike, *, threads: int = 1, attempts: int = 3,
        timeout: float | None = None) -> dict:
    """`llama-perplexity --kl-divergence --kl-divergence-base BASE_LOGITS -m candidate` -> {ppl, ppl_base,
    mean_kld, median_kld, kld_99, max_kld, same_top_p (fraction), rms_dp, ..., n_chunks, run}. The
    tokens come from the logits file; n_ctx is read from its header. When llama.cpp loses the tail of
    its output (see parse_kld_output) the command is rerun, up to `attempts` runs in all; after that
    the missing values come from the last chunk row, or ToolRunError if even that is incomplete."""
    base_logits = Path(base_logits)
    hdr = logits_header(base_logits)
    cmd = [tool("llama-perplexity"), "-m", str(candidate), "-c", str(hdr["n_ctx"]), "--kl-divergence-base",
           str(base_logits), "--kl-divergence", *_common_eval_args(threads, None)]
    res, err, runs = None, "", 0
    for _ in range(max(1, attempts)):
        r = run_tool(cmd, timeout=timeout)
        runs += 1
        try:
            cand = parse_kld_output(r.stdout + r.stderr)
        except ValueError as e:
            err = str(e)
            continue
        if cand.get("n_chunks") != hdr["n_chunk"]:
            err = f"output ends at chunk {cand.get('n_chunks')} of {hdr['n_chunk']}"
            continue
        res = cand
        if all(k in res for k in KLD_SUMMARY_KEYS) and "from_chunk_row" not in res:
            break
    if res is None:
        raise ToolRunError(r.cmd, 0, f"{err}\n(after {runs} runs)")
    res["n_ctx"] = hdr["n_ctx"]
    res["run"] = r.record()
    if runs > 1:
        res["run"]["runs"] = runs  # output was truncated and the command rerun
    return res


# -------------------------------------------------------------------------------------------- speed

def bench(gguf: str | os.PathLike, *, threads: int = 1, n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
          timeout: float | None = None) -> dict:
    """`llama-bench -t 1 -p n_prompt -n n_gen -r reps -o json` -> {pp_tps, pp_tps_sd, tg_tps, tg_tps_sd, ...}."""
    cmd = [tool("llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(reps), "-o", "json"]
    r = run_tool(cmd, timeout=timeout)
    s = r.stdout
    start = s.find("[")
    try:
        rows = json.loads(s[start:s.rfind("]") + 1]) if start >= 0 else []
    except json.JSONDecodeError as e:
        raise ToolRunError(r.cmd, 0, f"llama-bench JSON unreadable ({e}):\n{s[-2000:]}") from None
    res: dict = {"threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps}
    for row in rows:
        if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
            res.update(pp_tps=row["avg_ts"], pp_tps_sd=row.get("stddev_ts"))
        elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0:
            res.update(tg_tps=row["avg_ts"], tg_tps_sd=row.get("stddev_ts"))
        for k in ("build_commit", "build_number", "cpu_info", "backends", "type_k", "model_type"):
            if k in row:
                res.setdefault(k, row[k])
    if "pp_tps" not in res and "tg_tps" not in res:
        raise ToolRunError(r.cmd, 0, f"no pp/tg rows in llama-bench output:\n{s[-2000:]}")
    res["run"] = r.record()
    return res


def tool_version() -> dict:
    """llama.cpp build as the tools report it (`--version`), plus the cache's BUILD-INFO.json."""
    r = run_tool([tool("llama-perplexity"), "--version"], check=False)
    text = r.stdout + r.stderr
    m = re.search(r"version:\s*(\S+)\s*\(([^)]*)\)", text)
    info = build_info()
    info["tool_version"] = f"{m.group(1)} ({m.group(2)})" if m else text.strip().splitlines()[0] if text.strip() else "?"
    m = re.search(r"built with (.*)", text)
    if m:
        info["tool_built_with"] = m.group(1).strip()
    return info
