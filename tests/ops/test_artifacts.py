"""A run's artifacts through S3-backed DVC: `birdbone publish` pushes to a real S3 API server (moto, over
HTTP), `birdbone pull` restores them in a fresh directory, and `revert` to every wave there reproduces the
ledger's recorded tensor hashes. Credentials only ever live in the environment."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from birdbone_core.cli import main as birdbone
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger, tensor_hash
from birdbone_core.ops import artifacts

pytest.importorskip("dvc")
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")   # inside dvc 3.67
boto3 = pytest.importorskip("boto3")

BUCKET = "birdbone-artifacts"
SECRET = "S3cr3t-birdbone-test-8f2c1d"          # grep target: must never be written anywhere
KEY_ID = "AKIABIRDBONETEST0001"
@pytest.fixture(scope="module")
def creds(s3_server):
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    yield env
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def wave_run(tiny_wave_run):
    assert Ledger(tiny_wave_run).last_wave >= 2
    return tiny_wave_run


def _cli(*args, env) -> subprocess.CompletedProcess:
    """The real `birdbone` entry point in a subprocess, credentials only in its environment."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    e.update(env, OMP_NUM_THREADS="1", BIRDBONE_PROGRESS="0")
    code = "import sys; from birdbone_core.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=e, capture_output=True, text=True, timeout=120)


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and not any(
                part.startswith(".") or part.endswith(".dvc") for part in p.relative_to(path).parts)}


def _objects(s3_server) -> dict[str, str]:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _no_secret_under(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file() and p.stat().st_size < 50_000_000:
            assert SECRET.encode() not in p.read_bytes(), p


def test_publish_pull_and_revert_every_wave(wave_run, s3_server, creds, tmp_path):
    remote = ["--remote", f"s3://{BUCKET}/birdbone", "--endpoint-url", s3_server]
    before = _digest(wave_run)
    assert {"run.json", "metrics.json", "model-f16.gguf", "ledger/index.json"} <= set(before)

    first = _cli("publish", str(wave_run), *remote, "--json", env=creds)
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert r1["run_id"] == "tiny-waves" and r1["pushed"] > 0 and r1["index_uploaded"]
    assert {"ledger", "pruned", "model-f16.gguf", "metrics.json", "run.json"} <= set(r1["tracked"])
    objects = _objects(s3_server)
    assert "birdbone/runs/tiny-waves/index.json" in objects
    assert sum(k.startswith("birdbone/files/md5/") for k in objects) == r1["pushed"]
    assert _digest(wave_run) == before                      # publishing changes no artifact

    # idempotent: nothing new -> nothing pushed, the remote is byte-for-byte the same
    second = _cli("publish", str(wave_run), *remote, env=creds)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("already done"), second.stdout
    assert _objects(s3_server) == objects

    # a new artifact is pushed on the next publish, and only it
    (wave_run / "notes.txt").write_text("published twice\n")
    third = artifacts.publish(wave_run, f"s3://{BUCKET}/birdbone", s3_server)
    assert third.pushed == 1 and third.index_uploaded and "notes.txt" in third.tracked
    (wave_run / "notes.txt").unlink()
    fourth = artifacts.publish(wave_run, f"s3://{BUCKET}/birdbone", s3_server)
    assert fourth.pushed == 0 and "notes.txt" not in fourth.tracked and fourth.index_uploaded

    # pull on "another machine": a fresh directory, nothing but the bucket (the original base model gone)
    pulled = tmp_path / "elsewhere" / "tiny-waves"
    model_path = Path(json.loads((wave_run / "run.json").read_text())["model"]["path"])
    hidden = tmp_path / "hidden-model"
    assert model_path.parent.name == "models"        # the fixture's private copy, never tests/fixtures
    shutil.move(model_path, hidden)
    try:
        got = _cli("pull", "tiny-waves", "-o", str(pulled), *remote, env=creds)
    finally:
        shutil.move(hidden, model_path)
    assert got.returncode == 0, got.stderr
    after = _digest(pulled)
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}
    manifest = json.loads((pulled / "run.json").read_text())
    assert manifest["model"]["path"] == str((pulled / "base").resolve())    # the run's own base copy
    assert manifest["model"]["published_path"] == str(model_path)
    again = _cli("pull", "tiny-waves", "-o", str(pulled), *remote, "--json", env=creds)   # idempotent
    assert again.returncode == 0 and json.loads(again.stdout)["fetched"] == 0, again.stderr

    # credentials: never in a log line, a DVC config/pointer file, or anything in the bucket
    for proc in (first, second, got):
        assert SECRET not in proc.stdout + proc.stderr and KEY_ID not in proc.stdout + proc.stderr
    for root in (wave_run, pulled):
        _no_secret_under(root / ".dvc")
        for f in root.glob("?*.dvc"):
            assert f.is_dir() or SECRET not in f.read_text()
        assert KEY_ID not in (root / ".dvc" / "config").read_text()
    index = boto3.client("s3", endpoint_url=s3_server).get_object(
        Bucket=BUCKET, Key="birdbone/runs/tiny-waves/index.json")["Body"].read()
    assert SECRET.encode() not in index and KEY_ID.encode() not in index

    # the pulled ledger replays: every wave's exact weights, checked against the recorded hashes
    ledger = Ledger(pulled)
    assert ledger.last_wave == Ledger(wave_run).last_wave >= 2
    recorded: dict[str, str] = {}       # each tensor's hash as of wave w: its latest record up to w
    for w in range(ledger.last_wave + 1):
        recorded.update({n: r.hash for n, r in ledger.entry(w).tensors.items()})
        out = tmp_path / f"revert-{w}"
        assert birdbone(["revert", str(pulled), "--to", str(w), "-o", str(out)]) == 0
        state = load_file(str(out / "model.safetensors"))
        assert set(state) <= set(recorded) and len(state) >= len(recorded) - 1   # tied lm_head may be omitted
        assert all(tensor_hash(t) == recorded[n] for n, t in state.items()), f"wave {w}"
    final = load_file(str(pulled / "pruned" / "model.safetensors"))
    assert all(torch_equal(final[n], state[n]) for n in final)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_pull_refuses_unknown_runs_and_foreign_dirs(s3_server, creds, tmp_path):
    remote = ["--remote", f"s3://{BUCKET}/birdbone", "--endpoint-url", s3_server]
    r = _cli("pull", "no-such-run", "-o", str(tmp_path / "x"), *remote, env=creds)
    assert r.returncode == 2 and "no published run 'no-such-run'" in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("mine")
    with pytest.raises(BirdboneError, match="not a pulled run"):
        artifacts.pull("no-such-run", busy, f"s3://{BUCKET}/birdbone", s3_server)
    (busy / "run.json").write_text(json.dumps({"model": {"path": "/nowhere"}}))
    with pytest.raises(BirdboneError, match="no such base model"):
        artifacts.relocate_model(busy, str(tmp_path / "missing-model"))


def test_remote_settings_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(artifacts.ENV_REMOTE, raising=False)
    with pytest.raises(BirdboneError, match="no artifact remote"):
        artifacts.resolve_remote(None, None)
    with pytest.raises(BirdboneError, match="must not carry credentials"):
        artifacts.resolve_remote(f"s3://{KEY_ID}:{SECRET}@{BUCKET}/p", None)
    with pytest.raises(BirdboneError, match="unsupported artifact remote"):
        artifacts.resolve_remote("gs://bucket/p", None)
    monkeypatch.setenv(artifacts.ENV_REMOTE, f"s3://{BUCKET}/p/")
    monkeypatch.setenv(artifacts.ENV_ENDPOINT, "http://127.0.0.1:9000")
    assert artifacts.resolve_remote(None, None) == artifacts.Remote(f"s3://{BUCKET}/p", "http://127.0.0.1:9000")
    assert birdbone(["publish", str(tmp_path), "--remote", f"s3://{BUCKET}/p"]) == 2     # not a run directory


def test_pull_refuses_an_index_pointing_outside_its_own_names(tmp_path):
    remote = artifacts.resolve_remote(str(tmp_path / "remote"), None)      # a local-path remote
    evil = "outs:\n- md5: 0123456789abcdef0123456789abcdef\n  size: 1\n  hash: md5\n  path: ../../escape.txt\n"
    artifacts.write_index(remote, "evil", {"format": artifacts.INDEX_FORMAT, "run_id": "evil",
                                           "dvc_files": {"run.json.dvc": evil}})
    with pytest.raises(BirdboneError, match="does not point at 'run.json'"):
        artifacts.pull("evil", tmp_path / "out", remote.url)
    assert not (tmp_path / "escape.txt").exists()
