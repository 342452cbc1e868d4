"""One `birdbone` CLI step as an Airflow task, run either in a Kubernetes pod or as a local subprocess
with the identical argument list.

    BirdboneStepOperator(task_id="prune", args=["wave", RUN, "1", "prune"], kind="gpu")   # RUN: a template
      local:       [<birdbone_cli>, "wave", RUN, "1", "prune", "--device=auto"]   (birdbone_executor=local)
      kubernetes:  pod command ["birdbone"], args [..., "--device=cuda"] on an H100 node, pool "h100"

Step kinds (STEP_KINDS): "gpu" steps run on a GPU node with the CUDA image, pass `--device`, take a slot of
the `h100` pool per GPU and may run 12 h; "cpu" steps run in a small pod with the CPU image and may run 4 h.
A heal step with `distributed=True` and K8S setting heal_gpus N > 1 runs `torchrun --nproc_per_node N` in
one pod with N GPUs (one healing rank per GPU, NCCL; see birdbone_core.heal.distributed).

The step is the unit of retry: every `birdbone` step writes its outputs atomically and re-running a finished
step is a no-op, so a task retried after its process or pod died neither applies a wave twice nor loses one.
Exit status 2 is a user error (bad recipe, missing earlier step): it fails the task without retrying, in a
local process and in a pod alike. A step with `result=True` returns the step's record (the CLI writes it to
$BIRDBONE_RESULT_JSON; in a pod that is the XCom sidecar's /airflow/xcom/return.json), so downstream tasks
read it from XCom and never from the run directory. An argument `--flag=` whose value renders empty
(e.g. `--model={{ params.model }}` with no model given) is left out, in both modes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from kubernetes.client import models as k8s

from operators import settings, signals

PROGRAM = "birdbone"   # the entrypoint inside the image; locally Variable birdbone_cli (same CLI)
USER_ERROR = 2         # the CLI's exit status for bad input: retrying cannot help
GPU_POOL = "h100"      # create it with one slot per GPU: airflow pools set h100 <GPUs> "H100 GPUs"
RESULT_ENV = "BIRDBONE_RESULT_JSON"          # birdbone_core.loop.cli.ENV_RESULT_JSON
XCOM_RETURN = "/airflow/xcom/return.json"    # what KubernetesPodOperator's XCom sidecar reads
IMAGE_UID = 10001      # the user of images/Dockerfile.cpu and .cuda


@dataclass(frozen=True)
class StepKind:
    gpu: bool
    execution_timeout: timedelta


STEP_KINDS = {"gpu": StepKind(gpu=True, execution_timeout=timedelta(hours=12)),
              "cpu": StepKind(gpu=False, execution_timeout=timedelta(hours=4))}


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


def container_exit_code(pod, container: str) -> int | None:
    """The exit code of `container` in a finished pod (None while it runs or when it never started)."""
    for st in (getattr(getattr(pod, "status", None), "container_statuses", None) or []):
        if st.name == container and st.state is not None and st.state.terminated is not None:
            return st.state.terminated.exit_code
    return None


def gpus_needed(gpu: bool, distributed: bool, cfg: dict | None = None) -> int:
    """GPUs of a step's pod: K8S setting heal_gpus for the distributed heal, `gpus` for other GPU steps.
    cfg: the settings already read (settings.k8s()), else they are read here."""
    if not gpu:
        return 0
    key = "heal_gpus" if distributed else "gpus"
    n = int((cfg or settings.k8s())[key])
    if n < 1:
        raise ValueError(f"Variable birdbone_k8s: {key} must be >= 1, not {n}")
    return n


def cpu_threads(cpu: str) -> str:
    """OMP_NUM_THREADS for a pod's cpu quantity ("8", "500m", "2.5")."""
    c = str(cpu)
    n = float(c[:-1]) / 1000 if c.endswith("m") else float(c)
    return str(max(1, int(n)))


class BirdboneStepOperator(KubernetesPodOperator):
    """Run `birdbone <args>`; where it runs is a deployment setting, not part of the DAG."""

    ui_color = "#e8f0e0"

    def __init__(self, *, args: Sequence[str], kind: str = "cpu", result: bool = False,
                 distributed: bool = False, **kwargs) -> None:
        if kind not in STEP_KINDS:
            raise ValueError(f"kind must be one of {sorted(STEP_KINDS)}, not {kind!r}")
        gpu = STEP_KINDS[kind].gpu
        kwargs.setdefault("execution_timeout", STEP_KINDS[kind].execution_timeout)
        if gpu:
            kwargs.setdefault("pool", GPU_POOL)
            kwargs.setdefault("pool_slots", gpus_needed(gpu, distributed))
        for name, fn in signals.TASK_CALLBACKS.items():
            kwargs.setdefault(name, fn)
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("on_finish_action", "delete_pod")
        # the last lines of the log become the pod's termination message: the `error:` line of a failure
        kwargs.setdefault("termination_message_policy", "FallbackToLogsOnError")
        super().__init__(cmds=[PROGRAM], arguments=list(args), image=settings.K8S_DEFAULTS["image"],
                         do_xcom_push=result, **kwargs)
        self.step_kind, self.gpu, self.distributed, self.result = kind, gpu, distributed and gpu, result
        self._proc: subprocess.Popen | None = None
        self._pod_configured = False

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        self.arguments = drop_empty_flags(self.arguments)
        if self.gpu and not any(str(a).startswith("--device") for a in self.arguments):
            self.arguments.append(f"--device={settings.gpu_device()}")

    # ---- local ------------------------------------------------------------------------------------
    def local_argv(self) -> list[str]:
        return birdbone_argv(self.arguments, settings.cli())

    def _run_local(self, context):
        argv = self.local_argv()
        self.log.info("running: %s", " ".join(argv))
        env = {**os.environ, **_ctx_env(context)}
        with tempfile.TemporaryDirectory(prefix="birdbone-result-") as tmp:
            result_file = Path(tmp) / "result.json"
            if self.result:
                env[RESULT_ENV] = str(result_file)
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
            if rc == USER_ERROR:
                raise AirflowFailException(f"{' '.join(argv)}: {last}")
            if rc != 0:
                raise AirflowException(f"{' '.join(argv)} exited with status {rc}: {last}")
            if not self.result:
                return None
            if not result_file.is_file():
                raise AirflowException(f"{' '.join(argv)} wrote no result to ${RESULT_ENV}")
            return json.loads(result_file.read_text())

    # ---- kubernetes -------------------------------------------------------------------------------
    def configure_pod(self) -> None:
        """Apply the deployment's Kubernetes settings (Variable birdbone_k8s) to this operator."""
        if self._pod_configured:
            return
        c = settings.k8s()
        n_gpus = gpus_needed(self.gpu, self.distributed, c)
        self.image = c["image"] if self.gpu else c["cpu_image"]
        self.image_pull_policy = c["image_pull_policy"]
        self.namespace = c["namespace"]
        self.kubernetes_conn_id = c["kubernetes_conn_id"]
        self.service_account_name = c["service_account"]
        self.startup_timeout_seconds = int(c["startup_timeout_seconds"])
        res = c["gpu_resources"] if self.gpu else c["cpu_resources"]
        limits = {"cpu": str(res["cpu"]), "memory": str(res["memory"])}
        if self.gpu:
            limits["nvidia.com/gpu"] = str(n_gpus)
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
        if self.gpu:   # torch (and NCCL between ranks) share tensors through /dev/shm: 64 MiB by default
            self.volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory")))
            self.volume_mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
        if self.distributed and n_gpus > 1:   # N ranks in one pod
            self.cmds = ["torchrun", "--standalone", f"--nproc_per_node={n_gpus}", "-m", "birdbone_core.cli"]
        # the images' user; fsGroup makes the volumes (model cache, runs) writable by it
        self.security_context = {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                                 "fsGroup": IMAGE_UID}
        self.container_security_context = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        plain = {"OMP_NUM_THREADS": cpu_threads(res["cpu"]), **c["env"], "BIRDBONE_CACHE": c["model_cache_path"],
                 "HF_HOME": f"{c['model_cache_path']}/hf"}
        if self.result:
            plain[RESULT_ENV] = XCOM_RETURN
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

    def cleanup(self, pod, remote_pod, xcom_result=None, context=None) -> None:
        """The provider's clean-up, with exit status 2 turned into a failure that is not retried."""
        try:
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)
        except AirflowException as e:
            if not isinstance(e, AirflowFailException) and container_exit_code(remote_pod,
                                                                               self.base_container_name) == USER_ERROR:
                raise AirflowFailException(f"user error (exit status {USER_ERROR}), not retried: {e}") from e
            raise

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
