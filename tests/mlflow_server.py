"""A real ``mlflow server`` on 127.0.0.1 for the tests of the server path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifacts); waits until up."""
    from mlflow.tracking import MlflowClient

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server_artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    c = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
    for _ in range(90):
        try:
            c.search_experiments()
            return server
        except Exception:
            time.sleep(1)
    raise RuntimeError("mlflow server did not start")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
