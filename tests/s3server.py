"""A real S3 API over HTTP for tests (moto's ThreadedMotoServer on 127.0.0.1, a free port): `dvc`, boto3,
s3fs and Airflow's S3 hooks talk to it as to AWS or MinIO. Shared by the package and the DAG tests."""
from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(timeout: float = 30.0) -> Iterator[str]:
    """Start the server, wait until it answers, yield its URL, stop it."""
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{url} not up after {timeout}s") from None
                time.sleep(0.1)
        yield url
    finally:
        srv.stop()
