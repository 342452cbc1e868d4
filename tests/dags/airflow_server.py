"""A real Airflow 3 for tests: api-server, scheduler, dag-processor and triggerer as separate processes on
SQLite, everything bound to 127.0.0.1 on free ports, simple auth manager with one admin user.
(`airflow standalone` would open serve-logs listeners on all interfaces: not used.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PASSWORD = "birdbone-test-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowServer:
    def __init__(self, home: Path, dags_folder: Path, extra_env: dict | None = None):
        self.home, self.port = Path(home), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home.mkdir(parents=True, exist_ok=True)
        pw = self.home / "passwords.json"
        pw.write_text(json.dumps({"admin": PASSWORD}))
        self.env = {**os.environ, **(extra_env or {}),
                    "AIRFLOW_HOME": str(self.home),
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                    "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                    "AIRFLOW__CORE__PARALLELISM": "4",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                    "AIRFLOW__API__BASE_URL": self.url,
                    "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(self.port),
                    "AIRFLOW__API_AUTH__JWT_SECRET": "birdbone-test-jwt-secret-" + "0123456789abcdef" * 4,
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw),
                    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
                    # parse each DAG file once: the DAGs do not change during a test, and re-parsing
                    # every 30 s (the default) takes a core's worth of seconds from the runs
                    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
                    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())}
        self.procs: dict[str, subprocess.Popen] = {}
        self._token: str | None = None

    def _airflow(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).with_name("airflow")), *args]

    def start(self, timeout: float = 180) -> "AirflowServer":
        subprocess.run(self._airflow("db", "migrate"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # GPU steps queue on the h100 pool (one slot per GPU), as in a deployment
        subprocess.run(self._airflow("pools", "set", "h100", "2", "H100 GPUs"), env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cmds = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port)],
                "scheduler": ["scheduler", "--skip-serve-logs"],
                "dag-processor": ["dag-processor"],
                "triggerer": ["triggerer", "--skip-serve-logs"]}
        for name, args in cmds.items():
            log = open(self.home / f"{name}.log", "w")
            self.procs[name] = subprocess.Popen(self._airflow(*args), env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            try:
                h = self.get("/api/v2/monitor/health", auth=False)
                if h.get("metadatabase", {}).get("status") == "healthy" and \
                        h.get("scheduler", {}).get("status") == "healthy":
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(2)
        raise TimeoutError(f"Airflow did not become healthy in {timeout}s\n{self.logs_tail()}")

    def _check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"Airflow components exited: {dead}\n{self.logs_tail()}")

    def logs_tail(self, n: int = 30) -> str:
        out = []
        for name in self.procs:
            f = self.home / f"{name}.log"
            lines = f.read_text(errors="replace").splitlines()[-n:] if f.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # ---- REST ---------------------------------------------------------------------------------------
    def token(self) -> str:
        if self._token is None:
            r = self.request("POST", "/auth/token", {"username": "admin", "password": PASSWORD}, auth=False)
            self._token = r["access_token"]
        return self._token

    def request(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def get(self, path: str, auth: bool = True) -> dict:
        return self.request("GET", path, auth=auth)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            try:
                return self.get(f"/api/v2/dags/{dag_id}")
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
            time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} not parsed in {timeout}s\n{self.logs_tail()}")

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout: float = 900) -> dict[str, str]:
        deadline = time.time() + timeout
        states: dict[str, str] = {}
        while time.time() < deadline:
            self._check_alive()
            states = {r: self.get(f"/api/v2/dags/{dag_id}/dagRuns/{r}")["state"] for r in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                return states
            time.sleep(3)
        raise TimeoutError(f"runs not finished in {timeout}s: {states}\n{self.logs_tail()}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
        """task id -> (state, try number)."""
        tis = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=200")["task_instances"]
        return {t["task_id"]: (t["state"], t["try_number"]) for t in tis}

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        return {k: state for k, (state, _) in self.task_instances(dag_id, run_id).items()}
