"""birdbone_nightly against a real S3 API (moto's server on 127.0.0.1, reached through an Airflow `aws`
connection with extra endpoint_url) and real Airflow (dag.test(), one call = one scheduler tick):
a checkpoint counts only with its _COMPLETE marker, is triggered exactly once whatever its name, a failed
compress run is retried up to max_attempts and then alerted exactly once, and every run publishes.
birdbone_compress never runs here: its runs' outcomes are set in the metadata DB."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
from s3server import moto_s3

CONN_ID = "birdbone_nightly_s3"
BUCKET = "nightly-ckpts"
PREFIX = "models/gemma"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 over real HTTP (tests/s3server.py, as the package tests use it)."""
    with moto_s3() as url:
        yield url


@pytest.fixture
def nightly(s3_endpoint, dagbag, airflow_db, monkeypatch, tmp_path):
    """The nightly DAG wired to moto through Variables and a connection; a fast sensor; alerts recorded."""
    import boto3

    from operators import signals

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}))
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text("name: nightly\n")
    for k, v in {"BIRDBONE_AWS_CONN_ID": CONN_ID, "BIRDBONE_NIGHTLY_BUCKET": BUCKET,
                 "BIRDBONE_NIGHTLY_PREFIX": PREFIX, "BIRDBONE_NIGHTLY_RECIPE": str(recipe),
                 "BIRDBONE_NIGHTLY_MAX_ATTEMPTS": "2"}.items():
        monkeypatch.setenv(f"AIRFLOW_VAR_{k}", v)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)

    dag = dagbag.dags["birdbone_nightly"]
    sensor = dag.get_task("wait_for_checkpoint")
    monkeypatch.setattr(sensor, "timeout", 0.5)          # nothing to do: skipped after ~1 s, not 6 h
    monkeypatch.setattr(sensor, "poke_interval", 0.2)
    alerts = []
    monkeypatch.setattr(signals, "alert", lambda context, reason, **labels: alerts.append((reason, labels)) or True)

    n = SimpleNamespace(dag=dag, s3=s3, alerts=alerts, recipe=str(recipe))

    def put(name: str, files: dict[str, bytes], marker: bool = True):
        for rel, data in files.items():
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/{rel}", Body=data)
        if marker:
            s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/_COMPLETE", Body=b"")

    def tick() -> dict:
        """One nightly run; returns its task states."""
        dr = n.dag.test()
        assert str(getattr(dr.state, "value", dr.state)) == "success"
        return {ti.task_id: str(getattr(ti.state, "value", ti.state)) for ti in dr.get_task_instances()}

    n.put, n.tick = put, tick
    return n


def _compress_runs(key: str) -> dict[str, tuple[str, dict]]:
    """birdbone_compress runs of one checkpoint key: run id -> (state, conf)."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as s:
        return {r.run_id: (str(getattr(r.state, "value", r.state)), r.conf)
                for r in s.query(DagRun).filter(DagRun.dag_id == "birdbone_compress",
                                                DagRun.run_id.like(f"nightly__ckpt-{key[:16]}%"))}


def _set_state(run_id: str, state: str) -> None:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as s:
        s.query(DagRun).filter(DagRun.dag_id == "birdbone_compress", DagRun.run_id == run_id).one().set_state(state)


def _key(n, name: str) -> str:
    """The checkpoint's content key, as the DAG computes it (sha256 over relative key, size, ETag)."""
    mod = sys.modules[n.dag.get_task("plan_runs").python_callable.__module__]
    listing = n.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{name}/")["Contents"]
    return mod.content_hash([o for o in listing if not o["Key"].endswith("/_COMPLETE")], f"{PREFIX}/{name}/")


def test_marker_gates_and_each_content_is_compressed_once(nightly):
    files = {"config.json": b"{}", "model.safetensors": b"\1" * 64 + b"once"}
    nightly.put("step-1000", files, marker=False)           # still being copied
    states = nightly.tick()
    assert states["wait_for_checkpoint"] == "skipped" and states["plan_runs"] == "skipped"
    key = _key(nightly, "step-1000")
    assert _compress_runs(key) == {}

    nightly.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/step-1000/_COMPLETE", Body=b"")   # upload done
    nightly.tick()
    runs = _compress_runs(key)
    name = f"ckpt-{key[:16]}"
    assert runs == {f"nightly__{name}": ("queued", {
        "model": f"s3://{BUCKET}/{PREFIX}/step-1000/", "recipe": nightly.recipe, "run_id": name, "publish": True})}

    nightly.put("renamed-step-1000", files)                 # the same bytes under another name
    assert nightly.tick()["wait_for_checkpoint"] == "skipped"    # queued: not triggered again
    _set_state(f"nightly__{name}", "success")
    assert nightly.tick()["wait_for_checkpoint"] == "skipped"    # done: never again, whatever its name
    assert list(_compress_runs(key)) == [f"nightly__{name}"]

    nightly.put("renamed-step-1000", {"model.safetensors": b"\2" * 64})   # changed bytes: a new checkpoint
    nightly.tick()
    new = _key(nightly, "renamed-step-1000")
    assert new != key and list(_compress_runs(new)) == [f"nightly__ckpt-{new[:16]}"]
    assert _compress_runs(new)[f"nightly__ckpt-{new[:16]}"][1]["model"].endswith("/renamed-step-1000/")
    assert nightly.alerts == []


def test_failed_run_is_retried_then_alerted_once(nightly):
    nightly.put("step-2000", {"config.json": b"{}", "model.safetensors": b"\3" * 64 + b"fails"})
    key = _key(nightly, "step-2000")
    first, second = f"nightly__ckpt-{key[:16]}", f"nightly__ckpt-{key[:16]}-a2"

    nightly.tick()
    assert list(_compress_runs(key)) == [first]
    _set_state(first, "running")
    assert nightly.tick()["wait_for_checkpoint"] == "skipped"     # running: not triggered again
    _set_state(first, "failed")
    nightly.tick()                                                 # retried: attempt 2, once
    runs = _compress_runs(key)
    assert sorted(runs) == [first, second] and runs[second][0] == "queued"
    assert runs[second][1]["run_id"] == second.removeprefix("nightly__") and runs[second][1]["publish"] is True
    _set_state(second, "failed")                                   # max_attempts (2) spent

    states = nightly.tick()
    assert states["alert_exhausted"] == "success" and states["trigger_compress"] == "skipped"
    assert len(nightly.alerts) == 1
    reason, labels = nightly.alerts[0]
    assert labels["alert"] == "nightly_checkpoint_failed" and labels["key"] == key[:16]
    assert labels["checkpoint"] == f"s3://{BUCKET}/{PREFIX}/step-2000/" and "2 birdbone_compress" in reason
    assert nightly.tick()["wait_for_checkpoint"] == "skipped"     # alerted once, never again
    assert len(nightly.alerts) == 1 and sorted(_compress_runs(key)) == [first, second]
