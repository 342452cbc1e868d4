"""Argument types shared by every command module: a bad number is a usage error (one `error:` line)
before any work, not a failure deep inside a step."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def device_spec(text: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (the spelling only; whether it exists is checked before the
    command runs, birdbone_core.runtime.resolve_device)."""
    from birdbone_core.runtime import check_device  # torch is imported only when the flag is given

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """--device / --dtype, the same on every command that computes with a model (recipe: `runtime:`)."""
    g = p.add_argument_group("runtime (default: the recipe's `runtime:`, else auto)")
    g.add_argument("--device", type=device_spec, metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the model computes; auto = cuda when present, else cpu")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the weights' dtype; auto = float32 on cpu, bf16 (or the source's half type) on cuda; "
                        "Hessians, Cholesky, column loops and KL stay float32")


def runtime_of(a):
    """The command line's runtime (birdbone_core.runtime.Runtime with only the given flags set), or None."""
    device, dtype = getattr(a, "device", None), getattr(a, "dtype", None)
    if device is None and dtype is None:
        return None
    from birdbone_core.runtime import from_flags

    return from_flags(device, dtype)
