"""Ops signals from Airflow to the Prometheus Pushgateway: task state, failures, retries, stuck steps,
alerts, and clean-up of a finished DAG run's groups.

The `birdbone` steps push their own results (birdbone_core.ops.metrics, job "birdbone"); this module
pushes what only the orchestrator knows, through Airflow callbacks (TASK_CALLBACKS on every task,
RUN_CALLBACKS on the DAG). Nothing here imports Airflow, and nothing raises: with env BIRDBONE_PUSHGATEWAY
unset every call is a no-op, and a gateway that does not answer costs a warning in the task log.

    job birdbone_airflow, group {dag_id, dag_run, task_id}     (one per task of a run; a retry replaces it)
      birdbone_task_state{state}                   1 for the task's state, 0 for the other STATES
      birdbone_task_try_number                     Airflow's try number (> 1: the step was retried)
      birdbone_task_started_timestamp_seconds      when this try started
      birdbone_task_timeout_seconds                the task's execution_timeout (0: none)
    job birdbone_alerts, group {dag_id, alert, key}
      birdbone_alert                               1, labels reason and any the caller gives
    job birdbone_airflow_runs, group {dag_id}      (the last finished run of each DAG)
      birdbone_dag_run_success                     1 success, 0 failed
      birdbone_dag_run_finished_timestamp_seconds

A step is stuck when it is still `running` after STUCK_FRACTION of its execution_timeout (Grafana's
"Stuck steps" panel). When a DAG run ends, `on_dag_run_end` deletes every Pushgateway group of that run
(the steps' and the tasks'; Prometheus keeps what it scraped), except failed tasks' groups, which stay
until FAILED_RETENTION_S has passed so a failure is never cleaned away before anyone saw it.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.request

log = logging.getLogger(__name__)

ENV_GATEWAY = "BIRDBONE_PUSHGATEWAY"        # the same setting the birdbone steps read
TASK_JOB, ALERT_JOB, RUN_JOB = "birdbone_airflow", "birdbone_alerts", "birdbone_airflow_runs"
STATES = ("running", "success", "failed", "up_for_retry")
STUCK_FRACTION = 0.5
FAILED_RETENTION_S = 7 * 24 * 3600


def gateway() -> str | None:
    """The Pushgateway URL from env BIRDBONE_PUSHGATEWAY (host:port or URL), or None."""
    g = os.environ.get(ENV_GATEWAY, "").strip()
    if not g:
        return None
    return g if "://" in g else f"http://{g}"


def _ids(context) -> dict[str, str]:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    return {"dag_id": str(getattr(dag, "dag_id", None) or getattr(ti, "dag_id", "") or ""),
            "dag_run": str(context.get("run_id") or getattr(dag_run, "run_id", "") or getattr(ti, "run_id", "")),
            "task_id": str(getattr(ti, "task_id", "") or "")}


def push_gauges(job: str, key: dict[str, str], rows: list[tuple[str, str, dict[str, str], float]]) -> bool:
    """Replace group (job, key) with gauges: rows of (name, help, extra labels, value); one name may come
    in several rows with different label values. False when not pushed."""
    url = gateway()
    if url is None:
        return False
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    reg = CollectorRegistry()
    made: dict[str, Gauge] = {}
    for name, help_, labels, value in rows:
        if name not in made:
            made[name] = Gauge(name, help_, sorted(labels), registry=reg)
        (made[name].labels(**labels) if labels else made[name]).set(value)
    try:
        push_to_gateway(url, job=job, registry=reg, grouping_key=key, timeout=10)
        return True
    except Exception as e:  # noqa: BLE001 - a metrics outage must never fail a task
        log.warning("Pushgateway %s: push of %s %s failed: %s", url, job, key, e)
        return False


def push_task_state(context, state: str) -> bool:
    """The task's state (one of STATES), try number, start time and timeout, replacing its group."""
    ti = context.get("ti") or context.get("task_instance")
    task = context.get("task") or getattr(ti, "task", None)
    timeout = getattr(task, "execution_timeout", None)
    started = getattr(ti, "start_date", None)
    rows = [("birdbone_task_state", "Airflow task state (1 = current)", {"state": s}, float(s == state))
            for s in STATES]
    rows += [("birdbone_task_try_number", "Airflow try number", {}, float(getattr(ti, "try_number", 0) or 0)),
             ("birdbone_task_started_timestamp_seconds", "Start of the task's current try", {},
              started.timestamp() if started is not None else time.time()),
             ("birdbone_task_timeout_seconds", "The task's execution_timeout (0 = none)", {},
              timeout.total_seconds() if timeout else 0.0)]
    return push_gauges(TASK_JOB, _ids(context), rows)


def on_execute(context) -> None:
    push_task_state(context, "running")


def on_success(context) -> None:
    push_task_state(context, "success")


def on_retry(context) -> None:
    push_task_state(context, "up_for_retry")


def on_failure(context) -> None:
    push_task_state(context, "failed")


TASK_CALLBACKS = {"on_execute_callback": on_execute, "on_success_callback": on_success,
                  "on_retry_callback": on_retry, "on_failure_callback": on_failure}


def alert(context, reason: str, **labels: str) -> bool:
    """Raise an alert: an ERROR line in the task log and gauge birdbone_alert=1 in its own group
    (job birdbone_alerts, keyed by dag_id, alert name and `key`), which no run clean-up deletes.
    `labels` may carry `alert` (the alert's name, default "task") and `key` (what it is about)."""
    ids = _ids(context)
    name = str(labels.pop("alert", "task"))
    key = str(labels.pop("key", ids["dag_run"]))
    log.error("ALERT %s (%s): %s %s", name, key, reason, labels or "")
    extra = {"reason": reason[:200], **{k: str(v) for k, v in labels.items()}}
    return push_gauges(ALERT_JOB, {"dag_id": ids["dag_id"], "alert": name, "key": key},
                       [("birdbone_alert", "An alert raised by a birdbone DAG", extra, 1.0)])


def groups(url: str) -> list[dict]:
    """Every group on the gateway: {"labels": {...}, "push_time": seconds, "state": ...}."""
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=10) as r:
        data = json.load(r)["data"]
    out = []
    for g in data:
        push = g.get("push_time_seconds", {}).get("metrics", [{}])[0].get("value", "0")
        states = g.get("birdbone_task_state", {}).get("metrics", [])
        state = next((m["labels"].get("state") for m in states if float(m.get("value", 0)) == 1.0), None)
        out.append({"labels": g["labels"], "push_time": float(push), "state": state})
    return out


def delete_run_groups(dag_run: str, now: float | None = None) -> list[dict]:
    """Delete the groups of DAG run `dag_run` (except failed tasks' groups younger than
    FAILED_RETENTION_S), and any failed task group older than that. Returns the deleted groups' labels."""
    url = gateway()
    if url is None:
        return []
    from prometheus_client import delete_from_gateway

    now = time.time() if now is None else now
    deleted = []
    try:
        for g in groups(url):
            lab = dict(g["labels"])
            job = lab.pop("job", None)
            if job not in (TASK_JOB, "birdbone"):
                continue
            failed = g["state"] == "failed"
            old = now - g["push_time"] > FAILED_RETENTION_S
            if (lab.get("dag_run") == dag_run and not failed) or (failed and old):
                delete_from_gateway(url, job=job, grouping_key=lab, timeout=10)
                deleted.append(g["labels"])
    except Exception as e:  # noqa: BLE001 - clean-up is best effort; the next run's clean-up retries
        log.warning("Pushgateway %s: clean-up of DAG run %s failed: %s", url, dag_run, e)
    return deleted


def on_dag_run_end(context) -> None:
    """DAG-level callback (success and failure): record the run's outcome, then clean its groups up."""
    dag_run = context.get("dag_run")
    ids = _ids(context)
    ok = str(getattr(dag_run, "state", "")).lower().endswith("success")
    push_gauges(RUN_JOB, {"dag_id": ids["dag_id"]},
                [("birdbone_dag_run_success", "1 when the DAG's last finished run succeeded", {}, float(ok)),
                 ("birdbone_dag_run_finished_timestamp_seconds", "When the DAG's last run finished", {}, time.time())])
    delete_run_groups(ids["dag_run"])


RUN_CALLBACKS = {"on_success_callback": on_dag_run_end, "on_failure_callback": on_dag_run_end}
