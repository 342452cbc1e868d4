"""Real services for the ops tests, bound to 127.0.0.1 on free ports and stopped afterwards, and one\nreal two-wave run of the fixture model that pushes its step metrics to the Pushgateway."""
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from s3server import moto_s3
from tiny_recipes import tiny_recipe, waves


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout}s")


@pytest.fixture(scope="session")
def free_port():
    return _free_port


@pytest.fixture(scope="session")
def wait_http():
    return _wait_http


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 API over real HTTP (a `dvc` subprocess talks to it like to AWS or MinIO)."""
    with moto_s3() as url:
        yield url


def _start(cmd: list[str], log_path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory):
    """The Debian `prometheus-pushgateway` on a free port: yields host:port."""
    exe = shutil.which("prometheus-pushgateway")
    if exe is None:
        pytest.skip("prometheus-pushgateway not installed (make sysdeps)")
    port = _free_port()
    proc = _start([exe, f"--web.listen-address=127.0.0.1:{port}"],
                  tmp_path_factory.mktemp("pushgateway") / "log.txt")
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", proc)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def start_prometheus(tmp_path_factory):
    """Starts the Debian `prometheus` with a given config text; yields its base URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (make sysdeps)")
    procs = []

    def start(config_text: str) -> str:
        d = tmp_path_factory.mktemp("prometheus")
        (d / "prometheus.yml").write_text(config_text)
        port = _free_port()
        proc = _start([exe, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                       f"--web.listen-address=127.0.0.1:{port}"], d / "log.txt")
        procs.append(proc)
        _wait_http(f"http://127.0.0.1:{port}/-/ready", proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        _stop(p)


WAVES_RECIPE = tiny_recipe("ops-waves", {"method": "magnitude", "sparsity": 0.5},
                           waves=waves(0.25, {"method": "blockwise", "steps": 3, "lr": 1.0e-3}, threshold=1.0, patience=2))


@pytest.fixture(scope="session")
def tiny_wave_run(tmp_path_factory, tiny_path, request):
    """`birdbone compress` of the fixture in two waves (block-wise healing), every step pushing its
    metrics to the test Pushgateway when there is one (run id = directory name "tiny-waves", dag_run "local")."""
    from birdbone_core.cli import main as birdbone

    try:
        pushgateway = request.getfixturevalue("pushgateway")
    except pytest.skip.Exception:          # no gateway installed: the artifact tests still run
        pushgateway = None

    d = tmp_path_factory.mktemp("ops-run")
    (d / "recipe.yaml").write_text(WAVES_RECIPE)
    model = d / "models" / "tiny-llama"          # a private copy: the pull test hides it to play "elsewhere"
    shutil.copytree(tiny_path, model)
    run = d / "tiny-waves"
    saved = {k: os.environ.pop(k, None) for k in ("BIRDBONE_PUSHGATEWAY", "BIRDBONE_RUN_ID", "AIRFLOW_CTX_DAG_RUN_ID")}
    if pushgateway:
        os.environ["BIRDBONE_PUSHGATEWAY"] = pushgateway
    try:
        assert birdbone(["compress", str(model), "-r", str(d / "recipe.yaml"), "-o", str(run)]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    return run
