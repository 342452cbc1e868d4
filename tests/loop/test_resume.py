"""`birdbone run` killed with SIGKILL in the middle of a wave, then `birdbone resume`: the run ends with
exactly the tensors (and ledger) of an uninterrupted run with the same thread count."""
import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from birdbone_core.cli import main
from birdbone_core.loop.driver import run_all, status
from birdbone_core.run import Run
from birdbone_core.run_init import init_run

ENV = {**os.environ, "BIRDBONE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "birdbone_core.cli", *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_wave_then_resume_equals_uninterrupted(tmp_path, tiny_path, make_recipe, capsys):
    recipe = make_recipe({"method": "sparsegpt", "sparsity": 0.5},
                         {"max_per_wave": 0.25, "heal": {"method": "blockwise", "steps": 6, "lr": 1.0e-3},
                          "stop_loss": {"threshold": 1.0, "patience": 2}})
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(recipe))

    # the uninterrupted reference, in this process on one thread like the CLI runs below
    ref = init_run(tmp_path / "ref", str(tiny_path), str(rp))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_all(ref, until=("export", "evaluate"))
    finally:
        torch.set_num_threads(threads)

    killed = init_run(tmp_path / "killed", str(tiny_path), str(rp))
    p = _cli("run", killed.root)
    marker = killed.root / "waves" / "2" / "prune.json"
    deadline = time.monotonic() + 300
    while not marker.exists():           # wave 2 is pruned: its healing is now running
        assert p.poll() is None, p.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    s = status(Run(killed.root))
    assert not s["finished"] and "wave 2 decide" not in s["done"] and "wave 2 prune" in s["done"]

    r = _cli("resume", killed.root)
    out, err = r.communicate(timeout=600)
    assert r.returncode == 0, err[-2000:]
    assert status(Run(killed.root))["finished"]

    ia, ib = (json.loads((run.root / "ledger" / "index.json").read_text()) for run in (ref, killed))
    assert ia["base"] == ib["base"] and [w["digest"] for w in ia["waves"]] == [w["digest"] for w in ib["waves"]]
    wa = load_file(str(ref.pruned_dir / "model.safetensors"))
    wb = load_file(str(killed.pruned_dir / "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[n].view(torch.uint8), wb[n].view(torch.uint8)) for n in wa)
    assert (killed.root / "model-f16.gguf").is_file() and (killed.root / "metrics.json").is_file()

    # the step commands on the finished run: a completed step is a no-op, a wave that never ran is refused
    assert main(["wave", str(killed.root), "2", "heal"]) == 0
    assert "wave 2 heal: already done" in capsys.readouterr().out
    assert main(["status", str(killed.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {**status(Run(killed.root)), "finished": True, "next": None}
    assert main(["wave", str(killed.root), "3", "prune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no wave 3" in err and len(err.strip().splitlines()) == 1
