"""Data-parallel healing over torch.distributed (gloo on CPU, any backend torchrun sets up).

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29500 -m birdbone_core.cli ...

Every rank holds the whole model and the same healing blocks and draws the same minibatch order (same
seed); each global minibatch of B rows is split into contiguous shards, one per rank (rank r gets rows
tensor_split(B, world)[r]). A rank's loss is its shard's mean loss times (its rows / B), so the gradients
summed by `all_reduce_grads` are exactly those of the global minibatch's mean loss, up to the order of
float additions. Every rank then takes the same optimizer step on the same gradients, and the ranks stay
bit-identical without broadcasting weights. Quantities that decide something (a block's loss before and
after healing, which decides a revert) are summed over ranks with `all_reduce_sum`, so every rank
decides the same.

`heal()` switches to this mode by itself when a process group with more than one rank is initialised
(`init_distributed()` does that from torchrun's environment). Only the main rank should write files.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from birdbone_core.errors import BirdboneError


def init_distributed(backend: str = "gloo", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_PORT in the environment).

    Returns True when a group with more than one rank is up (already, or now), False when the process
    runs alone (no RANK, or WORLD_SIZE 1). MASTER_ADDR defaults to 127.0.0.1 and GLOO_SOCKET_IFNAME to
    'lo': on these machines nothing may listen beyond the loopback interface.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if "MASTER_PORT" not in os.environ:
        raise BirdboneError("distributed healing: RANK is set but MASTER_PORT is not (launch with torchrun)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return active()


def active() -> bool:
    """A process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a process running alone: the one that writes outputs."""
    return rank() == 0


def shard(rows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global minibatch's row indices `rows` [B] (all of them alone)."""
    if not active():
        return rows
    return torch.tensor_split(rows, world_size())[rank()]


def shard_batches(blocks: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, float]]:
    """blocks [n, seq_len] in global minibatches of batch_size rows: (this rank's rows, rows / B) each.

    Alone: the minibatches themselves with weight 1. Every global minibatch must give each rank a row.
    """
    out = []
    for rows in torch.arange(blocks.shape[0]).split(batch_size):
        mine = shard(rows)
        if mine.numel() == 0:
            raise BirdboneError(
                f"healing minibatch of {rows.numel()} samples cannot be split over {world_size()} processes: "
                "use batch_size and n_samples that give every process at least one sample per minibatch")
        out.append((blocks[mine], mine.numel() / rows.numel()))
    return out


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over all ranks in place (missing gradients count as zero).

    One flat float32 buffer per dtype, one collective each, instead of one per tensor."""
    if not active():
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); the values themselves when alone."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def shutdown() -> None:
    """Leave the process group (if one is up)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
