"""Lightning callback that reports every epoch (metrics + checkpoint) from Ray Train workers."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import lightning.pytorch as pl

from regvi.sweep import checkpoints


class RayEpochReporter(pl.Callback):
    """After each epoch: rank 0 writes a checkpoint (model, Adam state, early-stopping state); every rank
    calls ``ray.train.report`` (a barrier in Train V2; rank 0's metrics are attached).

    Must be the last callback so early stopping has updated its state for this epoch.
    """

    def __init__(self, model: Any, rank: int):
        self.model = model
        self.rank = rank

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: Any) -> None:
        import pandas as pd
        import ray.train

        row = plan.finish_epoch()
        metrics = {
            k: float(v) for k, v in row.items() if isinstance(v, int | float) and math.isfinite(v)
        }
        metrics["epoch"] = float(row["epoch"])
        es = self.model.early_stopping
        es_state = (
            None if es is None else {"best": es.best, "best_epoch": es.best_epoch, "wait": es.wait}
        )
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if self.rank == 0:
                prior = self.model.history
                current = pd.DataFrame(plan.history)
                history = pd.concat([prior, current], ignore_index=True) if len(prior) else current
                optimizer_state = (  # Adam moments too, so a restart resumes exactly
                    trainer.optimizers[0].state_dict() if trainer.optimizers else None
                )
                checkpoints.write_epoch(tmp, self.model, history, optimizer_state, es_state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
