"""One sweep trial: a Tune function trainable (the driver) that launches a Ray Train run.

Data flow of a trial::

    Tune driver (run_trial)            Ray Train workers (regvi.sweep.worker), one per CPU/GPU slot
    ───────────────────────            ─────────────────────────────────────────────────────
    TorchTrainer(train_worker) ──────▶ read the .h5ad by path, build RegVI, restore checkpoint
      settings.for_trial(params)       Lightning + RayDDPStrategy, sharded minibatches
    TuneReportCallback ◀────────────── ray.train.report(epoch metrics, checkpoint) every epoch
      → ASHA / Optuna see each epoch   rank 0 after training: latent of the fixed
                                       subsample → a warm evaluator of the sweep (or here),
                                       final model + plots in the last checkpoint
                                       (regvi.sweep.trial_eval, regvi.sweep.checkpoints)
    raise TrialDiverged on NaN ◀────── reason written to <train run>/DIVERGED (not retried)

The Train V2 pattern is used: no ``Tuner(trainer)``, no ``ray.train.report`` inside Tune.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from regvi.sweep.durable import atomic_filesystem
from regvi.sweep.settings import TrialSettings
from regvi.sweep.trial_eval import counts_modality
from regvi.sweep.worker import train_worker

__all__ = [
    "TRAIN_POLL_ENV",
    "TRAIN_POLL_INTERVAL_S",
    "TrialDiverged",
    "counts_modality",
    "run_trial",
    "train_worker",
]

#: Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by
#: default), and a worker's ``ray.train.report`` blocks until the previous report has been
#: collected (a queue of one). With Ray's default every epoch shorter than 2 s took 2 s: on the
#: bundled data a 0.7 s epoch waited 1.2 s in its report. regvi polls every 0.2 s, which cut
#: the per-epoch report from 1.29 s to 0.02 s (``benchmarks/bench_epoch_overhead.py``).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_INTERVAL_S = "0.2"


class TrialDiverged(RuntimeError):
    """Training produced NaN/inf; the trial is marked failed with this reason."""


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one Ray Train run (+ evaluation in rank 0).

    ``config``: ``settings`` (the sweep's :class:`~regvi.sweep.settings.TrialSettings`) and
    ``params`` (this trial's sampled parameters)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    sweep: TrialSettings = config["settings"]
    trial_id = ray.tune.get_context().get_trial_id()
    os.environ.pop("MLFLOW_RUN_ID", None)  # never let a worker attach to another run
    # set here too for a Ray started outside regvi (without the sweep's runtime env)
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S)
    divergence_file = Path(sweep.train_storage) / f"train_{trial_id}" / "DIVERGED"
    if divergence_file.is_file():  # a retry of a diverged trial: deterministic, do not re-run
        raise TrialDiverged(divergence_file.read_text())
    settings = sweep.for_trial(
        config.get("params", {}), trial_start=time.time(), divergence_file=str(divergence_file)
    )
    trainer = TorchTrainer(
        train_worker,
        # a dict: Ray Train's run state (RunSettings) holds a dict config
        train_loop_config={"settings": settings},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=settings.resources_per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",  # stable name so restarts find the same run
            storage_path=settings.train_storage,
            storage_filesystem=atomic_filesystem(),  # Train's snapshot never left cut short
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
    if divergence_file.is_file():
        raise TrialDiverged(divergence_file.read_text())
