"""llama.cpp command-line tools for the benchmark harness, built once per machine and cached.

    python tests/benchmarks/llamacpp_tools.py --build     # build if needed, print the tool paths

The tools come from the `vendor/llama.cpp` tree of the `llama-cpp-python` sdist on PyPI (the same
llama.cpp the project's Python binding runs), built with cmake (Release, static, no OpenSSL/curl,
no server) and cached under

    ${BIRDBONE_CACHE:-~/.cache/birdbone}/llama.cpp-<version>[-native-<cpu-hash>]/bin

`-native-<cpu-hash>` is added when GGML_NATIVE=ON (the default: fastest, but the binaries only run
on CPUs with the same instruction-set flags, so the key includes a hash of /proc/cpuinfo's flags).
Set BIRDBONE_LLAMACPP_NATIVE=0 for a portable build, BIRDBONE_LLAMACPP_BIN=DIR to use tools built
elsewhere. A file lock makes concurrent first uses build once. Not part of the default test run.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-simple", "llama-completion")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF")


class ToolError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("BIRDBONE_CACHE") or Path.home() / ".cache" / "birdbone").expanduser()


def native() -> bool:
    return os.environ.get("BIRDBONE_LLAMACPP_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key(version: str = LLAMA_CPP_PYTHON_VERSION) -> str:
    key = f"llama.cpp-{version}"
    if native():
        key += "-native-" + hashlib.sha256(cpu_flags().encode()).hexdigest()[:10]
    return key


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / build_key(version)


def bin_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    override = os.environ.get("BIRDBONE_LLAMACPP_BIN")
    return Path(override).expanduser() if override else install_dir(version) / "bin"


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        log.flush()
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        raise ToolError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")


def _complete(d: Path) -> bool:
    return all((d / t).is_file() and os.access(d / t, os.X_OK) for t in TOOLS)


def build(version: str = LLAMA_CPP_PYTHON_VERSION, *, jobs: int | None = None, verbose: bool = True) -> Path:
    """Build the tools into the cache (no-op when already there). Returns the bin directory."""
    if os.environ.get("BIRDBONE_LLAMACPP_BIN"):
        d = bin_dir(version)
        if not _complete(d):
            raise ToolError(f"BIRDBONE_LLAMACPP_BIN={d} lacks some of {', '.join(TOOLS)}")
        return d
    dest = install_dir(version)
    if _complete(dest / "bin"):
        return dest / "bin"
    for exe in ("cmake", "c++"):
        if shutil.which(exe) is None:
            raise ToolError(f"building llama.cpp needs `{exe}` on PATH")
    with _lock(cache_root() / f".{build_key(version)}.lock"):
        if _complete(dest / "bin"):
            return dest / "bin"
        dest.mkdir(parents=True, exist_ok=True)
        for stale in dest.glob("build-*"):  # left by a killed build (we hold the lock: nobody else builds)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=dest))
        log_path = dest / "build.log"
        t0 = time.perf_counter()
        if verbose:
            print(f"building llama.cpp tools ({version}) in {work}; log: {log_path}", file=sys.stderr, flush=True)
        try:
            with open(log_path, "w") as log:
                env = dict(os.environ, TMPDIR=str(work))
                _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                      f"llama-cpp-python=={version}", "-d", str(work / "dl"), "-q"], log, env=env)
                sdist = next((work / "dl").glob("llama_cpp_python-*.tar.gz"), None)
                if sdist is None:
                    raise ToolError(f"pip download gave no sdist in {work / 'dl'}")
                with tarfile.open(sdist) as tf:
                    tf.extractall(work / "src", filter="data")
                src = next((work / "src").glob("*/vendor/llama.cpp"), None)
                if src is None or not (src / "CMakeLists.txt").is_file():
                    raise ToolError(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
                commit = _vendor_commit(src.parent.parent, version)
                flags = list(CMAKE_FLAGS) + [f"-DGGML_NATIVE={'ON' if native() else 'OFF'}"]
                if commit:  # the sdist has no .git, so llama.cpp's build-info would say "unknown"
                    flags.append(f"-DLLAMA_BUILD_COMMIT={commit[:7]}")
                gen = ["-G", "Ninja"] if shutil.which("ninja") else []
                _run(["cmake", "-S", str(src), "-B", str(work / "build"), *gen, *flags], log, env=env)
                _run(["cmake", "--build", str(work / "build"), "-j", str(jobs or min(2, os.cpu_count() or 1)),
                      "--target", *TOOLS], log, env=env)
                built = work / "build" / "bin"
                staging = dest / "bin.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                for t in TOOLS:
                    shutil.copy2(built / t, staging / t)
                info = {"llama_cpp_python": version, "sdist": sdist.name,
                        "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
                        "llama_cpp_commit": commit, "cmake_flags": flags,
                        "native": native(), "cpu_model": cpu_model(), "cpu_flags_sha": hashlib.sha256(cpu_flags().encode()).hexdigest(),
                        "build_seconds": round(time.perf_counter() - t0, 1),
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "compiler": _first_line(["c++", "--version"])}
                (staging / "BUILD-INFO.json").write_text(json.dumps(info, indent=2) + "\n")
                shutil.rmtree(dest / "bin", ignore_errors=True)
                staging.rename(dest / "bin")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if verbose:
            print(f"built in {time.perf_counter() - t0:.0f} s -> {dest / 'bin'}", file=sys.stderr, flush=True)
        return dest / "bin"


def _vendor_commit(sdist_root: Path, version: str) -> str | None:
    """The sdist carries no git data; llama-cpp-python's CHANGELOG names the vendored llama.cpp commit
    ("update llama.cpp to ggml-org/llama.cpp@<sha>") in the section of each release."""
    try:
        text = (sdist_root / "CHANGELOG.md").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(rf"^## \[{re.escape(version)}\](.*?)(?=^## \[)", text, re.S | re.M)
    hit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", m.group(1)) if m else None
    return hit.group(1) if hit else None


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception:
        return "?"


_DRAIN_C = """#include <unistd.h>
/* Runs at exit, after main: gives llama.cpp's detached logger thread time to print what is queued. */
__attribute__((destructor)) static void birdbone_log_drain(void) { usleep(300000); }
"""


def log_drain_lib() -> Path | None:
    """A tiny shared library for LD_PRELOAD that delays process exit by 0.3 s.

    llama.cpp's logger prints from a worker thread that is never joined (ggml-org/llama.cpp#22142), so
    on a busy machine the last lines (llama-perplexity's final chunk row and KLD summary) are often lost
    when main returns: 2 of 4 runs on the fixture under load. With the delay 3 of 3 were complete. Built
    with the system C compiler into the cache; None when there is no compiler (callers then rerun)."""
    src_hash = hashlib.sha256(_DRAIN_C.encode()).hexdigest()[:10]
    out = cache_root() / f"log-drain-{src_hash}.so"
    if out.is_file():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "drain.c").write_text(_DRAIN_C)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(Path(d) / "drain.so"), str(Path(d) / "drain.c")],
                           capture_output=True, text=True)
        if r.returncode:
            return None
        shutil.move(str(Path(d) / "drain.so"), str(out))
    return out


def build_info(version: str = LLAMA_CPP_PYTHON_VERSION) -> dict:
    p = bin_dir(version) / "BUILD-INFO.json"
    info = json.loads(p.read_text()) if p.is_file() else {"llama_cpp_python": version}
    info["bin_dir"] = str(bin_dir(version))
    return info


def tool(name: str, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Path of llama.cpp tool `name` (e.g. "llama-quantize"); builds all tools on first use."""
    if not name.startswith("llama-"):
        name = "llama-" + name
    if name not in TOOLS:
        raise ToolError(f"unknown tool {name!r}; one of {', '.join(TOOLS)}")
    p = bin_dir(version) / name
    if not p.is_file():
        build(version)
    return p


# What proves each tool runs: (args, exit codes accepted, text expected in stdout+stderr).
_SMOKE = {
    "llama-quantize": (["--help"], (0, 1), "usage"),
    "llama-imatrix": (["--version"], (0,), "version"),
    "llama-perplexity": (["--version"], (0,), "version"),
    "llama-bench": (["--help"], (0,), "usage"),
    "llama-simple": ([], (0, 1), "example usage"),
    "llama-completion": (["--version"], (0,), "version"),
}


def check_tools() -> dict[str, str]:
    """Run each tool's --help/--version; returns {tool: first informative line}. Raises on failure."""
    out = {}
    for name in TOOLS:
        args, codes, needle = _SMOKE[name]
        r = subprocess.run([str(tool(name)), *args], capture_output=True, text=True, timeout=60)
        text = r.stdout + r.stderr
        if r.returncode not in codes or needle not in text.lower():
            raise ToolError(f"{name} {' '.join(args)} -> rc {r.returncode}:\n{text[-2000:]}")
        line = next((l for l in text.splitlines() if needle in l.lower()), text.strip().splitlines()[0])
        out[name] = line.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="build the tools if not cached, then print their paths")
    ap.add_argument("--check", action="store_true", help="also run each tool's --help/--version")
    ap.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    a = ap.parse_args()
    if a.build:
        build(a.version)
    d = bin_dir(a.version)
    for t in TOOLS:
        p = d / t
        print(f"{t}\t{p}{'' if p.is_file() else '  (not built: run with --build)'}")
    if a.check:
        for t, line in check_tools().items():
            print(f"ok {t}: {line}")


if __name__ == "__main__":
    main()
