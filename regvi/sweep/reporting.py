"""Lightning callback that reports every epoch (metrics + checkpoint) from Ray Train workers."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


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

        from regvi.io import save_optimizer_state
        from regvi.sweep.trial import CHECKPOINT_STATE

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
                self.model.history = (
                    pd.concat([prior, current], ignore_index=True) if len(prior) else current
                )
                try:
                    self.model.save(Path(tmp) / "model", overwrite=True)
                finally:
                    self.model.history = prior
                if trainer.optimizers:  # Adam moments too, so a restart resumes exactly
                    save_optimizer_state(trainer.optimizers[0].state_dict(), tmp)
                (Path(tmp) / CHECKPOINT_STATE).write_text(
                    json.dumps({"training_done": False, "early_stopping": es_state})
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
