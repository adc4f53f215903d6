"""End-to-end sweeps on real Ray, real Optuna storage and real MLflow (SQLite).

Each sweep runs in a subprocess (as a user would run it), so a killed driver and ``--resume``
are tested for real. Marked slow; they run in CI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

import regvi
from tests.mlflow_server import free_port, mlflow_server, stop_server

pytestmark = pytest.mark.slow


def _data(tmp_path: Path) -> Path:
    a = regvi.simulate(n_cells=600, n_genes=100, n_cell_types=4, n_libraries=3, seed=0)
    del a.uns["truth"]
    path = tmp_path / "sim.h5ad"
    a.write_h5ad(path)
    return path


def _config(tmp_path: Path, name: str, **over) -> Path:
    cfg = {
        "name": name,
        "data": {"path": "sim.h5ad", "library_key": "library", "labels_key": "cell_type"},
        "model": {"n_layers": 1},
        "training": {"max_epochs": 4, "batch_size": 128, "n_epochs_kl_warmup": 2},
        "search": {
            "n_hidden": {"type": "categorical", "values": [16, 32]},
            "n_latent": {"type": "int", "low": 3, "high": 6},
        },
        "objective": {"metric": "validation_elbo", "mode": "min"},
        "scheduler": {"name": "fifo"},
        "budget": {"trials": 2},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        # no per-trial UMAP (~15 s of numba compile in each fresh worker) unless a test checks it
        "evaluation": {"n_subsample": 300, "scib": False, "neighbourhood": True, "umap": False},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": name,
            "register_model": f"{name}-model",
        },
        "storage": {"path": str(tmp_path / "runs")},
        "seed": 0,
    }
    for k, v in over.items():
        replace = k == "search" or (k == "data" and "modalities" in v)
        if isinstance(v, dict) and isinstance(cfg.get(k), dict) and not replace:
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def record_fault(fault: str, t_fault: float, runs_expected: int, runs_found: int) -> None:
    """Append one row of the fault table (``benchmarks/fault_table.py``) when it asks for it.

    Called at the end of a fault test, after its audit passed (so the fault was survived).
    """
    import json

    path = os.environ.get("REGVI_FAULT_REPORT")
    if not path:
        return
    row = {
        "fault": fault,
        "survived": True,
        "runs_expected": runs_expected,
        "runs_lost": runs_expected - runs_found,
        "finish_after_fault_s": round(time.time() - t_fault, 1),
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _sweep(config: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "regvi.sweep", str(config), *args],
        cwd=config.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _runs(tmp_path: Path, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regvi.role") == "sweep"]
    children = [r for r in runs if "regvi.trial_id" in r.data.tags]
    return c, parents, children


def test_sweep_end_to_end_with_scib(tmp_path):
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "e2e",
        evaluation={"scib": True, "umap": True},
        scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2},
        budget={"trials": 3},
        search={  # capacity and which key conditions the decoder (a covariate purpose)
            "n_hidden": {"type": "categorical", "values": [16, 32]},
            "n_latent": {"type": "int", "low": 3, "high": 6},
            "nn_conditioning_covariate_keys": {
                "type": "categorical",
                "values": [None, "library", ["library", "cell_type"]],
            },
        },
    )
    out = _sweep(cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in out.stdout
    assert re.search(r"#/experiments/\d+\?workflowType=machine_learning", out.stdout)
    c, parents, children = _runs(tmp_path, "e2e")
    assert len(parents) == 1 and len(children) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["regvi.trial_id"] for r in children}) == 3
    completed = [r for r in children if r.data.tags.get("regvi.status") == "completed"]
    assert completed
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    adata = __import__("anndata").read_h5ad(tmp_path / "sim.h5ad")
    for run in completed:
        m = run.data.metrics
        assert {"scib_total", "scib_bio", "scib_batch", "validation_elbo"} <= set(m)
        assert {"scib_total_stable", "scib_kmeans_ari_mean"} <= set(m)
        assert abs(m["scib_total_stable"] - m["scib_total"]) <= 0.6 * 2 / 5  # NMI and ARI moved
        assert any(k.startswith("nc_") for k in m)
        assert m["eval_in_pool"] == 1.0  # evaluated by the sweep's warm evaluators
        steps = [x.step for x in c.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == sorted(set(steps)) and len(steps) >= 2  # one value per epoch, no duplicates
        assert "n_hidden" in run.data.params
        local = Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation")
        )
        latent, idx = np.load(local / "eval_latent.npy"), np.load(local / "eval_indices.npy")
        model = regvi.load(f"runs:/{run.info.run_id}/model", adata=adata)
        np.testing.assert_array_equal(model.get_latent_representation(indices=idx), latent)
        # the trial's model was built with the sampled decoder-conditioning keys
        searched = run.data.params["nn_conditioning_covariate_keys"]
        expected = {"None": [], "library": ["library"]}.get(searched, ["library", "cell_type"])
        assert model.registry.purposes["nn_conditioning"] == expected, searched
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/umap.png", "plots/training_curves.png"} <= arts
    best = regvi.load("models:/e2e-model@champion")
    assert best.config.n_latent in range(3, 7)
    summary = {a.path for a in c.list_artifacts(parents[0].info.run_id, "summary")}
    assert "summary/trials.csv" in summary
    if len(completed) > 1:
        assert {"summary/scib_table.png", "summary/pareto_bio_batch.png"} <= summary
    assert parents[0].data.tags.get("best_trial_id")
    # the same sweep again without --resume is refused, nothing written
    again = _sweep(cfg)
    assert again.returncode == 2 and "--resume" in again.stderr


@pytest.mark.fault
def test_diverging_trial_is_marked_failed_and_sweep_continues(tmp_path):
    t0 = time.time()
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "nan",
        search={"lr": {"type": "categorical", "values": [1e-3, 1e6]}},
        search_algorithm={"name": "grid"},
        evaluation={"neighbourhood": False},
    )
    out = _sweep(cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, _, children = _runs(tmp_path, "nan")
    status = {r.data.params["lr"]: r.data.tags.get("regvi.status") for r in children}
    assert status == {"0.001": "completed", "1000000.0": "failed"}
    failed = next(r for r in children if r.data.params["lr"] == "1000000.0")
    assert "diverged" in failed.data.tags["regvi.error"] and failed.info.status == "FAILED"
    record_fault("trial produces NaN/inf (marked failed, sweep goes on)", t0, 2, len(children))


@pytest.mark.fault
def test_killed_sweep_resumes_without_duplicates(tmp_path):
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "resume",
        budget={"trials": 3},
        evaluation={"neighbourhood": False},
        training={"max_epochs": 6},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=tmp_path,
        # Tune saves its state once at the start and then not again before the kill: the
        # finished trial is restored as not started (the worst case of Tune's periodic save)
        env={**_env(), "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    done_before: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        time.sleep(3)
        try:
            _, _, children = _runs(tmp_path, "resume")
        except Exception:
            continue
        done_before = {
            r.data.tags["regvi.trial_id"]
            for r in children
            if r.data.tags.get("regvi.status") == "completed"
        }
        if done_before:
            break
    assert done_before, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    t_kill = time.time()
    proc.wait()
    subprocess.run(["ray", "stop", "--force"], capture_output=True, env=_env())
    out = _sweep(cfg, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c, parents, children = _runs(tmp_path, "resume")
    ids = [r.data.tags["regvi.trial_id"] for r in children]
    assert len(parents) == 1
    assert len(ids) == len(set(ids)) == 3  # exactly one MLflow run per trial
    for r in children:
        if r.data.tags["regvi.trial_id"] in done_before:
            # a finished trial was not re-run: its model was logged once
            assert r.data.tags.get("regvi.status") == "completed"
            assert len(c.get_metric_history(r.info.run_id, "epochs_trained")) == 1
            # Tune ran it again: its final result came from its checkpoint, not re-evaluated
            (result_file,) = (tmp_path / "runs" / "resume").glob(
                f"*{r.data.tags['regvi.trial_id']}*/result.json"
            )
            last = json.loads(result_file.read_text().splitlines()[-1])
            assert last.get("replayed_final") == 1.0, last
    study = optuna.load_study(
        study_name="resume", storage=f"sqlite:///{tmp_path / 'runs' / 'resume' / 'optuna.db'}"
    )
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states, states  # an Optuna trial orphaned by the kill is failed
    kept = [t for t in study.trials if not t.user_attrs.get("regvi.orphaned_by_resume")]
    assert len(kept) == 3 and all(t.state.name == "COMPLETE" for t in kept), states
    assert all(
        r.data.tags.get("regvi.status") in ("completed", "failed", "pruned") for r in children
    )
    record_fault("sweep driver SIGKILLed, then --resume", t_kill, 3, len(set(ids)))


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        int(line.split()[0])
        for line in out.splitlines()[1:]
        if "RayTrainWorker" in line and "grep" not in line
    ]


@pytest.mark.fault
def test_killed_train_worker_is_retried_from_checkpoint(tmp_path):
    EPOCHS = 20
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "workerkill",
        budget={"trials": 1},
        training={"max_epochs": EPOCHS},
        evaluation={"neighbourhood": False},
        search={"n_hidden": {"type": "categorical", "values": [256]}},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = False
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not killed:
        time.sleep(0.5)  # epochs take well under a second here
        try:
            c, _, children = _runs(tmp_path, "workerkill")
        except Exception:
            continue
        if children and len(c.get_metric_history(children[0].info.run_id, "train_loss")) >= 3:
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)  # a real worker process death mid-trial
                killed = True
                t_kill = time.time()
    assert killed, "never saw a running Train worker to kill"
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    c, _, children = _runs(tmp_path, "workerkill")
    assert len(children) == 1
    run = children[0]
    assert run.data.tags.get("regvi.status") == "completed", out[-3000:]
    assert run.data.metrics["epochs_trained"] == EPOCHS  # restarted from its checkpoint, not from 0
    assert run.data.metrics["resumed_optimizer_state"] == 1.0  # with Adam's moments
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(EPOCHS))  # each epoch logged exactly once across the restart
    plots = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert "plots/training_curves.png" in plots and "plots/umap.png" not in plots  # umap: false
    record_fault("Ray Train worker SIGKILLed mid-trial", t_kill, 1, len(children))


@pytest.mark.fault
def test_mlflow_server_restart_mid_sweep_loses_nothing(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 as the tracking URI; it goes down mid-sweep and comes
    back: logging is retried, nothing lost, and the best model is registered through it."""
    from mlflow.tracking import MlflowClient

    EPOCHS = 60
    _data(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    cfg = _config(
        tmp_path,
        "outage",
        # enough epochs that the 20 s outage falls inside training, as on a real cluster
        training={"max_epochs": EPOCHS},
        evaluation={"neighbourhood": False},
        mlflow={"tracking_uri": uri, "experiment": "outage", "register_model": "srv"},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    c = MlflowClient(tracking_uri=uri)
    try:
        down_at = None
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                exp = c.get_experiment_by_name("outage")
                runs = c.search_runs([exp.experiment_id]) if exp else []
                child = [r for r in runs if "regvi.trial_id" in r.data.tags]
                if child and len(c.get_metric_history(child[0].info.run_id, "train_loss")) >= 2:
                    stop_server(server)  # the outage: trials keep training, the driver must wait
                    down_at = time.time()
                    break
            except Exception:
                continue
        assert down_at is not None, "the sweep never logged two epochs"
        time.sleep(20)
        server = mlflow_server(tmp_path, port)  # same port, same store
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        exp = c.get_experiment_by_name("outage")
        runs = c.search_runs([exp.experiment_id])
        children = [r for r in runs if "regvi.trial_id" in r.data.tags]
        assert len(children) == 2  # one run per trial, no duplicate from a retried create
        for run in children:
            assert run.data.tags.get("regvi.status") == "completed", out[-3000:]
            steps = [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")]
            assert sorted(set(steps)) == list(range(EPOCHS)), steps  # every epoch, logged once
            assert len(steps) == EPOCHS
            assert "validation_elbo" in run.data.metrics and "epochs_trained" in run.data.metrics
        import mlflow

        mlflow.set_tracking_uri(uri)
        model = regvi.load("models:/srv@champion")  # the registry, through the server
        assert model.config.n_hidden in (16, 32)
        record_fault("MLflow server stopped 20 s, restarted", down_at, 2, len(children))
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_server(server)


def test_two_cpu_workers_per_trial(tmp_path):
    _data(tmp_path)
    cfg = _config(
        tmp_path,
        "ddp",
        budget={"trials": 1},
        resources={"workers": 2},
        # evaluated in the trial's own worker (no evaluator pool) with the low-count metrics
        evaluation={"neighbourhood": False, "pool": False, "lowcount": True},
        training={"max_epochs": 3},
    )
    out = _sweep(cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, _, children = _runs(tmp_path, "ddp")
    assert len(children) == 1
    assert children[0].data.tags.get("regvi.status") == "completed"
    m = children[0].data.metrics
    assert m["world_size"] == 2  # Lightning DDP over 2 Ray Train workers
    assert m["eval_in_pool"] == 0.0
    assert 0 <= m["lowcount_q0.5_knn_preservation"] <= 1 and "eval_seconds_lowcount" in m


def test_multimodal_sweep_logs_joint_evaluation_and_attribution(tmp_path):
    data = regvi.simulate_multiome(
        n_cells=500, n_genes=60, n_peaks=200, n_cell_types=4, n_libraries=3, seed=1
    )
    for m, a in data.items():
        a.uns.pop("truth", None)
        a.write_h5ad(tmp_path / f"sim_{m}.h5ad")
    cfg = _config(
        tmp_path,
        "mm",
        data={
            "modalities": {"rna": "sim_rna.h5ad", "atac": "sim_atac.h5ad"},
            "library_key": "library",
            "labels_key": "cell_type",
        },
        model={"n_hidden": {"atac": 16, "rna": 32}},
        search={
            "n_latent.rna": {"type": "categorical", "values": [3, 4]},
            "lr_multipliers.atac": {"type": "loguniform", "low": 0.5, "high": 2.0},
        },
        evaluation={"scib": True, "n_subsample": 500, "umap": True},
        # final-only objective with Optuna: scib Total averaged over KMeans starts
        objective={"metric": "scib_total_stable", "mode": "max"},
    )
    out = _sweep(cfg)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c, parents, children = _runs(tmp_path, "mm")
    assert len(parents) == 1 and len(children) == 2
    assert "atac:500x200+rna:500x60" == parents[0].data.tags["dataset_shape"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run in children:
        assert run.data.tags["regvi.status"] == "completed"
        m = run.data.metrics
        assert {"scib_total", "validation_reconstruction_atac", "validation_kl_z_rna"} <= set(m)
        assert {"attribution_median_atac", "attribution_log2_ratio_median"} <= set(m)
        assert m["attribution_share_led_atac"] + m["attribution_share_led_rna"] == pytest.approx(1)
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
        assert {"plots/attribution.png", "plots/umap.png"} <= arts
        model = regvi.load(f"runs:/{run.info.run_id}/model", adata=data)
        assert isinstance(model, regvi.RegMultiVI)
        assert model.config.configs["rna"].n_latent == int(run.data.params["n_latent.rna"])
        lr_atac = float(run.data.params["lr_multipliers.atac"])
        assert model.config.lr_multipliers["atac"] == pytest.approx(lr_atac)
        local = Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation")
        )
        latent, idx = np.load(local / "eval_latent.npy"), np.load(local / "eval_indices.npy")
        np.testing.assert_array_equal(model.get_latent_representation(indices=idx), latent)
    import optuna

    study = optuna.load_study(
        study_name="mm", storage=f"sqlite:///{tmp_path / 'runs' / 'mm' / 'optuna.db'}"
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    stable = sorted(r.data.metrics["scib_total_stable"] for r in children)
    assert sorted(t.value for t in done) == stable
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{children[0].info.run_id}/model")
    joint = pyfunc.predict(data)  # dict modality -> AnnData in, joint latent out
    assert joint.shape[0] == 500


def test_sweep_refuses_bad_data_keys_before_any_work(tmp_path):
    _data(tmp_path)
    cfg = _config(tmp_path, "badkey", data={"library_key": "lane"})
    out = _sweep(cfg)
    assert out.returncode == 2
    assert "data check" in out.stderr and "'lane'" in out.stderr
    assert not (tmp_path / "runs" / "badkey").exists()
    assert not (tmp_path / "mlflow.db").exists()
