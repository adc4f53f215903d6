"""Load benchmark: a sweep of many short trials, 4 at a time, on the embedded local Ray cluster.

``python -m regvi.sweep`` runs as a user would run it (a subprocess), on tiny simulated data
(300 cells × 50 genes) with tiny models (2–4 epochs, ASHA pruning after 1). Four trials run at once
on 2 CPUs (``cpus_per_worker: 0.5``; Tune's trial drivers request no CPU). While it runs, every
few seconds the benchmark samples the RSS of the sweep driver (Tune + the MLflow callback), of
Ray's long-lived processes (``gcs_server``, ``raylet``, dashboard and agents) and of Ray's worker
processes (psutil, the driver's process tree), together with the number of trials finished
(MLflow child runs with a status).

Afterwards it checks that every trial is accounted for, in three independent records that must
agree exactly: Tune's experiment state (every trial TERMINATED or ERROR), MLflow (one child run
per trial, FINISHED for completed and pruned trials, FAILED for failed ones) and the Optuna study
(one trial per Tune trial, none left RUNNING). Memory is flat when a linear fit of RSS against
trials finished has a slope of about 0 (MiB per 10 trials, with the fit's standard error), after
the first 5 trials (imports, JIT, caches).

Measured on 2 CPUs (50 trials, ~25 min: each trial starts about 8 Ray processes, such as Tune's
function actor and Train's controller, worker, placement-group cleaner and synchronisation
actor). With Ray's defaults the GCS kept every dead actor, worker and task event of the
driver's lifetime and grew ~16 MiB per 10 trials. regvi now starts the embedded Ray with those
caches bounded (``regvi.sweep.runner.GCS_ENV``): the GCS grows while they fill and is flat once
they are full (about 35 trials here). The fit is also reported over the second half of the
trials, where bounded caches show as a slope near 0.

Usage::

    .venv/bin/python benchmarks/bench_load.py                 # 50 trials, concurrency 4
    .venv/bin/python benchmarks/bench_load.py --trials 8      # a quick look

Writes ``benchmarks/results/bench_load.json``. ``tests/test_load.py`` (marker ``load``, not in
the default run) runs the same function and asserts on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_load.json"
WARMUP_TRIALS = 5
GROUPS = ("driver", "gcs_server", "raylet", "ray_other", "workers")


def write_inputs(workdir: Path, n_trials: int, concurrency: int, name: str = "load") -> Path:
    """Tiny simulated data + the sweep config; returns the config path."""
    import yaml

    import regvi

    workdir.mkdir(parents=True, exist_ok=True)
    a = regvi.simulate(n_cells=300, n_genes=50, n_cell_types=3, n_libraries=3, seed=0)
    del a.uns["truth"]
    a.write_h5ad(workdir / "sim.h5ad")
    cfg = {
        "name": name,
        "data": {"path": "sim.h5ad", "library_key": "library", "labels_key": "cell_type"},
        "model": {"n_layers": 1},
        "training": {"batch_size": 128, "n_epochs_kl_warmup": 1},
        "search": {
            "n_hidden": {"type": "categorical", "values": [8, 16]},
            "n_latent": {"type": "int", "low": 2, "high": 4},
            "lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3},
            "max_epochs": {"type": "categorical", "values": [2, 3, 4]},
        },
        "objective": {"metric": "validation_elbo", "mode": "min"},
        "search_algorithm": {"name": "optuna"},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "budget": {"trials": n_trials},
        "resources": {"workers": 1, "cpus_per_worker": 2 / concurrency},
        "evaluation": {"n_subsample": 200, "scib": False, "neighbourhood": False},
        "mlflow": {
            "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "experiment": name,
            "register_model": None,
        },
        "storage": {"path": str(workdir / "runs")},
        "seed": 0,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _group(proc) -> str | None:
    name = proc.name()
    if name in ("gcs_server", "raylet"):
        return name
    cmd = " ".join(proc.cmdline())
    if name.startswith("ray::") or cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "workers"
    if "ray" in cmd:
        return "ray_other"  # dashboard, dashboard agent, runtime-env agent, log monitor
    return None


def _psutil():
    import importlib

    try:
        return importlib.import_module("psutil")
    except ImportError:
        # ray[default] ships psutil in ray/thirdparty_files and puts it on sys.path when imported
        importlib.import_module("ray")
        return importlib.import_module("psutil")


def sample_rss(driver_pid: int) -> dict[str, float]:
    """RSS in MiB of the driver, Ray's system processes and its workers (process tree)."""
    psutil = _psutil()

    rss = dict.fromkeys(GROUPS, 0.0)
    n_workers = 0
    try:
        driver = psutil.Process(driver_pid)
        rss["driver"] = driver.memory_info().rss / 2**20
        children = driver.children(recursive=True)
    except psutil.Error:
        return {**rss, "n_worker_procs": 0}
    for p in children:
        try:
            group = _group(p)
            if group is None:
                continue
            rss[group] += p.memory_info().rss / 2**20
            n_workers += group == "workers"
        except psutil.Error:
            continue  # exited between listing and reading
    return {**rss, "n_worker_procs": n_workers}


def _finished_trials(tracking_uri: str, experiment: str) -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    runs = c.search_runs([exp.experiment_id], max_results=10_000)
    return sum("regvi.trial_id" in r.data.tags and "regvi.status" in r.data.tags for r in runs)


def fit_slope(x: list[float], y: list[float]) -> dict[str, float | None]:
    """Least-squares slope of y on x with its standard error, both × 10 (per 10 trials)."""
    x_arr, y_arr = np.asarray(x, float), np.asarray(y, float)
    if len(x_arr) < 3 or np.ptp(x_arr) == 0:
        return {"slope_mib_per_10_trials": None, "stderr_mib_per_10_trials": None}
    A = np.vstack([x_arr, np.ones_like(x_arr)]).T
    coef, *_ = np.linalg.lstsq(A, y_arr, rcond=None)
    resid = y_arr - A @ coef
    dof = max(1, len(x_arr) - 2)
    se = np.sqrt((resid @ resid / dof) / ((x_arr - x_arr.mean()) ** 2).sum())
    return {
        "slope_mib_per_10_trials": round(float(coef[0] * 10), 2),
        "stderr_mib_per_10_trials": round(float(se * 10), 2),
        "resid_sd_mib": round(float(resid.std()), 1),
    }


def audit(workdir: Path, name: str, n_trials: int) -> dict[str, Any]:
    """Trials as Tune, MLflow and Optuna recorded them."""
    import optuna
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    sweep_dir = workdir / "runs" / name
    tune_trials = ExperimentAnalysis(str(sweep_dir)).trials
    tune_status: dict[str, int] = {}
    for t in tune_trials:
        tune_status[t.status] = tune_status.get(t.status, 0) + 1
    c = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=10_000)
    children = [r for r in runs if "regvi.trial_id" in r.data.tags]
    status = [r.data.tags.get("regvi.status", "none") for r in children]
    ids = [r.data.tags["regvi.trial_id"] for r in children]
    dup_epochs = 0
    for r in children:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")]
        dup_epochs += len(steps) - len(set(steps))
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    optuna_states: dict[str, int] = {}
    for t in study.trials:
        optuna_states[t.state.name] = optuna_states.get(t.state.name, 0) + 1
    mlflow_finished = sum(r.info.status == "FINISHED" for r in children)
    # trials running at once: overlap of the child runs' [start, end] (created on trial start)
    events = sorted(
        [(r.info.start_time, 1) for r in children]
        + [(r.info.end_time or r.info.start_time, -1) for r in children],
        key=lambda e: (e[0], e[1]),
    )
    running = max_running = 0
    for _, step in events:
        running += step
        max_running = max(max_running, running)
    return {
        "trials_requested": n_trials,
        "tune_trials": len(tune_trials),
        "tune_status": tune_status,
        "completed": status.count("completed"),
        "pruned": status.count("pruned"),
        "failed": status.count("failed"),
        "unaccounted": len(children)
        - sum(status.count(s) for s in ("completed", "pruned", "failed")),
        "mlflow_child_runs": len(children),
        "mlflow_unique_trial_ids": len(set(ids)),
        "mlflow_finished": mlflow_finished,
        "mlflow_failed": sum(r.info.status == "FAILED" for r in children),
        "duplicate_epoch_logs": dup_epochs,
        "optuna_trials": len(study.trials),
        "optuna_states": optuna_states,
        "tune_ids_match_mlflow": sorted(t.trial_id for t in tune_trials) == sorted(ids),
        "max_trials_running_at_once": max_running,
    }


def run(
    n_trials: int = 50, concurrency: int = 4, workdir: Path | None = None, every_s: float = 3.0
) -> dict[str, Any]:
    """Run the load sweep, sample memory while it runs, audit it; returns the result dict."""
    name = "load"
    own_tmp = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="regvi_load_")) if own_tmp else Path(workdir)
    cfg = write_inputs(workdir, n_trials, concurrency, name)
    returncode, samples, wall = _run_sampled(workdir, cfg, name, every_s)
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "concurrency": concurrency,
        "cpus_per_worker": 2 / concurrency,
        "returncode": returncode,
        "wall_s": round(wall, 1),
        "workdir": str(workdir),
    }
    if returncode != 0:
        result["log_tail"] = (workdir / "sweep.log").read_text()[-4000:]
        return result
    result.update(audit(workdir, name, n_trials))
    result["trials_per_min"] = round(result["mlflow_child_runs"] / wall * 60, 2)
    result.update(_memory_summary(samples, n_trials))
    result["n_samples"] = len(samples)
    result["samples"] = samples
    return result


def _run_sampled(
    workdir: Path, cfg: Path, name: str, every_s: float
) -> tuple[int | None, list[dict[str, float]], float]:
    """Run ``python -m regvi.sweep cfg`` in ``workdir`` (log in ``sweep.log``), sampling the
    finished trials and the memory of its processes every ``every_s`` seconds: its return
    code, the samples and the wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONWARNINGS"] = "ignore"
    log = open(workdir / "sweep.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    samples: list[dict[str, float]] = []
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    done = 0
    try:
        while proc.poll() is None:
            time.sleep(every_s)
            try:
                done = _finished_trials(uri, name)
            except Exception:
                pass  # the store is being created
            samples.append(
                {"t_s": round(time.time() - t0, 1), "trials_done": done, **sample_rss(proc.pid)}
            )
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return proc.returncode, samples, time.time() - t0


def _memory_summary(samples: list[dict[str, float]], n_trials: int) -> dict[str, Any]:
    """Memory of the sweep: one row per 5 finished trials (first sample reaching it), slopes
    after warm-up and over the second half, and peaks by process group."""
    per5 = []
    for k in range(5, n_trials + 1, 5):
        s = next((s for s in samples if s["trials_done"] >= k), None)
        if s is not None:
            per5.append(
                {
                    "trials_done": k,
                    **{g: round(s[g], 1) for g in GROUPS},
                    "n_worker_procs": s["n_worker_procs"],
                    "t_s": s["t_s"],
                }
            )
    steady = [s for s in samples if WARMUP_TRIALS <= s["trials_done"] < n_trials and s["driver"]]
    x = [s["trials_done"] for s in steady]
    slopes = {g: fit_slope(x, [s[g] for s in steady]) for g in GROUPS}
    slopes["ray_system"] = fit_slope(
        x, [s["gcs_server"] + s["raylet"] + s["ray_other"] for s in steady]
    )
    slopes["workers_per_process"] = fit_slope(
        [s["trials_done"] for s in steady if s["n_worker_procs"]],
        [s["workers"] / s["n_worker_procs"] for s in steady if s["n_worker_procs"]],
    )
    late = [s for s in steady if s["trials_done"] >= n_trials // 2]
    return {
        "rss_mib_every_5_trials": per5,
        "rss_slopes_after_warmup": slopes,
        # bounded caches (the GCS's) fill early: their growth shows here as a slope near 0
        "rss_slopes_second_half": {
            g: fit_slope([s["trials_done"] for s in late], [s[g] for s in late])
            for g in ("driver", "gcs_server", "raylet", "ray_other")
        },
        "rss_peak_mib": {g: round(max(s[g] for s in samples), 1) for g in GROUPS},
    }


def print_table(r: dict[str, Any]) -> None:
    if r["returncode"] != 0:
        print(f"sweep failed (exit {r['returncode']}):\n{r.get('log_tail', '')}")
        return
    print(
        f"\nload sweep: {r['trials_requested']} trials, concurrency {r['concurrency']} "
        f"({r['cpus_per_worker']:g} CPU each), wall {r['wall_s']:.0f} s "
        f"({r['trials_per_min']:.1f} trials/min)"
    )
    rows = [
        ("trials requested", r["trials_requested"]),
        ("Tune trials", f"{r['tune_trials']} {r['tune_status']}"),
        ("completed / pruned / failed", f"{r['completed']} / {r['pruned']} / {r['failed']}"),
        (
            "MLflow child runs (unique trial ids)",
            f"{r['mlflow_child_runs']} ({r['mlflow_unique_trial_ids']})",
        ),
        ("MLflow FINISHED / FAILED", f"{r['mlflow_finished']} / {r['mlflow_failed']}"),
        ("epochs logged twice", r["duplicate_epoch_logs"]),
        ("Optuna study trials", f"{r['optuna_trials']} {r['optuna_states']}"),
        ("Tune trial ids == MLflow trial ids", r["tune_ids_match_mlflow"]),
        ("most trials running at once", r["max_trials_running_at_once"]),
    ]
    for k, v in rows:
        print(f"  {k:<38} {v}")
    print(
        f"\nRSS (MiB) every 5 finished trials\n  {'trials':>6} {'t s':>6} "
        + " ".join(f"{g:>10}" for g in GROUPS)
        + f" {'worker procs':>12}"
    )
    for s in r["rss_mib_every_5_trials"]:
        print(
            f"  {s['trials_done']:>6} {s['t_s']:>6.0f} "
            + " ".join(f"{s[g]:>10.1f}" for g in GROUPS)
            + f" {s['n_worker_procs']:>12}"
        )
    print(f"\nRSS slope vs trials finished (after {WARMUP_TRIALS}), MiB per 10 trials ± s.e.")
    for g, f in r["rss_slopes_after_warmup"].items():
        if f["slope_mib_per_10_trials"] is None:
            continue
        print(
            f"  {g:<20} {f['slope_mib_per_10_trials']:>8.2f} ± "
            f"{f['stderr_mib_per_10_trials']:.2f}   (residual s.d. {f['resid_sd_mib']} MiB)"
        )
    half = r["trials_requested"] // 2
    print(f"\nthe same over the second half (trials {half} to {r['trials_requested'] - 1})")
    for g, f in r.get("rss_slopes_second_half", {}).items():
        if f["slope_mib_per_10_trials"] is None:
            continue
        print(
            f"  {g:<20} {f['slope_mib_per_10_trials']:>8.2f} ± "
            f"{f['stderr_mib_per_10_trials']:.2f}   (residual s.d. {f['resid_sd_mib']} MiB)"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=None, help="keep the sweep here")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    r = run(args.trials, args.concurrency, args.workdir)
    print_table(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if r["returncode"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
