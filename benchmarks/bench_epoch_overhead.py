"""Where a sweep trial's time goes between epochs: Ray Train's report path, profiled.

One Ray Train run of regvi's real trial worker (``regvi.sweep.worker.train_worker``, the
per-epoch ``RayEpochReporter``) on the bundled Kang subset, timed from inside the worker:

* ``epoch``: training + validation steps (the history's ``epoch_time_s``);
* ``checkpoint``: writing the epoch's checkpoint (weights, Adam state, early-stopping state);
* ``report``: ``ray.train.report`` with that checkpoint (Train V2: blocks until the controller
  has collected the previous report; the controller polls every
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``);
* ``trial wall``: the whole ``TorchTrainer.fit`` (worker start-up, data, model, final report).

Run once with Ray's default poll interval (2 s) and once with regvi's (0.2 s), each in a fresh
Ray instance, same data, model and seed. Evaluation is off (``bench_evaluation.py`` measures it).

Usage::

    .venv/bin/python benchmarks/bench_epoch_overhead.py [--epochs 20]

Prints a table and writes ``benchmarks/results/bench_epoch_overhead.json``.
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

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "bench_epoch_overhead.json"


def _worker(cfg: dict) -> None:
    """Train worker: regvi's own, with the reporter's two steps timed."""
    import ray.train

    import regvi.sweep.reporting as reporting
    import regvi.sweep.worker as worker

    times: dict[str, list[float]] = {"callback": [], "report": []}
    report = ray.train.report
    on_epoch_end = reporting.RayEpochReporter.on_train_epoch_end

    def timed_report(*args, **kwargs):
        t = time.perf_counter()
        out = report(*args, **kwargs)
        times["report"].append(time.perf_counter() - t)
        return out

    def timed_epoch_end(self, trainer, plan):
        t = time.perf_counter()
        on_epoch_end(self, trainer, plan)
        times["callback"].append(time.perf_counter() - t)

    evaluate = worker.evaluate_trial

    def record_epochs(model, *args, **kwargs):
        times["epoch"] = [float(x) for x in model.history["epoch_time_s"]]
        return evaluate(model, *args, **kwargs)

    ray.train.report = timed_report
    reporting.RayEpochReporter.on_train_epoch_end = timed_epoch_end
    worker.evaluate_trial = record_epochs
    out = Path(cfg["times_file"])
    try:
        worker.train_worker({"settings": cfg["settings"]})
    finally:
        out.write_text(json.dumps(times))


def run_one(epochs: int, poll_s: str) -> dict:
    """One fresh Ray + one Train run; called in a subprocess (the poll interval is per process)."""
    import numpy as np
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from regvi.sweep.durable import atomic_filesystem
    from regvi.sweep.settings import EvaluationSettings, TrialSettings

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="regvi_epoch_overhead_"))
    # the settings TrialSettings.from_config builds from a sweep config with these sections
    # (nothing searched); no sweep name, so no evaluator pool: evaluation runs in the worker
    settings = TrialSettings(
        data={
            "path": "bundled:kang_pbmc_small",
            "library_key": "condition",
            "labels_key": "cell_type",
        },
        model={"n_layers": 1, "n_hidden": 128, "n_latent": 16},
        training={"max_epochs": epochs, "early_stopping": False, "batch_size": 128},
        evaluation=EvaluationSettings(n_subsample=500, scib=False, neighbourhood=False, umap=False),
        model_params=(),
        train_params=(),
        data_params=(),
        workers=1,
        cpus_per_worker=2,
        gpus_per_worker=0,
        seed=0,
        train_storage=str(tmp / "train"),
        reference_cache=None,
        sweep=None,
        divergence_file=str(tmp / "DIVERGED"),
    )
    cfg = {"settings": settings, "times_file": str(tmp / "times.json")}
    t0 = time.perf_counter()
    TorchTrainer(
        _worker,
        train_loop_config=cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
        run_config=ray.train.RunConfig(
            name="overhead",
            storage_path=str(tmp / "train"),
            storage_filesystem=atomic_filesystem(),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    ).fit()
    wall = time.perf_counter() - t0
    ray.shutdown()
    t = json.loads((tmp / "times.json").read_text())
    epoch_reports = t["report"][: len(t["callback"])]  # the last report is the final one
    checkpoint = [c - r for c, r in zip(t["callback"], epoch_reports, strict=True)]
    res = {
        "poll_interval_s": float(poll_s),
        "epochs": len(t["epoch"]),
        "trial_wall_s": round(wall, 2),
        "epoch_s_mean": round(float(np.mean(t["epoch"])), 3),
        "checkpoint_s_mean": round(float(np.mean(checkpoint)), 3),
        "report_s_mean": round(float(np.mean(epoch_reports)), 3),
        "report_s_median": round(float(np.median(epoch_reports)), 3),
        "sum_epoch_s": round(float(np.sum(t["epoch"])), 2),
        "sum_between_epochs_s": round(float(np.sum(t["callback"])), 2),
    }
    res["fixed_s"] = round(wall - res["sum_epoch_s"] - res["sum_between_epochs_s"], 2)
    res["share_training"] = round(res["sum_epoch_s"] / wall, 3)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one is not None:  # child: one measurement, JSON on the last line
        print(json.dumps(run_one(args.epochs, args._one)))
        return 0
    rows = []
    for poll in ("2.0", "0.2"):
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(
            [sys.executable, __file__, "--epochs", str(args.epochs), "--_one", poll],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-4000:])
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"\n{'poll s':>6} {'epochs':>6} {'epoch s':>8} {'ckpt s':>7} {'report s':>8} "
        f"{'trial wall s':>12} {'fixed s':>8} {'training share':>14}"
    )
    for r in rows:
        print(
            f"{r['poll_interval_s']:>6.1f} {r['epochs']:>6} {r['epoch_s_mean']:>8.3f} "
            f"{r['checkpoint_s_mean']:>7.3f} {r['report_s_mean']:>8.3f} {r['trial_wall_s']:>12.1f} "
            f"{r['fixed_s']:>8.1f} {r['share_training']:>14.2f}"
        )
    result = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "data": "bundled Kang subset (4,030 cells), n_hidden 128, n_latent 16, batch 128",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
