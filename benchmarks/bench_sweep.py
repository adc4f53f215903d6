"""Sweep efficiency: where a sweep's wall time goes, and what ASHA saves over FIFO.

Two real sweeps (``python -m regvi.sweep``, embedded Ray, SQLite MLflow) over the same search
space on the bundled Kang PBMC subset (4,030 cells × 2,000 HVGs), one trial at a time on all
CPUs (``cpus_per_worker`` = ``--cpus``), Optuna TPE with the same seed — so both schedulers
see the same first trials (TPE's random start-up phase) and differ only in pruning:

* **FIFO**: every trial trains ``--epochs`` epochs (no early stopping), then evaluation;
* **ASHA** (grace period ``--grace``, reduction factor 2) prunes on the per-epoch validation
  ELBO.

From MLflow (the record of the sweep) the script reads, per trial, the sum of the per-epoch
``epoch_time_s`` (time inside training + validation steps), the evaluation's
``eval_seconds_*`` and the number of epochs trained, and reports:

* the share of sweep wall time spent in training steps (all trials' epoch time / wall time of
  the ``python -m regvi.sweep`` process), in evaluation, and the rest (Ray start, Train
  worker start-up, data loading, checkpoints, MLflow logging); goal ≥ 0.9 for trials ≥ 30 s;
* ASHA vs FIFO: best objective, total training compute (epochs, seconds), and the compute each
  needed until its best-so-far objective first came within ``--tolerance`` of FIFO's best.

Usage
-----
::

    .venv/bin/python benchmarks/bench_sweep.py                 # ~12 min on 2 cores
    .venv/bin/python benchmarks/bench_sweep.py --trials 4 --epochs 20

Writes ``benchmarks/results/bench_sweep.json``.
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

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "bench_sweep.json"


def sweep_config(name: str, scheduler: str, args: argparse.Namespace, storage: Path) -> str:
    sched = (
        f"{{name: asha, grace_period: {args.grace}, reduction_factor: 2}}"
        if scheduler == "asha"
        else "{name: fifo}"
    )
    return f"""
name: {name}
data: {{path: "bundled:kang_pbmc_small", library_key: condition, labels_key: cell_type}}
model: {{n_layers: 1}}
training:
  max_epochs: {args.epochs}
  batch_size: 128
  n_epochs_kl_warmup: 10
  early_stopping: false
search:
  n_hidden: {{type: categorical, values: [64, 128, 256]}}
  n_latent: {{type: int, low: 8, high: 32}}
  lr: {{type: loguniform, low: 0.0003, high: 0.003}}
  dispersion_prior_mean: {{type: loguniform, low: 0.1, high: 1.0}}
objective: {{metric: validation_elbo, mode: min}}
search_algorithm: {{name: optuna}}
scheduler: {sched}
budget: {{trials: {args.trials}}}
resources: {{workers: 1, cpus_per_worker: {args.cpus}}}
evaluation: {{n_subsample: 2000, scib: true, neighbourhood: true}}
mlflow: {{experiment: {name}}}
storage: {{path: {storage}}}
seed: 0
"""


def read_trials(uri: str, experiment: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=10_000)
    trials = []
    for r in runs:
        if "regvi.trial_id" not in r.data.tags:
            continue  # the parent (sweep) run
        epochs = c.get_metric_history(r.info.run_id, "epoch_time_s")
        elbo = c.get_metric_history(r.info.run_id, "validation_elbo")
        m = r.data.metrics
        trials.append(
            {
                "trial_id": r.data.tags["regvi.trial_id"],
                "status": r.data.tags.get("regvi.status", r.info.status.lower()),
                "start_ms": r.info.start_time,
                "end_ms": r.info.end_time,
                "epochs": len(epochs),
                "train_s": float(sum(e.value for e in epochs)),
                # whole evaluation (metrics, UMAP, plots) when recorded, else its metric parts
                "eval_s": float(
                    m.get("eval_seconds_total")
                    or sum(v for k, v in m.items() if k.startswith("eval_seconds_"))
                ),
                "eval_warm": bool(m.get("eval_warm", 0.0)),
                "stages_s": {
                    k: m[k]
                    for k in (
                        "setup_workers_s",
                        "setup_imports_s",
                        "setup_data_s",
                        "setup_model_s",
                        "training_wall_s",
                    )
                    if k in m
                },
                "eval_in_pool": bool(m.get("eval_in_pool", 0.0)),
                "best_validation_elbo": min((e.value for e in elbo), default=float("nan")),
                "validation_elbo": m.get("validation_elbo", float("nan")),
                "params": dict(r.data.params),
            }
        )
    return sorted(trials, key=lambda t: t["start_ms"])


STAGES = (
    ("setup_workers_s", "trial start → Train worker running (controller, worker, torch init)"),
    ("setup_imports_s", "imports in the worker"),
    ("setup_data_s", "read the data"),
    ("setup_model_s", "build the model"),
    ("epochs_s", "training + validation steps (sum of epoch_time_s)"),
    ("between_epochs_s", "between epochs (reports, checkpoints)"),
    ("eval_s", "evaluation (metrics, UMAP, plots, transfer)"),
    ("rest_s", "the rest (final checkpoint + report, MLflow logging, shutdown)"),
)


def stage_means(done: list[dict]) -> dict[str, float]:
    """Mean seconds per completed trial in each stage of its wall time (MLflow run start → end)."""
    rows = []
    for t in done:
        st = t["stages_s"]
        if "training_wall_s" not in st:
            continue
        wall = (t["end_ms"] - t["start_ms"]) / 1000
        row = {k: st.get(k, 0.0) for k, _ in STAGES[:4]}
        row["epochs_s"] = t["train_s"]
        row["between_epochs_s"] = max(0.0, st["training_wall_s"] - t["train_s"])
        row["eval_s"] = t["eval_s"]
        row["rest_s"] = wall - sum(row.values())
        row["wall_s"] = wall
        rows.append(row)
    return {k: _mean(r[k] for r in rows) for k in rows[0]} if rows else {}


def _mean(values) -> float:
    v = list(values)
    return sum(v) / len(v) if v else float("nan")


def run_sweep(name: str, scheduler: str, args: argparse.Namespace, work: Path) -> dict:
    d = work / name
    d.mkdir(parents=True)
    cfg = d / f"{name}.yaml"
    cfg.write_text(sweep_config(name, scheduler, args, d / "runs"))
    uri = f"sqlite:///{d / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    print(f"sweep {name} ({scheduler}, {args.trials} trials × ≤ {args.epochs} epochs)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "regvi.sweep", str(cfg)],
        cwd=d,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    (d / "sweep.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed ({proc.returncode}); see {d / 'sweep.log'}")
    trials = read_trials(uri, name)
    train = sum(t["train_s"] for t in trials)
    ev = sum(t["eval_s"] for t in trials)
    done = [t for t in trials if t["status"] == "completed"]
    return {
        "scheduler": scheduler,
        "wall_s": wall,
        "n_trials": len(trials),
        "n_completed": len(done),
        "n_pruned": sum(t["status"] == "pruned" for t in trials),
        "train_s": train,
        "eval_s": ev,
        "share_training": train / wall,
        "share_evaluation": ev / wall,
        "share_other": 1.0 - (train + ev) / wall,
        # the sweep machinery alone (Ray, Train workers, checkpoints, MLflow), evaluation aside
        "share_training_without_evaluation": train / (wall - ev) if wall > ev else float("nan"),
        "epochs_total": sum(t["epochs"] for t in trials),
        "mean_trial_train_s": train / max(1, len(trials)),
        "stages_mean_s": stage_means(done),
        "mean_eval_s_cold": _mean(t["eval_s"] for t in done if not t["eval_warm"]),
        "mean_eval_s_warm": _mean(t["eval_s"] for t in done if t["eval_warm"]),
        "best_objective": min((t["validation_elbo"] for t in done), default=float("nan")),
        "trials": trials,
    }


def compute_to_reach(rec: dict, target: float) -> dict:
    """Cumulative training compute (in start order) until best-so-far ≤ target."""
    epochs = secs = 0.0
    for t in rec["trials"]:
        epochs += t["epochs"]
        secs += t["train_s"]
        if t["status"] == "completed" and t["validation_elbo"] <= target:
            return {"epochs": epochs, "train_s": secs, "reached": True}
    return {"epochs": epochs, "train_s": secs, "reached": False}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--grace", type=int, default=5)
    p.add_argument("--cpus", type=float, default=2)
    p.add_argument("--tolerance", type=float, default=0.002, help="relative, of FIFO's best")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        res = {s: run_sweep(f"bench_{s}", s, args, work) for s in ("fifo", "asha")}
    fifo_best = res["fifo"]["best_objective"]
    target = fifo_best * (1 + args.tolerance) if fifo_best > 0 else fifo_best * (1 - args.tolerance)
    for rec in res.values():
        rec["to_reach_fifo_best"] = compute_to_reach(rec, target)
    head = (
        f"{'sched':>5} {'wall s':>7} {'trials':>6} {'pruned':>6} {'epochs':>6} {'train s':>8} "
        f"{'eval s':>7} {'train':>6} {'eval':>6} {'other':>6} {'train*':>6} {'best ELBO':>9} "
        f"{'s to FIFO best':>14} {'eval cold':>9} {'eval warm':>9}"
    )
    lines = [head, "-" * len(head)]
    for s, r in res.items():
        reach = r["to_reach_fifo_best"]
        to_best = f"{reach['train_s']:.0f}" if reach["reached"] else "not reached"
        lines.append(
            f"{s:>5} {r['wall_s']:>7.0f} {r['n_trials']:>6} {r['n_pruned']:>6} "
            f"{r['epochs_total']:>6} {r['train_s']:>8.0f} {r['eval_s']:>7.0f} "
            f"{r['share_training']:>6.2f} {r['share_evaluation']:>6.2f} {r['share_other']:>6.2f} "
            f"{r['share_training_without_evaluation']:>6.2f} "
            f"{r['best_objective']:>9.1f} "
            f"{to_best:>14} {r['mean_eval_s_cold']:>9.1f} {r['mean_eval_s_warm']:>9.1f}"
        )
    text = "\n".join(lines)
    print(text)
    print("train* = training / (wall - evaluation): the sweep machinery's overhead alone")
    print("eval cold / warm: mean s per completed trial, first evaluation in a process / later")
    stages = res["fifo"]["stages_mean_s"]
    if stages:
        print(f"\nwhere a completed FIFO trial's {stages['wall_s']:.0f} s go (mean per trial):")
        for k, what in STAGES:
            print(f"  {stages[k]:>6.1f} s  {stages[k] / stages['wall_s']:>5.0%}  {what}")
    ratio = (
        res["asha"]["train_s"] / res["fifo"]["train_s"] if res["fifo"]["train_s"] else float("nan")
    )
    print(f"ASHA / FIFO training compute: {ratio:.2f}")
    out = {
        "benchmark": "sweep efficiency and ASHA vs FIFO (bundled Kang subset)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": res,
        "asha_over_fifo_compute": ratio,
        "table": text,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
