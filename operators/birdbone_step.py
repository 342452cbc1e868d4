"""One `birdbone` CLI step as an Airflow task, run either in a Kubernetes pod (GPU node) or as a local
subprocess with the identical argument list.

    BirdboneStepOperator(task_id="prune", args=["wave", RUN, "1", "prune"], gpu=True)   # RUN: a template
      local:       [<birdbone_cli>, "wave", RUN, "1", "prune"]       (Variable birdbone_executor=local)
      kubernetes:  pod command ["birdbone"], args ["wave", RUN, "1", "prune"] on an H100 node

The step is the unit of retry: every `birdbone` step writes its outputs atomically and re-running a finished
step is a no-op, so a task retried after its process or pod died neither applies a wave twice nor loses one.
Exit status 2 is a user error (bad recipe, missing earlier step): it fails the task without retrying.
An argument `--flag=` whose value renders empty (e.g. `--model={{ params.model }}` with no model given) is
left out, in both modes, so the CLI applies its own default.
"""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from operators import settings

PROGRAM = "birdbone"   # the entrypoint inside the image; locally Variable birdbone_cli (same CLI)


def birdbone_argv(args: Sequence[str], program: str = PROGRAM) -> list[str]:
    """The command line of a step: program + arguments, all strings."""
    return [program, *(str(a) for a in args)]


def drop_empty_flags(args: Sequence[str]) -> list[str]:
    """Leave out `--flag=` arguments whose value is empty (the CLI's default applies)."""
    return [str(a) for a in args if not (str(a).startswith("--") and str(a).endswith("="))]


def _ctx_env(context) -> dict[str, str]:
    """Airflow context as env (the metrics labels of birdbone_core.ops.metrics.push_step read these)."""
    ti = context.get("ti")
    dag_run = context.get("dag_run")
    env = {"AIRFLOW_CTX_DAG_ID": getattr(context.get("dag"), "dag_id", "") or "",
           "AIRFLOW_CTX_TASK_ID": getattr(ti, "task_id", "") or "",
           "AIRFLOW_CTX_DAG_RUN_ID": str(context.get("run_id") or getattr(dag_run, "run_id", "") or ""),
           "AIRFLOW_CTX_TRY_NUMBER": str(getattr(ti, "try_number", "") or "")}
    return {k: v for k, v in env.items() if v}


class BirdboneStepOperator(KubernetesPodOperator):
    """Run `birdbone <args>`; where it runs is a deployment setting, not part of the DAG."""

    ui_color = "#e8f0e0"

    def __init__(self, *, args: Sequence[str], gpu: bool = False, **kwargs) -> None:
        kwargs.setdefault("do_xcom_push", False)
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("on_finish_action", "delete_pod")
        super().__init__(cmds=[PROGRAM], arguments=list(args), image=settings.K8S_DEFAULTS["image"], **kwargs)
        self.gpu = gpu
        self._proc: subprocess.Popen | None = None
        self._pod_configured = False

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        self.arguments = drop_empty_flags(self.arguments)

    # ---- local ------------------------------------------------------------------------------------
    def local_argv(self) -> list[str]:
        return birdbone_argv(self.arguments, settings.cli())

    def _run_local(self, context) -> None:
        argv = self.local_argv()
        self.log.info("running: %s", " ".join(argv))
        env = {**os.environ, **_ctx_env(context)}
        # own process group: on_kill (task timeout, mark failed) stops the step and anything it started
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, start_new_session=True, bufsize=1)
        last = ""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip()
            if line:
                last = line
                self.log.info("%s", line)
        rc = self._proc.wait()
        self._proc = None
        if rc == 2:   # the CLI's user-error status: retrying cannot help
            raise AirflowFailException(f"{' '.join(argv)}: {last}")
        if rc != 0:
            raise AirflowException(f"{' '.join(argv)} exited with status {rc}: {last}")

    # ---- kubernetes -------------------------------------------------------------------------------
    def configure_pod(self) -> None:
        """Apply the deployment's Kubernetes settings (Variable birdbone_k8s) to this operator."""
        if self._pod_configured:
            return
        c = settings.k8s()
        self.image = c["image"]
        self.image_pull_policy = c["image_pull_policy"]
        self.namespace = c["namespace"]
        self.kubernetes_conn_id = c["kubernetes_conn_id"]
        self.service_account_name = c["service_account"]
        self.startup_timeout_seconds = int(c["startup_timeout_seconds"])
        limits = {"cpu": str(c["cpu"]), "memory": str(c["memory"])}
        if self.gpu:
            limits["nvidia.com/gpu"] = str(c["gpus"])
            self.node_selector = dict(c["node_selector"])
            self.tolerations = [k8s.V1Toleration(**t) for t in c["tolerations"]]
        self.container_resources = k8s.V1ResourceRequirements(limits=limits, requests=dict(limits))
        runs = str(settings.runs_root())
        self.volumes = [
            k8s.V1Volume(name="model-cache", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=c["model_cache_pvc"])),
            k8s.V1Volume(name="runs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                claim_name=c["runs_pvc"])),
        ]
        self.volume_mounts = [k8s.V1VolumeMount(name="model-cache", mount_path=c["model_cache_path"]),
                              k8s.V1VolumeMount(name="runs", mount_path=runs)]
        plain = {**c["env"], "BIRDBONE_CACHE": c["model_cache_path"], "HF_HOME": f"{c['model_cache_path']}/hf"}
        env = [k8s.V1EnvVar(name=k, value=str(v)) for k, v in plain.items()]
        env += [k8s.V1EnvVar(name=key, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=c["s3_secret"], key=key))) for key in c["s3_secret_keys"]]
        self.env_vars = env
        if c["ops_configmap"]:
            self.env_from = [k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=c["ops_configmap"]))]
        self._pod_configured = True

    def build_pod_request_obj(self, context=None, *, dry_run: bool = False):
        self.configure_pod()
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        if context is not None:   # same Airflow-context env as a local run
            pod.spec.containers[0].env = [*(pod.spec.containers[0].env or []),
                                          *(k8s.V1EnvVar(name=k, value=v) for k, v in _ctx_env(context).items())]
        return pod

    # ---- both -------------------------------------------------------------------------------------
    def execute(self, context):
        if settings.executor() == "local":
            return self._run_local(context)
        self.configure_pod()
        return super().execute(context)

    def on_kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            return
        if self._pod_configured:
            super().on_kill()
