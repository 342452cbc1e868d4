"""The wave operator's two faces: the pod the Kubernetes operator would create (rendered without a
cluster) and the local subprocess carry the same command line; the deployment settings reach the pod
(GPU limit, H100 node selector, tolerations, images per step kind, volumes, torchrun for the N-GPU heal),
no secret value is inlined, every rendered pod validates against the Kubernetes schema, and exit status 2
fails without retry in a pod as it does locally."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from airflow_testlib import needs_cli

SECRET_VALUE = "s3cr3t-value-never-in-a-pod-spec"
K8S = {"image": "registry.example/birdbone-core:0.1.0-cuda", "cpu_image": "registry.example/birdbone-core:0.1.0-cpu",
       "gpus": 2, "namespace": "ml",
       "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
       "s3_secret": "birdbone-s3", "model_cache_pvc": "model-cache"}


@pytest.fixture
def k8s_settings(monkeypatch):
    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_K8S", json.dumps(K8S))
    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_EXECUTOR", "kubernetes")
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
        assert c["args"] == ["wave", run, str(k), step] + (["--device=cuda"] if gpu else [])
    assert c["image"] == (K8S["image"] if gpu else K8S["cpu_image"])
    assert manifest["metadata"]["namespace"] == "ml"
    limits = c["resources"]["limits"]
    assert c["resources"]["requests"] == limits
    spec = manifest["spec"]
    env_plain = {e["name"]: e.get("value") for e in c["env"]}
    if gpu:
        gpus = "1" if task_id.endswith(".heal") else "2"      # the heal pod has heal_gpus (default 1)
        assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": gpus}
        assert spec["nodeSelector"] == K8S["node_selector"]
        assert spec["tolerations"] == K8S["tolerations"]
        assert env_plain["OMP_NUM_THREADS"] == "8"
    else:
        assert limits == {"cpu": "2", "memory": "8Gi"} and not spec.get("nodeSelector")
        assert env_plain["OMP_NUM_THREADS"] == "2"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert spec["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                       "fsGroup": 10001}       # the images' user can write the volumes
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert ("dshm" in {v["name"] for v in spec["volumes"]}) == gpu
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["runs"] == str(runs_root)       # the run directory has the same path in the pod
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
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


def _validate(manifest: dict, tmp_path, name: str) -> None:
    import yaml

    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(manifest))
    exe = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    r = subprocess.run([exe, "-k", "1.31", "--strict", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("task_id", ["wave_01.prune", "init", "wave_01.decide", "evaluate"])
def test_rendered_pods_validate_against_kubernetes_schema(dagbag, k8s_settings, tmp_path, task_id):
    """kubernetes-validate --strict (offline JSON schemas) accepts GPU, CPU and XCom-returning pods."""
    _, manifest = _render(dagbag.dags["birdbone_compress"], task_id, {"run_id": "exp1"})
    _validate(manifest, tmp_path, task_id)


def test_decide_pod_returns_its_decision_through_the_xcom_sidecar(dagbag, k8s_settings):
    _, manifest = _render(dagbag.dags["birdbone_compress"], "wave_02.decide", {"run_id": "exp1"})
    c = manifest["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["BIRDBONE_RESULT_JSON"] == "/airflow/xcom/return.json"
    assert "/airflow/xcom" in {m["mountPath"] for m in c["volumeMounts"]}
    assert any(s["name"] == "airflow-xcom-sidecar" for s in manifest["spec"]["containers"][1:])


def test_multi_gpu_heal_pod_runs_torchrun_with_n_gpus(dagbag, monkeypatch, tmp_path):
    """heal_gpus N > 1: one pod, N GPUs, torchrun with one rank per GPU, shared memory for NCCL,
    N slots of the h100 pool; validated against the Kubernetes schema."""
    from kubernetes.client import ApiClient

    from operators import BirdboneStepOperator
    from operators.birdbone_step import GPU_POOL

    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_K8S", json.dumps({**K8S, "heal_gpus": 4}))
    monkeypatch.setenv("AIRFLOW_VAR_BIRDBONE_EXECUTOR", "kubernetes")
    op = BirdboneStepOperator(task_id="heal", args=["wave", "/runs/exp1", "1", "heal"], kind="gpu",
                              distributed=True)
    assert (op.pool, op.pool_slots) == (GPU_POOL, 4)
    ctx = _ctx(dagbag.dags["birdbone_compress"], {})
    op.render_template_fields(ctx)
    manifest = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(ctx, dry_run=True))
    c = manifest["spec"]["containers"][0]
    assert c["command"] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m", "birdbone_core.cli"]
    assert c["args"] == ["wave", "/runs/exp1", "1", "heal", "--device=cuda"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["dshm"] == "/dev/shm"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in manifest["spec"]["volumes"]
    _validate(manifest, tmp_path, "heal-4gpu")
    single = BirdboneStepOperator(task_id="p", args=["wave", "/r", "1", "prune"], kind="gpu")
    assert single.pool_slots == 2                              # the `gpus` setting of ordinary GPU steps


def _finished_pod(exit_code: int):
    from kubernetes.client import models as k8s

    term = k8s.V1ContainerStateTerminated(exit_code=exit_code, reason="Error" if exit_code else "Completed")
    status = k8s.V1ContainerStatus(name="base", ready=False, restart_count=0, image="i", image_id="i",
                                   state=k8s.V1ContainerState(terminated=term))
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="p", namespace="ml"),
                     status=k8s.V1PodStatus(phase="Failed" if exit_code else "Succeeded",
                                            container_statuses=[status]))


@pytest.mark.parametrize("exit_code,retried", [(2, False), (1, True), (137, True)])
def test_pod_exit_status_2_fails_without_retry(exit_code, retried):
    """The provider's own clean-up decides the pod failed; exit 2 (bad input) becomes AirflowFailException
    (no retry), any other failure stays an AirflowException (retried)."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from operators import BirdboneStepOperator

    op = BirdboneStepOperator(task_id="t", args=["wave", "/r", "1", "prune"], kind="gpu")
    op.patch_already_checked = lambda *a, **k: None        # no cluster: the API calls of clean-up are no-ops
    op.process_pod_deletion = lambda *a, **k: True
    op.is_istio_enabled = lambda pod: False
    op.log_events_on_failure = False
    pod = _finished_pod(exit_code)
    with pytest.raises(AirflowException) as e:
        op.cleanup(pod, pod)
    assert isinstance(e.value, AirflowFailException) is (not retried)
    ok = _finished_pod(0)
    op.cleanup(ok, ok)                                       # success: no exception


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


def test_local_step_returns_the_result_the_cli_wrote(tmp_path):
    """result=True: the step's record comes back from $BIRDBONE_RESULT_JSON as the task's return value
    (its XCom); no result file is an error."""
    from airflow.sdk.exceptions import AirflowException

    from operators import BirdboneStepOperator

    script = ("import json, os; json.dump({'wave': 1, 'action': 'finish', 'reason': 'r'}, "
              "open(os.environ['BIRDBONE_RESULT_JSON'], 'w'))")
    op = BirdboneStepOperator(task_id="d", args=["-c", script], result=True)
    op.local_argv = lambda: [sys.executable, *op.arguments]
    assert op.execute({}) == {"wave": 1, "action": "finish", "reason": "r"}
    silent = BirdboneStepOperator(task_id="s", args=["-c", "pass"], result=True)
    silent.local_argv = lambda: [sys.executable, *silent.arguments]
    with pytest.raises(AirflowException, match="no result"):
        silent.execute({})
