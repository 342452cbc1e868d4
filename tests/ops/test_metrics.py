"""Step metrics: prometheus-client -> a real Pushgateway -> a real Prometheus (the repo's scrape config),
read back over the HTTP API; every PromQL query of the Grafana dashboard returns data."""
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from birdbone_core.cli import main as birdbone
from birdbone_core.ops import metrics as M

pytest.importorskip("prometheus_client")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:        # the repository's operators/ package (its signals need no Airflow)
    sys.path.insert(0, str(ROOT))
from operators import signals  # noqa: E402

DASHBOARD = ROOT / "grafana" / "dashboards" / "birdbone.json"
PROM_CONFIG = ROOT / "prometheus" / "prometheus.yml"
DAG_RUN = "manual__2026-11-30T01:00:00+00:00"
HEAL_CURVE = [0.90, 0.52, 0.31, 0.27]

# what a two-wave run pushes, step by step (wave None = run-level step)
PUSHES = [
    ("prepare", None, {"ppl": 17.95, "n_scored": 124}, 3.2),
    ("prune", 1, {"sparsity": 0.25}, 0.4),
    ("heal", 1, {"heal_loss": 0.27, "heal_curve": HEAL_CURVE}, 1.9),
    ("evaluate", 1, {"ppl": 18.02, "kld": 0.0029, "top1": 0.976, "sparsity": 0.25}, 0.8),
    ("decide", 1, {"verdict": "accept", "action": "continue", "ppl": 18.02, "sparsity": 0.25}, 0.1),
    ("prune", 2, {"sparsity": 0.5}, 0.5),
    ("heal", 2, {"heal_loss": 0.41, "heal_curve": [{"step": 0, "loss": 1.2}, {"step": 5, "loss": 0.41}]}, 2.1),
    ("evaluate", 2, {"ppl": 18.91, "kld": 0.0358, "top1": 0.911, "sparsity": 0.5}, 0.8),
    ("decide", 2, {"verdict": {"action": "finish", "verdict": "strike", "reason": "wave 2: +4.9%"},
                   "ppl": 18.91}, 0.1),
    ("export", None, {"bits_per_weight": 16.01, "bytes": 5282496, "path": "model-f16.gguf"}, 0.6),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("metrics") / "run-metrics"
    assert birdbone(["init", str(root), "--model", str(tiny_path)]) == 0
    return root


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> list:
    out = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert out["status"] == "success", (expr, out)
    return out["data"]["result"]


def _wait_query(prom: str, expr: str, n: int = 1, timeout: float = 40.0) -> list:
    import time

    t0 = time.monotonic()
    while True:
        res = _query(prom, expr)
        if len(res) >= n or time.monotonic() - t0 > timeout:
            return res
        time.sleep(0.5)


def _gateway_series(gw: str) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{gw}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("birdbone_")]


def test_push_is_a_noop_without_gateway_and_never_raises(run_dir, monkeypatch, free_port):
    monkeypatch.delenv(M.ENV_GATEWAY, raising=False)
    assert M.push_step(run_dir, "prune", 1, {"sparsity": 0.5}, 1.0) is False
    monkeypatch.setenv(M.ENV_GATEWAY, f"127.0.0.1:{free_port()}")       # nothing listens there
    with pytest.warns(UserWarning, match="could not push metrics of step 'prune'"):
        assert M.push_step(run_dir, "prune", 1, {"sparsity": 0.5}, 1.0) is False


def test_labels_come_from_the_run_and_airflow(run_dir, monkeypatch):
    monkeypatch.delenv(M.ENV_RUN_ID, raising=False)
    monkeypatch.delenv(M.ENV_DAG_RUN, raising=False)
    assert M.run_labels(run_dir, "heal", 3) == {"run_id": "run-metrics", "model": "tiny-llama", "wave": "3",
                                                "step": "heal", "dag_run": "local"}
    monkeypatch.setenv(M.ENV_RUN_ID, "nightly-7")
    monkeypatch.setenv(M.ENV_DAG_RUN, DAG_RUN)
    lab = M.run_labels(run_dir, "export", None)
    assert (lab["run_id"], lab["wave"], lab["dag_run"]) == ("nightly-7", "none", DAG_RUN)


def test_retried_step_replaces_its_own_group_only(pushgateway, run_dir, monkeypatch):
    monkeypatch.setenv(M.ENV_GATEWAY, pushgateway)
    monkeypatch.setenv(M.ENV_RUN_ID, "retry-run")
    monkeypatch.delenv(M.ENV_DAG_RUN, raising=False)
    assert M.push_step(run_dir, "evaluate", 1, {"ppl": 30.0}, 1.0)
    assert M.push_step(run_dir, "evaluate", 2, {"ppl": 40.0}, 1.0)
    assert M.push_step(run_dir, "evaluate", 1, {"ppl": 31.5}, 1.0)       # the retry of wave 1
    ppl = {s[1]["wave"]: s[2] for s in _gateway_series(pushgateway)
           if s[0] == "birdbone_perplexity" and s[1]["run_id"] == "retry-run"}
    assert ppl == {"1": 31.5, "2": 40.0}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
        for sub in p.get("panels", []):       # collapsed rows keep their panels inside
            out += [(sub["title"], t["expr"]) for t in sub.get("targets", [])]
    return out


def _task_ctx(dag_run: str, task_id: str, try_number: int = 1, started_ago_s: float = 5.0,
              timeout_s: float | None = 3600.0) -> dict:
    start = datetime.now(timezone.utc) - timedelta(seconds=started_ago_s)
    task = SimpleNamespace(execution_timeout=timedelta(seconds=timeout_s) if timeout_s else None)
    ti = SimpleNamespace(task_id=task_id, dag_id="birdbone_compress", run_id=dag_run, try_number=try_number,
                         start_date=start, task=task)
    return {"ti": ti, "task": task, "run_id": dag_run, "dag": SimpleNamespace(dag_id="birdbone_compress")}


def _push_task_signals(dag_run: str) -> None:
    """What the Airflow callbacks push during a run: a finished step, a failed one, a retried one, a step
    running for 40 min of a 1 h timeout (stuck), a finished DAG run, an alert."""
    signals.on_success(_task_ctx(dag_run, "prepare"))
    signals.on_failure(_task_ctx(dag_run, "wave_01.heal", try_number=3))
    signals.on_retry(_task_ctx(dag_run, "wave_01.prune", try_number=2))
    signals.on_execute(_task_ctx(dag_run, "wave_01.evaluate", started_ago_s=2400))
    signals.on_execute(_task_ctx(dag_run, "wave_01.regrow", started_ago_s=60))
    signals.push_gauges(signals.RUN_JOB, {"dag_id": "birdbone_compress"},
                        [("birdbone_dag_run_success", "", {}, 0.0),
                         ("birdbone_dag_run_finished_timestamp_seconds", "", {}, time.time())])
    assert signals.alert(_task_ctx(dag_run, "check"), "checkpoint m1 failed 2 attempts", alert="nightly", key="m1")


def test_dashboard_covers_the_required_views():
    dash = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for word in ("healing curve", "perplexity", "size / quality", "decision", "duration", "failed tasks",
                 "retries", "running steps", "stuck steps", "alerts"):
        assert word in titles, word
    exprs = " ".join(e for _, e in _dashboard_exprs())
    for metric in ("birdbone_perplexity", "birdbone_kld", "birdbone_sparsity", "birdbone_bits_per_weight",
                   "birdbone_heal_loss", "birdbone_heal_curve_loss", "birdbone_step_duration_seconds",
                   "birdbone_decision"):
        assert metric in exprs, metric
    assert {v["name"] for v in dash["templating"]["list"]} == {"run", "model", "dag_run"}
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    assert all(p["datasource"]["uid"] in uids for p in dash["panels"] if "datasource" in p)


def test_pushgateway_to_prometheus_and_every_dashboard_query(pushgateway, start_prometheus, run_dir,
                                                             monkeypatch):
    # the repo's Prometheus config, pointed at this gateway and scraping every second
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "pushgateway")
    assert job["honor_labels"] is True
    job["static_configs"] = [{"targets": [pushgateway]}]
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    cfg["scrape_configs"] = [job]
    prom = start_prometheus(yaml.safe_dump(cfg))

    run_id = "tiny-waves-1"
    monkeypatch.setenv(M.ENV_GATEWAY, f"http://{pushgateway}")
    monkeypatch.setenv(M.ENV_RUN_ID, run_id)
    monkeypatch.setenv(M.ENV_DAG_RUN, DAG_RUN)
    for step, wave, metrics, seconds in PUSHES:
        assert M.push_step(run_dir, step, wave, metrics, seconds), step

    _push_task_signals(DAG_RUN)
    sel = f'run_id="{run_id}"'
    n_groups = len(PUSHES)
    dur = _wait_query(prom, f"birdbone_step_duration_seconds{{{sel}}}", n=n_groups)
    assert len(dur) == n_groups
    for r in dur:   # every label of the contract, as pushed (honor_labels kept them)
        lab = r["metric"]
        assert (lab["run_id"], lab["model"], lab["dag_run"], lab["job"]) == (run_id, "tiny-llama", DAG_RUN,
                                                                              "birdbone")
    got = {(r["metric"]["step"], r["metric"]["wave"]): float(r["value"][1]) for r in dur}
    assert got == {(s, "none" if w is None else str(w)): d for s, w, _, d in PUSHES}

    ppl = {r["metric"]["wave"]: float(r["value"][1])
           for r in _query(prom, f'birdbone_perplexity{{{sel}, step="evaluate"}}')}
    assert ppl == {"1": 18.02, "2": 18.91}
    curve = _query(prom, f'birdbone_heal_curve_loss{{{sel}, wave="1"}}')
    assert sorted((int(r["metric"]["heal_step"]), float(r["value"][1])) for r in curve) == list(enumerate(HEAL_CURVE))
    dec = {r["metric"]["wave"]: (r["metric"]["verdict"], r["metric"]["action"])
           for r in _query(prom, f"birdbone_decision{{{sel}}}")}
    assert dec == {"1": ("accept", "continue"), "2": ("strike", "finish")}
    codes = {r["metric"]["wave"]: float(r["value"][1]) for r in _query(prom, f"birdbone_decision_code{{{sel}}}")}
    assert codes == {"1": 0.0, "2": 1.0}
    bpw = _query(prom, f'birdbone_bits_per_weight{{{sel}, wave="none"}}')
    assert [float(r["value"][1]) for r in bpw] == [16.01]
    other = _query(prom, f'birdbone_step_metric{{{sel}, metric="n_scored"}}')
    assert [float(r["value"][1]) for r in other] == [124.0]

    # every panel query of the dashboard, with its variables set to this run, returns data
    # (as Grafana does for regex matchers: regex-escape, then escape the backslashes for the PromQL string)
    subst = {f"${k}": re.escape(v).replace("\\", "\\\\")
             for k, v in (("run", run_id), ("model", "tiny-llama"), ("dag_run", DAG_RUN))}
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    for title, expr in exprs:
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, (title, expr)
        res = _query(prom, expr)
        assert res, f"panel {title!r}: no data for {expr}"
        assert all(math.isfinite(float(r["value"][1])) for r in res), (title, res)
    # the template variables (label_values(metric, label)) list this run, model and DAG run
    dash = json.loads(DASHBOARD.read_text())
    want = {"run_id": run_id, "model": "tiny-llama", "dag_run": DAG_RUN}
    for v in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["definition"])
        vals = _get(f"{prom}/api/v1/label/{m[2]}/values?" + urllib.parse.urlencode({"match[]": m[1]}))["data"]
        assert want[m[2]] in vals


def test_a_real_run_pushes_its_steps_verdicts_and_healing(tiny_wave_run, pushgateway):
    """The fixture run's own steps (birdbone compress -> the step functions -> push_step) filled the gateway
    with what the run directory records."""
    series = [s for s in _gateway_series(pushgateway) if s[1].get("run_id") == "tiny-waves"]
    def by(name):
        return {(lab["step"], lab["wave"]): (lab, v) for n, lab, v in series if n == name}
    assert {lab["model"] for _, lab, _ in series} == {"tiny-llama"}
    assert {lab["dag_run"] for _, lab, _ in series} == {"local"}
    waves = sorted(int(p.name) for p in (tiny_wave_run / "waves").iterdir() if (p / "decision.json").is_file())
    assert waves == [1, 2]
    durations = by("birdbone_step_duration_seconds")
    for k in waves:
        for step in ("prune", "heal", "evaluate", "decide"):
            assert (step, str(k)) in durations, (step, k)
        decision = json.loads((tiny_wave_run / "waves" / str(k) / "decision.json").read_text())
        lab, _ = by("birdbone_decision")[("decide", str(k))]
        assert (lab["verdict"], lab["action"]) == (decision["verdict"], decision["action"])
        assert by("birdbone_decision_code")[("decide", str(k))][1] == M.DECISION_CODES[decision["verdict"]]
        assert by("birdbone_perplexity")[("decide", str(k))][1] == pytest.approx(decision["metrics"]["ppl"])
        assert by("birdbone_kld")[("decide", str(k))][1] == pytest.approx(decision["metrics"]["kld"])
        curve = sorted((int(lab["heal_step"]), v) for n, lab, v in series
                       if n == "birdbone_heal_curve_loss" and lab["wave"] == str(k))
        assert [s for s, _ in curve] == list(range(3))                   # heal: {steps: 3}
        heal = json.loads((tiny_wave_run / "waves" / str(k) / "heal.json").read_text())["report"]
        assert by("birdbone_heal_loss")[("heal", str(k))][1] == pytest.approx(heal["loss_after"])
    assert ("prepare", "none") in durations


def test_ops_panels_show_failures_retries_running_and_stuck(pushgateway, start_prometheus, monkeypatch):
    """The Airflow callbacks' gauges through the real gateway and Prometheus: the operations panels list
    exactly the failed, retried, running and stuck tasks."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "pushgateway")
    job["static_configs"] = [{"targets": [pushgateway]}]
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    cfg["scrape_configs"] = [job]
    prom = start_prometheus(yaml.safe_dump(cfg))
    monkeypatch.setenv(signals.ENV_GATEWAY, pushgateway)
    dag_run = "scheduled__ops-panels"
    _push_task_signals(dag_run)
    _wait_query(prom, f'birdbone_task_state{{dag_run="{dag_run}"}}', n=5 * len(signals.STATES))
    panels = {}
    for title, expr in _dashboard_exprs():
        panels.setdefault(title, []).append(expr.replace("$dag_run", re.escape(dag_run).replace("\\", "\\\\")))

    def tasks(title: str) -> set[str]:
        return {r["metric"].get("task_id") for e in panels[title] for r in _query(prom, e)}
    assert tasks("Failed tasks") == {"wave_01.heal"}
    assert tasks("Retries") == {"wave_01.heal", "wave_01.prune"}
    stuck = next(t for t in panels if t.startswith("Stuck steps"))
    assert tasks(stuck) == {"wave_01.evaluate"}                      # 40 of 60 min; regrow: 1 min
    running = [r for e in panels["Running steps"] for r in _query(prom, e)]
    assert [float(r["value"][1]) for r in running] == [2.0]
    alerts = [r["metric"] for e in panels["Alerts"] for r in _query(prom, e)]
    assert any(a["alert"] == "nightly" and a["key"] == "m1" for a in alerts)


def test_finished_run_cleans_its_gateway_groups(pushgateway, run_dir, monkeypatch):
    """on_dag_run_end deletes the run's step and task groups, keeps its failed tasks' groups (until they
    are FAILED_RETENTION_S old) and every other run's groups, and records the run's outcome."""
    monkeypatch.setenv(signals.ENV_GATEWAY, pushgateway)
    monkeypatch.setenv(M.ENV_GATEWAY, f"http://{pushgateway}")
    monkeypatch.setenv(M.ENV_RUN_ID, "cleanup-run")
    for dag_run in ("manual__ends", "manual__other"):
        monkeypatch.setenv(M.ENV_DAG_RUN, dag_run)
        assert M.push_step(run_dir, "prune", 1, {"sparsity": 0.5}, 1.0)
        signals.on_success(_task_ctx(dag_run, "wave_01.prune"))
        signals.on_failure(_task_ctx(dag_run, "wave_01.heal"))

    def groups_of(dag_run: str) -> list[dict]:
        return [g for g in signals.groups(f"http://{pushgateway}") if g["labels"].get("dag_run") == dag_run]
    assert len(groups_of("manual__ends")) == 3
    ctx = {**_task_ctx("manual__ends", "x"), "dag_run": SimpleNamespace(run_id="manual__ends", state="failed")}
    signals.on_dag_run_end(ctx)
    left = groups_of("manual__ends")
    assert [(g["labels"]["task_id"], g["state"]) for g in left] == [("wave_01.heal", "failed")]
    assert len(groups_of("manual__other")) == 3
    outcome = [v for n, lab, v in _gateway_series(pushgateway) if n == "birdbone_dag_run_success"]
    assert outcome == [0.0]
    later = time.time() + signals.FAILED_RETENTION_S + 60           # a week on: old failures go too
    signals.delete_run_groups("manual__later", now=later)
    assert groups_of("manual__ends") == [] and len(groups_of("manual__other")) == 2
