"""The wave operator's two faces: the pod the Kubernetes operator would create (rendered without a
cluster) and the local subprocess carry the same command line; the deployment settings reach the pod
(GPU limit, H100 node selector, tolerations, image, volumes) and no secret value is inlined."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from airflow_testlib import needs_cli

SECRET_VALUE = "s3cr3t-value-never-in-a-pod-spec"
K8S = {"image": "registry.example/birdbone-core:0.1.0-cuda", "gpus": 2, "namespace": "ml",
       "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
       "s3_secret": "birdbone-s3", "model_cache_pvc": "model-cache"}


@pytest.fixture
def k8s_settings(monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_K8S", json.dumps(K8S))
    # a credential present in the scheduler's environment must not leak into the pod either
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)


def _ctx(dag, params: dict, run_id: str = "manual__2026-11-30T01:00:00+00:00") -> dict:
    p = {k: v.value if hasattr(v, "value") else v for k, v in dag.params.items()}
    p.update(params)
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id="x", run_id=run_id, try_number=1, map_index=-1)
    return {"ti": ti, "run_id": run_id, "dag": dag, "params": p, "task_instance": ti}


def _render(dag, task_id: str, params: dict):
    from kubernetes.client import ApiClient

    op = dag.get_task(task_id)
    op = op.prepare_for_execution() if hasattr(op, "prepare_for_execution") else op
    ctx = {**_ctx(dag, params), "ti": SimpleNamespace(dag_id=dag.dag_id, task_id=task_id, run_id="r1",
                                                     try_number=1, map_index=-1)}
    op.render_template_fields(ctx)
    pod = op.build_pod_request_obj(ctx, dry_run=True)
    return op, ApiClient().sanitize_for_serialization(pod)


def test_dagbag_imports_cleanly(dagbag):
    assert dagbag.import_errors == {}
    assert {"birdbone_compress", "birdbone_nightly"} <= set(dagbag.dag_ids)


@pytest.mark.parametrize("task_id,gpu", [("wave_01.heal", True), ("wave_03.prune", True), ("init", False),
                                         ("wave_02.decide", False), ("rollback", False)])
def test_pod_spec_matches_local_command(dagbag, k8s_settings, runs_root, task_id, gpu):
    from operators.birdbone_step import PROGRAM

    dag = dagbag.dags["birdbone_compress"]
    params = {"model": "/models/m1", "recipe": "/recipes/r.yaml", "run_id": "exp1"}
    op, manifest = _render(dag, task_id, params)
    c = manifest["spec"]["containers"][0]
    local = op.local_argv()
    # the same argv; only the program differs by deployment (image entrypoint vs Variable birdbone_cli)
    assert c["command"] + c["args"] == [PROGRAM, *local[1:]]
    assert os.path.basename(local[0]) == PROGRAM
    run = str(runs_root / "exp1")
    assert run in c["args"]
    if task_id == "init":
        assert c["args"] == ["init", run, "--model=/models/m1", "--recipe=/recipes/r.yaml"]
    if task_id.startswith("wave_"):
        k, step = int(task_id[5:7]), task_id.split(".")[1]
        assert c["args"] == ["wave", run, str(k), step]
    assert c["image"] == K8S["image"]
    assert manifest["metadata"]["namespace"] == "ml"
    limits = c["resources"]["limits"]
    spec = manifest["spec"]
    if gpu:
        assert limits["nvidia.com/gpu"] == "2"
        assert spec["nodeSelector"] == K8S["node_selector"]
        assert spec["tolerations"] == K8S["tolerations"]
    else:
        assert "nvidia.com/gpu" not in limits and not spec.get("nodeSelector")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["runs"] == str(runs_root)       # the run directory has the same path in the pod
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"]}
    assert claims["model-cache"] == "model-cache"
    env = {e["name"]: e for e in c["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "birdbone-s3", "key": key}
    assert SECRET_VALUE not in json.dumps(manifest)
    assert c["envFrom"] == [{"configMapRef": {"name": "birdbone-ops"}}]    # k8s/ops-config.yaml
    assert spec["restartPolicy"] == "Never"


def test_empty_optional_flags_are_left_out(dagbag, k8s_settings, runs_root):
    dag = dagbag.dags["birdbone_compress"]
    op, manifest = _render(dag, "init", {"model": "", "recipe": "", "run_id": ""})
    args = manifest["spec"]["containers"][0]["args"]
    assert args[0] == "init" and len(args) == 2          # birdbone's default model and recipe apply
    assert args[1] == str(runs_root / "manual__2026-11-30T01_00_00_00_00")   # no run_id: the Airflow run id
    assert op.local_argv()[1:] == args


def test_rendered_pod_validates_against_kubernetes_schema(dagbag, k8s_settings, tmp_path):
    """kubernetes-validate (offline JSON schemas) accepts the rendered manifest."""
    import yaml

    dag = dagbag.dags["birdbone_compress"]
    _, manifest = _render(dag, "wave_01.prune", {"run_id": "exp1"})
    f = tmp_path / "pod.yaml"
    f.write_text(yaml.safe_dump(manifest))
    exe = os.path.join(os.path.dirname(os.sys.executable), "kubernetes-validate")
    r = subprocess.run([exe, "-k", "1.31", "--strict", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unknown_k8s_setting_is_refused(monkeypatch):
    from operators import settings

    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_K8S", json.dumps({"gpu_count": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        settings.k8s()


@needs_cli
def test_local_mode_runs_the_cli_and_maps_its_exit_status(tmp_path):
    """A user error (exit 2: here a step whose run directory has no earlier steps) fails without retry;
    a crash (any other status) fails so that Airflow retries."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from operators import BirdboneStepOperator

    op = BirdboneStepOperator(task_id="t", args=["wave", str(tmp_path / "missing"), "1", "prune"])
    with pytest.raises(AirflowFailException, match="not a birdbone run directory|run.json"):
        op.execute({})
    crash = BirdboneStepOperator(task_id="c", args=["-c", "import sys; print('boom'); sys.exit(3)"])
    crash.local_argv = lambda: [sys.executable, *crash.arguments]      # a process that dies with status 3
    with pytest.raises(AirflowException, match="status 3: boom") as e:
        crash.execute({})
    assert not isinstance(e.value, AirflowFailException)
