"""A 2-node local Ray cluster (``ray start`` head + worker on 127.0.0.1) runs a sweep whose
trials land on both nodes. Marked slow; runs in CI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_sweep import _config, _data, _env, _runs, _sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
PORT = "6391"


@pytest.fixture
def two_node_cluster():
    env = {**_env(), "RAY_AUTH_MODE": "token"}
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)
    out = subprocess.run(
        ["bash", str(REPO / "cluster" / "start_local_cluster.sh"), PORT, "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    yield env
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)


def test_sweep_on_two_node_cluster(tmp_path, two_node_cluster):
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "cluster",
        budget={"trials": 2},
        evaluation={"neighbourhood": False},
        training={"max_epochs": 3},
    )
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        out = _sweep(cfg, "--address", f"127.0.0.1:{PORT}")
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, parents, children = _runs(tmp_path, "cluster")
    assert len(parents) == 1 and len(children) == 2
    nodes = {r.data.tags.get("regvi.worker_node") for r in children}
    assert None not in nodes and len(nodes) == 2, nodes  # one trial per 1-CPU node
