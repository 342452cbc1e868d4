"""Distributed healing on torch FSDP2: 2 processes on gloo (torchrun) end bit-identical and match one
process on the same global minibatches to float tolerance, pruning masks held. This file is also the
torchrun worker (run as a script).

Tolerance: every healed tensor within rtol 1e-4 / atol 1e-5 of the single process, identical zeros, loss
curves within rel 1e-4. Measured (torch 2.13 CPU, 2 gloo ranks, float32 fixture): max abs difference 0,
bit-identical; the tolerance leaves room for another summation order of the two ranks' gradient sums
(another BLAS, other shard sizes)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama"


def heal_fixture() -> tuple[dict[str, torch.Tensor], dict]:
    """Magnitude-prune the fixture to 50%, heal it block-wise then by distillation; (weights, losses)."""
    import copy

    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.heal import Heal, heal
    from birdbone_core.model.load import load_model
    from birdbone_core.prune.sequential import prune_sequential
    from birdbone_core.recipe import parse_recipe

    lm = load_model(str(FIXTURE))
    dense = copy.deepcopy(lm.model)
    blocks = calibration_blocks(lm.tokenizer, read_text(None, "calib")[0], n_samples=8, seq_len=64, seed=0)
    prune_sequential(lm.model, blocks, parse_recipe({"prune": {"method": "magnitude", "sparsity": 0.5}}).prune)
    pruned = {k: v == 0 for k, v in lm.model.state_dict().items() if "layers." in k and v.dim() == 2}
    rep_b = heal(lm.model, dense, blocks, Heal(method="blockwise", steps=4, lr=1e-3, batch_size=4))
    rep_d = heal(lm.model, dense, blocks, Heal(method="distill", steps=3, lr=1e-4, batch_size=4, top_k=16))
    losses = {"blockwise": [s.curve for s in rep_b.layers], "distill": rep_d.curve,
              "kl": [rep_d.kl_before, rep_d.kl_after]}
    for k, zero in pruned.items():   # masks held: every pruned weight is still exactly zero
        assert not lm.model.state_dict()[k][zero].any(), k
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}, losses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_alone_is_a_no_op(monkeypatch):
    from birdbone_core.heal import distributed
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.init_distributed() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    rows = torch.arange(6)
    assert torch.equal(distributed.shard(rows), rows)
    got = distributed.shard_batches(torch.zeros(10, 3), 4)
    assert [(b.shape[0], w) for b, w in got] == [(4, 1.0), (4, 1.0), (2, 1.0)]


def test_two_gloo_processes_match_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "BIRDBONE_PROGRESS": "0",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    from safetensors.torch import load_file
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    l0, l1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for (a, full), (b, _) in zip(l0.pop("local_rows"), l1.pop("local_rows")):
        assert a + b == full and 0 < a < full, "trainable weights not sharded over the 2 ranks"
    assert l0 == l1
    assert l0["world"] == 2 and l0["ranks"] == [0, 1]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, losses = heal_fixture()
    finally:
        torch.set_num_threads(n)
    differ, worst = 0, 0.0
    for k, v in single.items():
        assert torch.allclose(r0[k], v, rtol=1e-4, atol=1e-5), k
        assert torch.equal(r0[k] == 0, v == 0), k                      # same zeros: masks held on both
        differ += int(not torch.equal(v, r0[k]))
        worst = max(worst, (r0[k].float() - v.float()).abs().max().item())
    # the global loss curves (summed over ranks) are the single process's, to float tolerance
    for a, b in zip(l0["losses"]["blockwise"], losses["blockwise"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert l0["losses"]["distill"] == pytest.approx(losses["distill"], rel=1e-4)
    assert l0["losses"]["kl"] == pytest.approx(losses["kl"], rel=1e-4)
    assert losses["kl"][1] < losses["kl"][0]                          # healing did something
    print(f"\n2 FSDP ranks vs 1 process: {differ} of {len(single)} tensors differ, max abs diff {worst:.3g}")


def test_the_heal_step_under_torchrun_writes_what_one_process_writes(tmp_path):
    """The pod's command: `torchrun --nproc_per_node 2 -m birdbone_core.cli wave RUN 1 heal`. Rank 0 holds
    the run's lock for both ranks and alone writes the heal overlay, equal to one process's."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from birdbone_core.loop.context import Context
    from birdbone_core.loop.driver import run_step
    from birdbone_core.run_init import init_run

    recipe = {"calibration": {"n_samples": 8, "seq_len": 64}, "evaluation": {"n_ctx": 128, "max_chunks": 2},
              "prune": {"method": "magnitude", "sparsity": 0.5}, "export": {"type": "f16"},
              "waves": {"max_per_wave": 0.5, "heal": {"method": "blockwise", "steps": 3, "batch_size": 4}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = init_run(tmp_path / "run", str(FIXTURE), str(tmp_path / "r.yaml"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = Context(run)
        for sid in ("prepare", "wave 1 prune"):
            run_step(ctx, sid)
        shutil.copytree(run.root, tmp_path / "alone")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "BIRDBONE_PROGRESS": "0",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "birdbone_core.cli",
               "wave", str(run.root), "1", "heal", "--device", "cpu"]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        from birdbone_core.run import Run

        run_step(Context(Run(tmp_path / "alone")), "wave 1 heal")
    finally:
        torch.set_num_threads(n)
    rec = json.loads((run.root / "waves" / "1" / "heal.json").read_text())
    assert rec["processes"] == 2
    two = load_file(str(run.root / "waves" / "1" / "heal.safetensors"))
    one = load_file(str(tmp_path / "alone" / "waves" / "1" / "heal.safetensors"))
    assert two.keys() == one.keys() and two
    for k in one:
        assert torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-5), k
        assert torch.equal(two[k] == 0, one[k] == 0), k


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from birdbone_core.heal import distributed

    torch.set_num_threads(1)
    assert distributed.init_distributed()
    weights, losses = heal_fixture()
    r = distributed.rank()
    # the engine really shards: a decoder layer's trainable weights as DTensors, 1/2 of the rows here
    from torch.distributed.tensor import DTensor

    from birdbone_core.heal.train import keep_masks, trainable_params
    from birdbone_core.model.layers import decoder_layers
    from birdbone_core.model.load import load_model
    layer = decoder_layers(load_model(str(FIXTURE)).model)[0]
    items = [(p, k) for _, p, k in trainable_params(layer, "weights", keep_masks(layer))]
    engine = distributed.Sharded(layer, items)
    assert all(isinstance(p, DTensor) for p, _ in engine.items)
    local = [[p.to_local().shape[0], p.shape[0]] for p, _ in engine.items]
    ranks = [None] * distributed.world_size()
    dist.all_gather_object(ranks, r)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps({"world": distributed.world_size(), "ranks": ranks,
                                                   "losses": losses,
                                                   "local_rows": local}))
    distributed.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
