"""A 2-node local Ray cluster (``ray start`` head + worker on 127.0.0.1) runs a sweep whose
trials land on both nodes. Marked slow; runs in CI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_sweep import _config, _data, _env, _runs, _sweep, record_fault

pytestmark = [pytest.mark.slow, pytest.mark.fault]
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


def _worker_node_raylet() -> int | None:
    """PID of the second node's raylet (started with the worker port range 12000-12999)."""
    out = subprocess.run(["pgrep", "-f", "raylet.*min_worker_port=12000"], capture_output=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def test_node_stopped_mid_sweep_loses_nothing(tmp_path, two_node_cluster):
    """SIGKILL the second node's raylet while both trials train: the sweep finishes on the
    head node, every trial has one completed MLflow run with every epoch logged once."""
    import mlflow
    import numpy as np

    import regvi

    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "nodeloss",
        budget={"trials": 2},
        evaluation={"neighbourhood": False},
        training={"max_epochs": 15},
        search={"n_hidden": {"type": "categorical", "values": [128, 256]}},
    )
    env = {**two_node_cluster}
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg), "--address", f"127.0.0.1:{PORT}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed_at = None
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        time.sleep(1)
        try:
            c, _, children = _runs(tmp_path, "nodeloss")
        except Exception:
            continue
        epochs = [len(c.get_metric_history(r.info.run_id, "train_loss")) for r in children]
        if len(epochs) == 2 and min(epochs) >= 2:
            pid = _worker_node_raylet()
            if pid:
                os.kill(pid, signal.SIGKILL)  # the node dies with everything on it
                killed_at = time.time()
    assert killed_at is not None, "never saw both trials training"
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-4000:]
    c, parents, children = _runs(tmp_path, "nodeloss")
    assert len(parents) == 1 and len(children) == 2  # exactly one run per trial
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    adata = __import__("anndata").read_h5ad(tmp_path / "sim.h5ad")
    for run in children:
        assert run.data.tags.get("regvi.status") == "completed", out[-3000:]
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(15)), steps  # every epoch once, across the restart
        model = regvi.load(f"runs:/{run.info.run_id}/model", adata=adata)
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="evaluation"
        )
        latent = np.load(Path(local) / "eval_latent.npy")
        idx = np.load(Path(local) / "eval_indices.npy")
        np.testing.assert_array_equal(model.get_latent_representation(indices=idx), latent)
    record_fault("node of a 2-node cluster SIGKILLed mid-sweep", killed_at, 2, len(children))
