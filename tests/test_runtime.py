"""The runtime setting (birdbone_core.runtime): `--device` / `--dtype` on the step commands, `runtime:` in the
recipe. Resolution and precedence, the recipe section, a device that is not there (one `error:` line, exit
2, nothing written), and on the CPU: `--device cpu` gives byte-identical outputs to no flag, and bf16
weights go through prune, ledger and revert exactly. The CUDA side is tests/gpu/ (skipped without CUDA)."""
import json

import pytest
import torch
import yaml
from clitools import assert_clean_failure, cli, tree
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.torch import load_file

from birdbone_core.cliargs import add_runtime_flags
from birdbone_core.errors import BirdboneError
from birdbone_core.recipe import Recipe, dump_recipe, parse_recipe
from birdbone_core.runtime import (
    DTYPES,
    Placement,
    Runtime,
    describe,
    from_flags,
    merge,
    place,
    resolve_device,
    resolve_dtype,
)

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)

TINY = {"name": "rt", "calibration": {"n_samples": 8, "seq_len": 64}, "evaluation": {"n_ctx": 64, "max_chunks": 4},
        "prune": {"method": "sparsegpt", "sparsity": 0.5}, "export": {"type": "f16"}}


def _recipe(tmp_path, name="r.yaml", **extra) -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump({**TINY, **extra}))
    return str(p)


# ---- resolution and precedence ---------------------------------------------------------------------

def test_precedence_flag_over_recipe_over_auto():
    recipe = Runtime(device="cuda:1", dtype="float16")
    assert merge(None, None) == Runtime()                                     # auto, auto
    assert merge(None, recipe) == recipe
    assert merge(from_flags("cpu", None), recipe) == Runtime(device="cpu", dtype="float16")
    assert merge(from_flags(None, "bfloat16"), recipe) == Runtime(device="cuda:1", dtype="bfloat16")
    assert merge(from_flags("auto", None), recipe).device == "auto"           # an explicit auto wins too
    assert from_flags(None, None) is None


def test_auto_device_follows_cuda_availability(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device() == CPU and resolve_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == CUDA and resolve_device("cuda") == CUDA
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(BirdboneError, match=r"cuda:2: out of range; this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    # under torchrun, `cuda` / auto is this rank's card (heal.distributed pins cuda:LOCAL_RANK)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == CUDA
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(BirdboneError, match="device cuda: out of range"):
        resolve_device("cuda")


def test_cuda_without_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(BirdboneError, match="no CUDA device here"):
            resolve_device(spec)
    with pytest.raises(BirdboneError, match="is not a device"):
        resolve_device("gpu")
    with pytest.raises(BirdboneError, match="no CUDA device here"):
        place(None, Runtime(device="cuda"))                                   # from the recipe alone, too


@pytest.mark.parametrize("spec,device,source,keep,want", [
    ("auto", CPU, None, False, torch.float32),
    ("auto", CPU, torch.bfloat16, False, torch.float32),    # cpu: float32, as birdbone always did
    ("auto", CPU, torch.bfloat16, True, torch.bfloat16),    # a run's own bf16 weights stay bf16 (ledger)
    ("auto", CUDA, None, False, torch.bfloat16),            # a GGUF / unknown source
    ("auto", CUDA, torch.float32, False, torch.bfloat16),
    ("auto", CUDA, torch.float16, False, torch.float16),    # the source's half type
    ("auto", CUDA, torch.float32, True, torch.float32),
    ("float32", CUDA, torch.bfloat16, True, torch.float32),  # explicit wins
    ("bfloat16", CPU, None, False, torch.bfloat16),
])
def test_dtype_resolution(spec, device, source, keep, want):
    assert resolve_dtype(spec, device, source, keep) == want
    assert Placement(device, spec).dtype_for(source, keep) == want


def test_runtime_section_validation():
    assert Runtime(device="cuda:3").device == "cuda:3"
    for bad in ({"device": "gpu"}, {"device": "cuda:x"}, {"dtype": "float64"}, {"devices": "cpu"}):
        with pytest.raises(ValueError):
            Runtime(**bad)
    m = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert describe(m) == {"device": "cpu", "dtype": "bfloat16"}


def test_cli_dtype_choices_are_the_runtime_ones():
    import argparse

    p = argparse.ArgumentParser()
    add_runtime_flags(p)
    assert tuple(next(a for a in p._actions if a.dest == "dtype").choices) == DTYPES


# ---- the recipe's runtime: section -------------------------------------------------------------------

def test_recipe_runtime_section():
    r = parse_recipe({"runtime": {"device": "cuda:1", "dtype": "bfloat16"}}, "r.yaml")
    assert r.runtime == Runtime(device="cuda:1", dtype="bfloat16")
    again = parse_recipe(yaml.safe_load(dump_recipe(r)))
    assert again == r and again.sha256() == r.sha256() != Recipe().sha256()
    with pytest.raises(BirdboneError, match=r"r.yaml: invalid recipe: runtime.devices: unknown field"):
        parse_recipe({"runtime": {"devices": "cpu"}}, "r.yaml")
    with pytest.raises(BirdboneError, match=r"runtime.device: Value error, 'gpu' is not a device"):
        parse_recipe({"runtime": {"device": "gpu"}}, "r.yaml")
    with pytest.raises(BirdboneError, match=r"runtime.dtype"):
        parse_recipe({"runtime": {"dtype": "float64"}}, "r.yaml")


def test_default_runtime_leaves_recipe_hash_and_yaml_alone():
    # recipes written before `runtime:` existed keep their hash: existing run directories stay valid
    plain = parse_recipe(dict(TINY))
    explicit = parse_recipe({**TINY, "runtime": {"device": "auto", "dtype": "auto"}})
    assert plain.sha256() == explicit.sha256()
    assert "runtime" not in plain.model_dump() and "runtime" not in dump_recipe(explicit)
    assert "runtime" in parse_recipe({**TINY, "runtime": {"device": "cpu"}}).model_dump()


# ---- a device that is not there: one line, exit 2, nothing written ------------------------------------

@pytest.fixture(scope="module")
def initialised(tmp_path_factory, tiny_path):
    tmp = tmp_path_factory.mktemp("rt-init")
    run = tmp / "run"
    assert cli("init", run, "--model", tiny_path, "-r", _recipe(tmp)).returncode == 0
    return run


@NO_CUDA
@pytest.mark.parametrize("argv", [
    ("prepare", "{run}"), ("wave", "{run}", "1", "prune"), ("baseline", "{run}"), ("prune", "{run}"),
    ("export", "{run}"), ("evaluate", "{run}"), ("finish", "{run}"), ("rollback", "{run}"), ("run", "{run}"),
    ("resume", "{run}"), ("quantize", "{run}", "--bpw", "6", "-o", "{tmp}/q.gguf"),
    ("eval", "{model}"), ("tasks", "{model}", "--tasks", "pydocs_cloze", "--limit", "2"),
    ("imatrix", "{model}", "-o", "{tmp}/im.gguf"),
])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_flag_without_cuda_refused_before_any_work(initialised, tiny_path, tmp_path, argv, device):
    before = tree(initialised)
    args = [a.format(run=initialised, model=tiny_path, tmp=tmp_path) for a in argv]
    r = cli(*args, "--device", device)
    assert_clean_failure(r, f"device {device}: no CUDA device here")
    assert tree(initialised) == before and not list(tmp_path.iterdir())


@NO_CUDA
def test_compress_refuses_before_creating_the_run(tmp_path, tiny_path):
    r = cli("compress", tiny_path, "-r", _recipe(tmp_path), "-o", tmp_path / "a", "--device", "cuda")
    assert_clean_failure(r, "no CUDA device here")
    # the recipe asking for cuda: refused as well, before the run directory exists
    r = cli("compress", tiny_path, "-r", _recipe(tmp_path, "c.yaml", runtime={"device": "cuda"}), "-o", tmp_path / "b")
    assert_clean_failure(r, "device cuda: no CUDA device here")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_misspelt_device_is_a_usage_error(initialised):
    r = cli("prepare", initialised, "--device", "gpu")
    assert_clean_failure(r, "argument --device", "'gpu' is not a device")
    r = cli("wave", initialised, "1", "prune", "--dtype", "float64")
    assert_clean_failure(r, "argument --dtype")


# ---- on the CPU nothing changes ---------------------------------------------------------------------

def _outputs(run) -> dict:
    """Every output file's content, but the records that hold times (run.json, prune_report.json, the
    ledger's entry/index JSON with its timestamps). Safetensors files as (metadata, raw tensor bytes): the
    order of their JSON header is not stable from one write to the next, the tensors are what must match.
    GGUF files as (metadata but birdbone.source, the path of the run they came from; tensor bytes)."""
    out = {}
    for k, v in tree(run).items():
        if k.endswith(".json"):
            continue
        if k.endswith(".gguf"):
            r = GGUFReader(run / k)
            v = ({n: f.contents() for n, f in r.fields.items() if n != "birdbone.source"},
                 {t.name: t.data.tobytes() for t in r.tensors})
        if k.endswith(".safetensors"):
            with safe_open(str(run / k), "pt") as f:
                v = (f.metadata(), {n: f.get_tensor(n).contiguous().view(torch.uint8).numpy().tobytes()
                                    for n in f.keys()})
        out[k] = v
    return out


def test_device_cpu_is_byte_identical_to_no_flag(tmp_path, tiny_path):
    recipe = _recipe(tmp_path)
    a, b = tmp_path / "plain", tmp_path / "cpu"
    assert cli("compress", tiny_path, "-r", recipe, "-o", a).returncode == 0
    r = cli("compress", tiny_path, "-r", recipe, "-o", b, "--device", "cpu", "--dtype", "auto")
    assert r.returncode == 0, r.stderr
    oa, ob = _outputs(a), _outputs(b)
    assert "pruned/model.safetensors" in oa and "model-f16.gguf" in oa and "baseline/reference.safetensors" in oa
    assert oa.keys() == ob.keys() and all(oa[k] == ob[k] for k in oa), [k for k in oa if oa[k] != ob[k]]
    ma, mb = (json.loads((x / "metrics.json").read_text()) for x in (a, b))
    assert ma["compressed"] == {**mb["compressed"], "path": ma["compressed"]["path"]}
    steps = json.loads((b / "run.json").read_text())["steps"]
    for step in ("baseline", "prune", "export", "evaluate"):      # where each step ran, in its record
        assert steps[step]["runtime"] == {"device": "cpu", "dtype": "float32"}, step


def test_loop_device_cpu_is_byte_identical_to_no_flag(tmp_path, tiny_path):
    recipe = _recipe(tmp_path, prune={"method": "wanda", "sparsity": 0.4},
                     waves={"max_per_wave": 0.2, "heal": {"method": "blockwise", "steps": 2, "batch_size": 4},
                            "stop_loss": {"threshold": 10.0, "patience": 1}})
    a, b = tmp_path / "plain", tmp_path / "cpu"
    for run, flags in ((a, []), (b, ["--device", "cpu"])):
        assert cli("init", run, "--model", tiny_path, "-r", recipe).returncode == 0
        assert cli("prepare", run, *flags).returncode == 0
        assert cli("wave", run, "1", "prune", *flags).returncode == 0
        r = cli("run", run, *flags)
        assert r.returncode == 0, r.stderr
    oa, ob = _outputs(a), _outputs(b)
    assert "pruned/model.safetensors" in oa and any(k.startswith("ledger/") for k in oa)
    assert oa.keys() == ob.keys() and all(oa[k] == ob[k] for k in oa), [k for k in oa if oa[k] != ob[k]]
    for rec in ("prepare/prepare.json", "waves/1/prune.json", "waves/2/heal.json", "waves/2/evaluate.json"):
        assert json.loads((b / rec).read_text())["runtime"] == {"device": "cpu", "dtype": "float32"}, rec


def test_loop_refuses_another_dtype_than_the_runs_weights(tmp_path, tiny_path):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, prune={"method": "magnitude", "sparsity": 0.4},
                     waves={"max_per_wave": 0.2, "heal": {"method": "none"}})
    assert cli("init", run, "--model", tiny_path, "-r", recipe).returncode == 0
    assert cli("prepare", run).returncode == 0
    before = tree(run)
    r = cli("wave", run, "1", "prune", "--dtype", "bfloat16")
    assert_clean_failure(r, "the run's weights are float32", "dtype bfloat16 would not match the ledger")
    assert tree(run) == before
    assert cli("wave", run, "1", "prune", "--dtype", "float32").returncode == 0     # the same dtype: fine


def test_loop_keeps_the_dtype_prepare_wrote(tmp_path, tiny_path):
    # prepare in bf16 (what a CUDA prepare writes); the later steps, with no flag, keep the run's bf16 weights
    run = tmp_path / "run"
    recipe = _recipe(tmp_path, prune={"method": "wanda", "sparsity": 0.4},
                     waves={"max_per_wave": 0.2, "heal": {"method": "blockwise", "steps": 2, "batch_size": 4},
                            "stop_loss": {"threshold": 10.0, "patience": 1}})
    assert cli("init", run, "--model", tiny_path, "-r", recipe).returncode == 0
    assert cli("prepare", run, "--dtype", "bfloat16").returncode == 0
    r = cli("run", run)
    assert r.returncode == 0, r.stderr
    bf16 = {"device": "cpu", "dtype": "bfloat16"}
    for rec in ("prepare/prepare.json", "waves/1/prune.json", "waves/2/heal.json", "waves/2/evaluate.json"):
        assert json.loads((run / rec).read_text())["runtime"] == bf16, rec
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps["finish"]["runtime"] == steps["export"]["runtime"] == steps["evaluate"]["runtime"] == bf16
    assert load_file(str(run / "pruned" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    assert cli("verify", run).returncode == 0


def test_bf16_weights_on_cpu_through_prune_ledger_and_revert(tmp_path, tiny_path):
    # the half-precision path CUDA takes by default, run on the CPU: bf16 weights, float32 kernels
    run = tmp_path / "bf16"
    r = cli("compress", tiny_path, "-r", _recipe(tmp_path), "-o", run, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    steps = json.loads((run / "run.json").read_text())["steps"]
    assert steps["prune"]["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    pruned = load_file(str(run / "pruned" / "model.safetensors"))
    q = pruned["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and abs((q == 0).float().mean().item() - 0.5) < 0.01
    # revert rebuilds in the dtype the ledger recorded: the exact pruned tensors, bf16
    assert cli("revert", run, "--to", "1", "-o", tmp_path / "rev").returncode == 0
    rev = load_file(str(tmp_path / "rev" / "model.safetensors"))
    assert rev.keys() == pruned.keys() and all(torch.equal(rev[k], pruned[k]) for k in rev)
    # export / evaluate of the run's own weights keep bf16 on a later, separate call
    assert cli("eval", run, "--json", "--n-ctx", "64", "--max-chunks", "2").returncode == 0
