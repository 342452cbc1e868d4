"""Step metrics to a Prometheus Pushgateway.

Every `birdbone` step ends with `push_step(run_root, step, wave, metrics, duration_s)`. It is a no-op
unless env BIRDBONE_PUSHGATEWAY (host:port or URL) is set, and never raises on network errors (a
warning names the gateway; the step's own result stands). For `decide` and `heal` it also reads the
wave's records in RUN (decision.json, heal.json) for the verdict and the healing curve when the caller
passed numbers only. One push replaces one group on the gateway,
keyed by job/run_id/wave/step, so a retried step overwrites its own numbers and nothing else.

Labels on every series: run_id (env BIRDBONE_RUN_ID, else the RUN directory name), model (name of the
run's base model), wave ("" -> "none" for run-level steps), step, dag_run (env AIRFLOW_CTX_DAG_RUN_ID,
else "local"). Gauges, from the keys a step reports in `metrics`:

    birdbone_perplexity            ppl | perplexity
    birdbone_kld                   kld
    birdbone_top1_agreement        top1
    birdbone_sparsity              sparsity            (fraction of zeros)
    birdbone_bits_per_weight       bits_per_weight
    birdbone_size_bytes            bytes | size_bytes
    birdbone_heal_loss             heal_loss | loss    (final healing loss of the wave)
    birdbone_heal_curve_loss       heal_curve          (list of losses, or of {"step", "loss"}; label heal_step)
    birdbone_decision              verdict / action    (1, labels verdict + action; the stop-loss decision)
    birdbone_decision_code         verdict             (0 accept, 1 strike, 2 rollback, 3 other)
    birdbone_step_metric           any other number    (label metric=<key>)
    birdbone_step_duration_seconds duration_s
    birdbone_step_completed_timestamp_seconds
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

ENV_GATEWAY = "BIRDBONE_PUSHGATEWAY"
ENV_RUN_ID = "BIRDBONE_RUN_ID"
ENV_DAG_RUN = "AIRFLOW_CTX_DAG_RUN_ID"
JOB = "birdbone"
LABELS = ("run_id", "model", "wave", "step", "dag_run")

# metrics-dict key -> (gauge name, help)
_SCALARS = {
    "ppl": ("birdbone_perplexity", "Held-out perplexity"),
    "perplexity": ("birdbone_perplexity", "Held-out perplexity"),
    "kld": ("birdbone_kld", "Mean KL divergence vs the dense base"),
    "top1": ("birdbone_top1_agreement", "Top-1 agreement with the dense base"),
    "sparsity": ("birdbone_sparsity", "Fraction of zero weights in pruned linears"),
    "bits_per_weight": ("birdbone_bits_per_weight", "Bits per weight of the exported GGUF"),
    "bytes": ("birdbone_size_bytes", "Size of the step's model artifact in bytes"),
    "size_bytes": ("birdbone_size_bytes", "Size of the step's model artifact in bytes"),
    "heal_loss": ("birdbone_heal_loss", "Final healing loss of the wave"),
    "loss": ("birdbone_heal_loss", "Final healing loss of the wave"),
}
DECISION_CODES = {"accept": 0, "strike": 1, "rollback": 2}
_NOT_METRICS = {"wave", "seconds"}      # already labels / already birdbone_step_duration_seconds


def run_labels(run_root: Path, step: str, wave: int | None) -> dict[str, str]:
    """The label set of one step's push (wave None -> "none": run-level steps like prepare/export)."""
    run_root = Path(run_root)
    model = "unknown"
    try:
        m = json.loads((run_root / "run.json").read_text())["model"]
        model = Path(str(m.get("path") or m.get("spec") or "unknown").rstrip("/")).name or "unknown"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # metrics never fail a step; an unreadable manifest only loses the model name
    return {"run_id": os.environ.get(ENV_RUN_ID) or run_root.resolve().name, "model": model,
            "wave": "none" if wave is None else str(int(wave)), "step": str(step),
            "dag_run": os.environ.get(ENV_DAG_RUN) or "local"}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _curve(points) -> list[tuple[str, float]]:
    """heal_curve as [(heal_step, loss)]: a list of losses (index = step) or of {"step", "loss"} dicts."""
    out = []
    for i, p in enumerate(points or []):
        if isinstance(p, dict):
            step, loss = p.get("step", i), _number(p.get("loss"))
        else:
            step, loss = i, _number(p)
        if loss is not None and math.isfinite(loss):
            out.append((str(step), loss))
    return out


def build_registry(labels: dict[str, str], metrics: dict, duration_s: float):
    """A fresh CollectorRegistry holding this step's gauges (pure: no network)."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    names = list(LABELS)
    gauges: dict[str, Gauge] = {}

    def gauge(name, help_, extra=()):
        if name not in gauges:
            gauges[name] = Gauge(name, help_, names + list(extra), registry=reg)
        return gauges[name]

    metrics = dict(metrics or {})
    verdict = metrics.pop("verdict", None)
    action = metrics.pop("action", None)
    decision = metrics.pop("decision", None)
    if isinstance(verdict, dict):               # a wave's full verdict record {"action", "reason", ...}
        action = action or verdict.get("action")
        verdict = verdict.get("verdict") or verdict.get("action")
    if isinstance(decision, str) and verdict is None:
        verdict = decision
    if verdict is not None or action is not None:
        v, a = str(verdict or action), str(action or verdict)
        gauge("birdbone_decision", "Stop-loss decision of the wave (1 = this decision)",
              ("verdict", "action")).labels(**labels, verdict=v, action=a).set(1)
        gauge("birdbone_decision_code", "Stop-loss verdict: 0 accept, 1 strike, 2 rollback, 3 other"
              ).labels(**labels).set(DECISION_CODES.get(v, 3))
    for step, loss in _curve(metrics.pop("heal_curve", None)):
        gauge("birdbone_heal_curve_loss", "Healing loss along the wave's healing steps", ("heal_step",)
              ).labels(**labels, heal_step=step).set(loss)
    for key, value in metrics.items():
        x = _number(value)
        if key in _NOT_METRICS or x is None or not math.isfinite(x):
            continue                            # strings, lists, None, NaN: not a gauge value
        if key in _SCALARS:
            name, help_ = _SCALARS[key]
            gauge(name, help_).labels(**labels).set(x)
        else:
            gauge("birdbone_step_metric", "Other numeric step metrics", ("metric",)
                  ).labels(**labels, metric=str(key)).set(x)
    gauge("birdbone_step_duration_seconds", "Wall time of the step").labels(**labels).set(float(duration_s))
    gauge("birdbone_step_completed_timestamp_seconds", "When the step finished (unix time)"
          ).labels(**labels).set(time.time())
    return reg


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _mean_curve(curves: list) -> list[float]:
    """Per-step mean of several loss curves (block-wise healing keeps one per layer)."""
    curves = [c for c in curves if isinstance(c, list) and c]
    n = min((len(c) for c in curves), default=0)
    return [sum(float(c[i]) for c in curves) / len(curves) for i in range(n)]


def with_run_records(run_root: Path, step: str, wave: int | None, metrics: dict) -> dict:
    """`metrics` plus what the step's own records in RUN say and the caller did not pass: the stop-loss
    verdict/action from RUN/waves/K/decision.json (the step contract's file), and the healing loss and
    curve from RUN/waves/K/heal.json. Keys the caller passed always win."""
    out = dict(metrics or {})
    if wave is None:
        return out
    wave_dir = Path(run_root) / "waves" / str(int(wave))
    if step == "decide":
        d = _read(wave_dir / "decision.json")
        for k in ("verdict", "action"):
            if k not in out and isinstance(d.get(k), str):
                out[k] = d[k]
        for k, v in (d.get("metrics") or {}).items():
            out.setdefault(k, v)
    elif step == "heal":
        rep = _read(wave_dir / "heal.json").get("report") or {}
        if "heal_loss" not in out and _number(rep.get("loss_after")) is not None:
            out["heal_loss"] = rep["loss_after"]
        if "heal_curve" not in out:
            curve = rep.get("curve") or _mean_curve([x.get("curve") for x in rep.get("layers") or []
                                                     if isinstance(x, dict)])
            if curve:
                out["heal_curve"] = curve
    return out


def gateway_url(value: str) -> str:
    value = value.strip().rstrip("/")
    return value if "://" in value else f"http://{value}"


def push_step(run_root: Path, step: str, wave: int | None, metrics: dict, duration_s: float) -> bool:
    """Push one step's metrics; returns True when pushed. No-op without BIRDBONE_PUSHGATEWAY; warns
    (never raises) when the gateway cannot be reached or prometheus-client is missing."""
    target = os.environ.get(ENV_GATEWAY, "").strip()
    if not target:
        return False
    try:
        from prometheus_client import push_to_gateway
    except ImportError:
        warnings.warn("BIRDBONE_PUSHGATEWAY is set but prometheus-client is not installed "
                      "(pip install 'birdbone-core[ops]'); metrics not pushed", stacklevel=2)
        return False
    labels = run_labels(run_root, step, wave)
    try:
        reg = build_registry(labels, with_run_records(run_root, step, wave, metrics), duration_s)
        # the grouping key is the whole label set: each (run, wave, step) is its own group on the gateway
        push_to_gateway(gateway_url(target), job=JOB, registry=reg, grouping_key=labels, timeout=10)
        return True
    except Exception as e:  # network, HTTP 4xx/5xx, bad URL: a metrics outage never fails a step
        warnings.warn(f"could not push metrics of step {step!r} to {target}: {type(e).__name__}: {e}",
                      stacklevel=2)
        return False
