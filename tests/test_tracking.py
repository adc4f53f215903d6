"""The sweep's MLflow callback against a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

import regvi
from regvi.sweep.tracking import MLflowSweepCallback, ensure_experiment


def _trained_checkpoint(tmp_path: Path, epochs: int) -> Path:
    adata = regvi.simulate(n_cells=200, n_genes=40, n_cell_types=2, n_libraries=2, seed=0)
    model = regvi.RegVI(adata, library_key="library", n_hidden=16, n_latent=4)
    model.train(max_epochs=epochs, early_stopping=False, progress_bar=False, seed=0)
    ckpt = tmp_path / "checkpoint"
    model.save(ckpt / "model")
    return ckpt


def test_an_epoch_whose_report_was_lost_is_logged_from_the_checkpoint(tmp_path):
    # A node dies after Ray Train registered epoch 8's checkpoint but before its report reached
    # the driver: the restarted run goes on from epoch 9. The epoch is logged once from the
    # checkpoint's history when the trial completes; a second pass logs nothing.
    epochs = 15
    ckpt = _trained_checkpoint(tmp_path, epochs)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "backfill", tmp_path / "artifacts")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    parent = c.create_run(exp).info.run_id
    cb = MLflowSweepCallback(uri, exp, parent, "backfill", {})
    trial = SimpleNamespace(trial_id="t0001", config={"params": {}})
    history = regvi.load(ckpt / "model").history
    for _, row in history.iterrows():
        if int(row["epoch"]) != 8:
            cb.on_trial_result(0, [], trial, {**row.to_dict(), "training_iteration": 1})
    run_id = cb.run_for(trial)
    assert cb._backfill_epochs(run_id, ckpt) == 1
    assert cb._backfill_epochs(run_id, ckpt) == 0
    logged = c.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in logged) == list(range(epochs))
    epoch8 = next(m.value for m in logged if m.step == 8)
    assert np.isclose(epoch8, history.loc[history["epoch"] == 8, "train_loss"].item())
    assert cb._backfill_epochs(run_id, tmp_path / "no-such-checkpoint") == 0
