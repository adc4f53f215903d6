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


#: After ``trainer.fit()`` the trial waits until Tune has taken Train's last epoch report, then
#: this long (s) more, before it returns (:func:`_drain_tune_reports`).
REPORT_DRAIN_GRACE_S = 1.0


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
    _drain_tune_reports()
    if divergence_file.is_file():
        raise TrialDiverged(divergence_file.read_text())


def _drain_tune_reports(timeout_s: float = 600.0) -> None:
    """Wait until Tune's trial actor has taken Train's last report (a Ray 2.60 deadlock).

    ``TuneReportCallback`` hands each epoch report to the trial actor's main thread through a
    queue of one; the main thread moves it into the session's result queue (also of one). When
    the trial function returns, Tune's runner thread puts its own final result into that result
    queue. If Train's last report is still waiting then (the driver was slow to ask for the next
    result, e.g. while the MLflow server was down), the main thread blocks forever putting it
    into the full result queue, and the sweep hangs with the trial RUNNING. So return only once
    the hand-over queue is empty and the main thread has had ``REPORT_DRAIN_GRACE_S`` to pass the
    item on; give up after ``timeout_s`` or when Tune stops the trial.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None) if session is not None else None
    if queue is None:
        return
    deadline = time.monotonic() + timeout_s
    stopping = getattr(session, "stop_event", None)
    while time.monotonic() < deadline and not (stopping is not None and stopping.is_set()):
        try:
            if queue.empty():
                time.sleep(REPORT_DRAIN_GRACE_S)
                if queue.empty():
                    return
            else:
                time.sleep(0.1)
        except Exception:  # the queue's actor is gone (e.g. its node died): nothing to drain
            return
