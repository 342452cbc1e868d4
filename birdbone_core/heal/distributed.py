"""Multi-process healing on torch FSDP2 (`fully_shard`): one pod, N processes, what trains is sharded.

    torchrun --nproc_per_node N --master_addr 127.0.0.1 --master_port 29500 -m birdbone_core.cli wave RUN K heal

Backend: NCCL when CUDA is available (each rank trains on cuda:LOCAL_RANK; that path has not been run
yet, no GPU where this was written), gloo on CPU (MASTER_ADDR defaults to 127.0.0.1 and
GLOO_SOCKET_IFNAME to 'lo'). `init_distributed()` joins the group torchrun
describes; alone (no RANK, or WORLD_SIZE 1) nothing changes and healing trains the model in place.

Data parallelism, as before: every rank draws the same minibatch order (same seed) and takes a
contiguous shard of each global minibatch of B rows (`shard`, `shard_batches`); its loss is scaled by
(its rows / B) and the gradients are summed over ranks (FSDP's reduce-scatter with the divide factor
set to 1 and plain SUM collectives, which gloo supports), so the update is the global minibatch's,
up to the order of float additions. Values that decide something (a block's loss before and after,
which decides a revert) are summed with `all_reduce_sum`, so every rank decides the same.

Sharding (`Sharded`): the engine is FSDP2 (ZeRO-3 style). A training twin of the module being healed
is built, sharing every frozen tensor with it (no copy on CPU), and its trainable parameters are
sharded on dim 0 over the ranks, one FSDP unit per decoder layer plus the entry module: each rank
keeps 1/N of the trainable weights, their gradients and Adam moments (and float32 masters), and a
layer's full weights exist only while it runs. Frozen parameters (embeddings, LM head, norms when
weights train, the nf4 base under QLoRA) are left out of FSDP (`ignored_params`) and replicated.
Pruning masks are distributed with their parameter's placement (a DTensor sharded the same way), so
MaskedAdam zeroes the sharded gradient and re-applies the sharded mask exactly as it does alone. After
training the full weights are gathered back into the model's own parameters on every rank; rank 0
(`is_main`) writes them.

Where things live: the model stays whole on every rank, where the step loaded it (the runtime's
--device); the training copy lives on this rank's device (cuda:LOCAL_RANK under NCCL, else the CPU).
With the model on the GPU, FSDP divides the training state (gradients, Adam moments, float32 masters)
by N, but the weights must fit one GPU; with the model in host memory (`--device cpu` on a CUDA node,
backend still NCCL) each GPU holds only its 1/N of what trains plus the frozen embeddings and head:
the setting for a model that does not fit one GPU.

Both methods use it: distillation (whole model end to end, the case where sharding lets a model that
does not fit one GPU train) shards every decoder layer; block-wise healing trains one layer at a time
and shards that layer alone, which for one unit is data parallelism with sharded optimizer state, so
one engine and one code path serve both.

DeepSpeed is not used: ZeRO-3 did run here (2 CPU ranks over gloo, torch AdamW as client optimizer),
but it JIT-builds a communication op on first use (~30 s), owns the optimizer step over its own
flattened fp32 partitions (the masked step and its per-parameter masks would have to reach inside
them), and duplicates what FSDP2 gives from torch itself.
"""
from __future__ import annotations

import copy
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from birdbone_core.errors import BirdboneError

_MESH = None


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_PORT in the environment).

    backend: None picks NCCL when CUDA is available (and pins this process to cuda:LOCAL_RANK), gloo
    otherwise. Returns True when a group with more than one rank is up (already, or now), False when
    the process runs alone (no RANK, or WORLD_SIZE 1).
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if "MASTER_PORT" not in os.environ:
        raise BirdboneError("distributed healing: RANK is set but MASTER_PORT is not (launch with torchrun)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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


def device() -> torch.device:
    """Where this rank trains: cuda:LOCAL_RANK under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64); the values themselves when alone."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _mesh():
    global _MESH
    if _MESH is None:
        from torch.distributed.device_mesh import init_device_mesh
        _MESH = init_device_mesh(device().type, (world_size(),))
    return _MESH


def _frozen_copy(p: nn.Parameter, dev: torch.device) -> nn.Parameter:
    """A frozen parameter for the twin: the same object on CPU, a device copy (same class) elsewhere."""
    if p.device == dev:
        return p
    q = p.to(dev)   # keeps subclasses such as bitsandbytes' Params4bit (and their quantization state)
    return q if isinstance(q, nn.Parameter) else nn.Parameter(q, requires_grad=False)


class Sharded:
    """What one healing run trains, placed for this process; see the module doc.

    root: the module healing runs (a decoder layer, or the whole model); items: (parameter of root,
    keep mask or None) that train; units: submodules of root that become FSDP units, innermost first,
    the last one being the module whose forward the caller runs (defaults to [root]).

    Build it inside `only_these_require_grad(root, ...)`: frozen parameters are shared with root on CPU.
    `module` (root's twin) is what to run forward on and `items` what to give MaskedAdam; `to_device` moves a tensor
    to where `module` computes; `write_back()` (a collective) puts the trained full weights into root's
    own parameters. Alone, `module` is root itself, `items` the given ones, and the rest does nothing.
    """

    def __init__(self, root: nn.Module, items: list[tuple[nn.Parameter, torch.Tensor | None]],
                 units: list[nn.Module] | None = None):
        self.root, self.device = root, device()
        self.originals = [p for p, _ in items]
        if not active():
            self.module, self.items, self.sharded = root, list(items), list(self.originals)
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        names = {id(p): n for n, p in root.named_parameters(remove_duplicate=False)}
        module_names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
        units = [root] if units is None else units
        train = {id(p) for p in self.originals}
        if any(i not in names for i in train) or any(id(m) not in module_names for m in units):
            raise BirdboneError("distributed healing: a trainable parameter or unit is not inside the module")
        entry = module_names[id(units[-1])]
        if entry and any(not names[i].startswith(entry + ".") for i in train):
            raise BirdboneError("distributed healing: a trainable parameter lies outside the entry unit")
        dev, memo, frozen = self.device, {}, set()
        for _, p in root.named_parameters(remove_duplicate=False):
            if id(p) in memo:
                continue
            if id(p) in train:   # stays where it is: fully_shard moves it to the device unit by unit
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=True)
            else:
                memo[id(p)] = _frozen_copy(p, dev)
                frozen.add(memo[id(p)].requires_grad_(False))
        for _, b in root.named_buffers(remove_duplicate=False):
            memo.setdefault(id(b), b.to(dev))
        twin = copy.deepcopy(root, memo)   # new modules; parameters and buffers from memo (shared on CPU)
        del memo                           # a unit's full weights must not outlive its sharding
        mesh = _mesh()
        for unit in units:
            m = twin.get_submodule(module_names[id(unit)])
            fully_shard(m, mesh=mesh, ignored_params=frozen)
            # sum gradients over ranks (each rank's loss share is pre-scaled); SUM collectives only
            # (gloo has neither AVG nor PREMUL_SUM)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self.module = twin
        # the sharded parameters, taken now: FSDP swaps module attributes while a unit is unsharded
        self.sharded = [twin.get_parameter(names[id(p)]) for p in self.originals]
        self.items = []
        for sp, (_, keep) in zip(self.sharded, items):
            if keep is not None:
                keep = distribute_tensor(keep.to(dev), sp.device_mesh, sp.placements, src_data_rank=None)
            self.items.append((sp, keep))

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """`t` where `module` computes (unchanged alone: the model computes where it lives)."""
        return t if self.module is self.root else t.to(self.device)

    @torch.no_grad()
    def write_back(self) -> None:
        """Gather the trained full weights into the original parameters (every rank; no-op alone)."""
        if self.module is self.root:
            return
        for p, sp in zip(self.originals, self.sharded):
            p.copy_(sp.full_tensor().to(p.device, p.dtype))


def shutdown() -> None:
    """Leave the process group (if one is up)."""
    global _MESH
    _MESH = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
