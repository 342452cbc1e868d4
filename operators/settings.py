"""Deployment settings, set once per Airflow deployment as Airflow Variables (UI, CLI, or env
`AIRFLOW_VAR_<NAME>`); every one has a default that runs locally.

    birdbone_executor   "local" (subprocess on the worker) | "kubernetes" (one pod per step)
    birdbone_cli        the birdbone executable for local runs (default "birdbone" on PATH)
    birdbone_runs_root  where run directories live: in Kubernetes mode the shared volume (runs_pvc) is
                        mounted at this path in every step pod; Airflow workers never read it (the
                        stop-loss decision reaches the branch as an XCom)
    birdbone_gpu_device the --device GPU steps pass (default: "cuda" in Kubernetes mode, else "auto")
    birdbone_k8s        JSON object, merged over K8S_DEFAULTS below (images, GPUs, node selector, ...)

Secrets are never settings: pods get S3 credentials from the Kubernetes secret named in `s3_secret`
through env `valueFrom.secretKeyRef`, so no value passes through Airflow.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

K8S_DEFAULTS: dict = {
    "image": "birdbone-core:0.1.0-cuda",            # GPU steps (prepare, prune, heal, regrow, evaluate, export)
    "cpu_image": "birdbone-core:0.1.0-cpu",         # CPU steps (init, decide, rollback, finish, GGUF eval, ...)
    "image_pull_policy": "IfNotPresent",
    "namespace": "birdbone",
    "kubernetes_conn_id": "kubernetes_default",     # an Airflow Connection (in-cluster or kubeconfig)
    "service_account": "birdbone-runner",
    "gpus": 1,                                       # nvidia.com/gpu limit of GPU steps
    "heal_gpus": 1,                                  # GPUs of the heal pod; > 1: torchrun, one rank per GPU
    "gpu_resources": {"cpu": "8", "memory": "64Gi"},    # requests = limits, per GPU step pod
    "cpu_resources": {"cpu": "2", "memory": "8Gi"},     # per CPU step pod
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "model_cache_pvc": "birdbone-model-cache",       # mounted at model_cache_path (BIRDBONE_CACHE, HF_HOME)
    "model_cache_path": "/cache",
    "runs_pvc": "birdbone-runs",                     # mounted at birdbone_runs_root
    "s3_secret": "birdbone-s3",                      # keys below become env vars of the same name
    "s3_secret_keys": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
    "ops_configmap": "birdbone-ops",                 # envFrom: Pushgateway, DVC remote, S3 endpoint (k8s/)
    "env": {"HF_HUB_OFFLINE": "1"},     # plain, non-secret env (OMP_NUM_THREADS follows the pod's cpu)
    "startup_timeout_seconds": 600,
}


def variable(name: str, default=None, json_: bool = False):
    """An Airflow Variable, or `default` when it is not set."""
    from airflow.sdk import Variable

    try:
        return Variable.get(name, default=default, deserialize_json=json_)
    except (KeyError, ValueError, RuntimeError) as e:   # no metadata DB / API reachable: local default
        log.warning("Variable %s unavailable (%s); using the default", name, e)
        return default


def executor() -> str:
    mode = str(variable("birdbone_executor", "local")).strip().lower()
    if mode not in ("local", "kubernetes"):
        raise ValueError(f"Variable birdbone_executor must be 'local' or 'kubernetes', not {mode!r}")
    return mode


def cli() -> str:
    return str(variable("birdbone_cli", os.environ.get("BIRDBONE_CLI", "birdbone")))


def runs_root() -> Path:
    return Path(str(variable("birdbone_runs_root", os.environ.get("BIRDBONE_RUNS_ROOT", "runs")))).absolute()


def wave_slots() -> int:
    """How many wave slots birdbone_compress has: $BIRDBONE_WAVE_SLOTS, else 10. Read when the DAG file is
    parsed (no Variable lookup there); a one-shot recipe needs one, and every unused slot costs a
    scheduler pass to skip (about a second each in `dag.test()`)."""
    raw = os.environ.get("BIRDBONE_WAVE_SLOTS", "10")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"BIRDBONE_WAVE_SLOTS must be a whole number of waves >= 1, not {raw!r}")
    return int(raw)


def gpu_device() -> str:
    """The --device of GPU steps: Variable birdbone_gpu_device, else cuda on Kubernetes, auto locally."""
    default = "cuda" if executor() == "kubernetes" else "auto"
    return str(variable("birdbone_gpu_device", default) or default).strip()


def k8s() -> dict:
    raw = variable("birdbone_k8s", None)
    override = json.loads(raw) if isinstance(raw, str) else (raw or {})
    if not isinstance(override, dict):
        raise ValueError("Variable birdbone_k8s must be a JSON object")
    unknown = set(override) - set(K8S_DEFAULTS)
    if unknown:
        raise ValueError(f"Variable birdbone_k8s: unknown keys {sorted(unknown)} (known: {sorted(K8S_DEFAULTS)})")
    return {**K8S_DEFAULTS, **override}


def set_variable(name: str, value, json_: bool = False) -> None:
    """Write an Airflow Variable (from a task: through the Task SDK's execution API)."""
    from airflow.sdk import Variable

    Variable.set(name, value, serialize_json=json_)


def nightly() -> dict:
    """birdbone_nightly's settings (Variables):

    birdbone_nightly_bucket        S3 bucket of new checkpoints (required; no default)
    birdbone_nightly_prefix        key prefix: checkpoints are <prefix>/<name>/... (default "checkpoints")
    birdbone_nightly_recipe        recipe path the compress runs get (default: birdbone's built-in recipe)
    birdbone_nightly_max_attempts  compress runs per checkpoint before it is alerted (default 3)
    birdbone_aws_conn_id           Airflow connection of that S3 (type aws; MinIO/moto: extra endpoint_url)
    """
    attempts = int(variable("birdbone_nightly_max_attempts", 3) or 3)
    if attempts < 1:
        raise ValueError("Variable birdbone_nightly_max_attempts must be >= 1")
    return {"bucket": str(variable("birdbone_nightly_bucket", "") or "").strip(),
            "prefix": str(variable("birdbone_nightly_prefix", "checkpoints") or "").strip().strip("/"),
            "recipe": str(variable("birdbone_nightly_recipe", "") or ""),
            "max_attempts": attempts,
            "aws_conn_id": str(variable("birdbone_aws_conn_id", "aws_default") or "aws_default")}
