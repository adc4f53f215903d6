"""Disk full: the sweep's storage (``storage.path``, which also holds the MLflow artifact store,
the Optuna study, Tune's experiment state and every Ray Train checkpoint) lives on a real
size-limited filesystem, a 64 MiB tmpfs mounted for the test, and that filesystem fills up.

Two real failures, no mocks:

* the disk is already full: the sweep is refused before Ray or MLflow start, with the folder
  and "No space left on device" named, and nothing is written;
* the disk fills mid-sweep: once one trial is complete, another writer takes every free byte
  (and keeps taking whatever is freed), while a second trial is mid-training. The sweep must
  stop with exit status 3 and a message naming the folder and the cause. Every MLflow child
  run set FINISHED must hold all its artifacts, and its model must load and reproduce the
  logged latent. The interrupted trials are left unfinished, not marked failed. After the space
  is freed, ``--resume`` finishes every trial with one run each and every epoch logged once.

Mounting needs root (CAP_SYS_ADMIN); elsewhere the test is skipped and says so. Marked slow;
it runs in CI.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import regvi
from tests.test_sweep import _data, _env, _runs, _sweep, record_fault

pytestmark = pytest.mark.slow
DISK_MIB = 64


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB filesystem (tmpfs) at ``tmp_path/disk``; unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m,mode=0755", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs (needs root): {out.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


class Filler:
    """Another writer on the same disk: takes every free byte, and every byte freed later."""

    def __init__(self, disk: Path):
        self.path = disk / "filler.bin"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fill_once(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (2**20, 4096, 1):
                block = bytes(chunk)
                while True:
                    try:
                        os.write(fd, block)
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def start(self) -> None:
        self.fill_once()

        def keep_full():
            while not self._stop.wait(0.2):
                self.fill_once()

        self._thread = threading.Thread(target=keep_full, daemon=True)
        self._thread.start()

    def free(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.path.unlink(missing_ok=True)


def _config(tmp_path: Path, disk: Path, name: str) -> Path:
    """3 grid trials, 2 at a time: a 3-epoch one finishes while an 8-epoch one is training."""
    cfg = {
        "name": name,
        "data": {"path": "sim.h5ad", "library_key": "library", "labels_key": "cell_type"},
        "model": {"n_layers": 1, "n_hidden": 32, "n_latent": 4},
        "training": {"batch_size": 128, "n_epochs_kl_warmup": 2},
        "search": {"max_epochs": {"type": "categorical", "values": [3, 8, 4]}},
        "search_algorithm": {"name": "grid"},
        "objective": {"metric": "validation_elbo", "mode": "min"},
        "scheduler": {"name": "fifo"},
        "budget": {"trials": 3},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "evaluation": {"n_subsample": 300, "scib": False, "neighbourhood": False},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": name,
            "register_model": f"{name}-model",
        },
        "storage": {"path": str(disk / "runs")},  # MLflow artifacts go under it too
        "seed": 0,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


def _audit_finished(c, run, adata, epochs: int) -> None:
    """A FINISHED completed run: every artifact present, the model loads and reproduces the
    logged latent, every epoch logged exactly once."""
    import mlflow

    rid = run.info.run_id
    assert run.data.tags.get("regvi.status") == "completed"
    assert run.data.tags.get("regvi.logged_final") == "1"
    top = {a.path for a in c.list_artifacts(rid)}
    assert {"evaluation", "plots", "resolved_config.json"} <= top, top
    assert {a.path for a in c.list_artifacts(rid, "evaluation")} == {
        "evaluation/eval_latent.npy",
        "evaluation/eval_indices.npy",
    }
    assert {"plots/umap.png", "plots/training_curves.png"} <= {
        a.path for a in c.list_artifacts(rid, "plots")
    }
    local = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="evaluation"))
    latent, idx = np.load(local / "eval_latent.npy"), np.load(local / "eval_indices.npy")
    model = regvi.load(f"runs:/{rid}/model", adata=adata)
    np.testing.assert_array_equal(model.get_latent_representation(indices=idx), latent)
    steps = [m.step for m in c.get_metric_history(rid, "train_loss")]
    assert sorted(steps) == list(range(epochs)), steps
    assert run.data.metrics["epochs_trained"] == epochs


def test_full_disk_is_refused_before_any_work(tmp_path, small_disk):
    _data(tmp_path)
    cfg = _config(tmp_path, small_disk, "fulldisk")
    filler = Filler(small_disk)
    filler.fill_once()
    try:
        before = _listing(small_disk)
        out = _sweep(cfg, timeout=300)
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"cannot write the sweep folder {small_disk / 'runs' / 'fulldisk'}" in out.stderr
        assert "No space left on device" in out.stderr
        assert _listing(small_disk) == before  # nothing written, the probe removed again
        assert not (tmp_path / "mlflow.db").exists()  # MLflow never started
    finally:
        filler.free()


@pytest.mark.fault
def test_disk_full_mid_sweep_stops_cleanly_and_resumes(tmp_path, small_disk):
    import mlflow

    name = "diskfull"
    _data(tmp_path)
    cfg = _config(tmp_path, small_disk, name)
    sweep_dir = small_disk / "runs" / name
    adata = __import__("anndata").read_h5ad(tmp_path / "sim.h5ad")
    log = open(tmp_path / "sweep.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=tmp_path,
        env=_env(),
        stdout=log,
        stderr=subprocess.PIPE,
        text=True,
    )
    filler = Filler(small_disk)
    filled_at = None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            try:
                c, _, children = _runs(tmp_path, name)
            except Exception:
                continue
            done = [r for r in children if r.data.tags.get("regvi.status") == "completed"]
            training = [
                r
                for r in children
                if r not in done and c.get_metric_history(r.info.run_id, "train_loss")
            ]
            if done and training:  # one trial complete, another mid-training: fill the disk
                filler.start()
                filled_at = time.time()
                break
        assert filled_at is not None, "never saw one trial complete while another trained"
        _, err = proc.communicate(timeout=600)
        (tmp_path / "sweep.err").write_text(err)
        log.seek(0)
        output = log.read() + err
        stopped_after = time.time() - filled_at

        # 1. a clear error: exit status 3, the folder and the cause named, what to do next
        assert proc.returncode == 3, output[-4000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(
            f"error: storage.path: no space left for the sweep folder {sweep_dir}"
        )
        assert "No space left on device" in last and "--resume" in last, last
        assert stopped_after < 300, stopped_after  # stops, does not grind through retries

        # 2. no corrupt state: a FINISHED run is complete, an interrupted one is not FINISHED
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        c, parents, children = _runs(tmp_path, name)
        assert len(parents) == 1 and parents[0].info.status != "FINISHED"
        finished = [r for r in children if r.info.status == "FINISHED"]
        assert finished, "the trial completed before the fill is gone"
        for r in finished:
            _audit_finished(c, r, adata, int(r.data.params["max_epochs"]))
        for r in children:
            if r.info.status != "FINISHED":
                assert r.info.status == "RUNNING", r.info.status  # unfinished, not failed
                assert r.data.tags.get("regvi.status") is None, r.data.tags
        finished_before = {r.data.tags["regvi.trial_id"] for r in finished}
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        filler.free()

    # 3. space freed: --resume finishes every trial, one run each, nothing logged twice
    out = _sweep(cfg, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c, parents, children = _runs(tmp_path, name)
    ids = [r.data.tags["regvi.trial_id"] for r in children]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(ids) == len(set(ids)) == 3, ids
    assert sorted(int(r.data.params["max_epochs"]) for r in children) == [3, 4, 8]
    for r in children:
        assert r.info.status == "FINISHED"
        _audit_finished(c, r, adata, int(r.data.params["max_epochs"]))
        if r.data.tags["regvi.trial_id"] in finished_before:  # not re-logged by the resume
            assert len(c.get_metric_history(r.info.run_id, "epochs_trained")) == 1
    best = regvi.load(f"models:/{name}-model@champion", adata=adata)
    assert best.config.n_hidden == 32
    record_fault(
        "disk full mid-sweep (stops, then --resume)",
        filled_at,
        3,
        sum(r.data.tags.get("regvi.status") == "completed" for r in children),
    )
