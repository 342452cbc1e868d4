"""Data-parallel healing: 2 processes on gloo end bit-identical and match one process on the same
global minibatches. This file is also the torchrun worker (run as a script)."""
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
    rep_b = heal(lm.model, dense, blocks, Heal(method="blockwise", steps=4, lr=1e-3, batch_size=4))
    rep_d = heal(lm.model, dense, blocks, Heal(method="distill", steps=3, lr=1e-4, batch_size=4, top_k=16))
    losses = {"blockwise": [s.curve for s in rep_b.layers], "distill": rep_d.curve,
              "kl": [rep_d.kl_before, rep_d.kl_after]}
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
    l0 = json.loads((tmp_path / "rank0.json").read_text())
    assert l0 == json.loads((tmp_path / "rank1.json").read_text())
    assert l0["world"] == 2 and l0["ranks"] == [0, 1]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, losses = heal_fixture()
    finally:
        torch.set_num_threads(n)
    moved = 0
    for k, v in single.items():
        assert torch.allclose(r0[k], v, rtol=1e-4, atol=1e-6), k
        assert torch.equal(r0[k] == 0, v == 0), k                      # same zeros: masks held on both
        moved += int(not torch.equal(v, r0[k]))
    # the global loss curves (summed over ranks) are the single process's, to float tolerance
    for a, b in zip(l0["losses"]["blockwise"], losses["blockwise"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert l0["losses"]["distill"] == pytest.approx(losses["distill"], rel=1e-4)
    assert l0["losses"]["kl"] == pytest.approx(losses["kl"], rel=1e-4)
    assert losses["kl"][1] < losses["kl"][0]                          # healing did something
    print(f"\n2 ranks vs 1: {moved} of {len(single)} tensors differ by float rounding only")


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from birdbone_core.heal import distributed

    torch.set_num_threads(1)
    assert distributed.init_distributed()
    weights, losses = heal_fixture()
    r = distributed.rank()
    ranks = [None] * distributed.world_size()
    dist.all_gather_object(ranks, r)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps({"world": distributed.world_size(), "ranks": ranks,
                                                   "losses": losses}))
    distributed.shutdown()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
