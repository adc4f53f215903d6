"""The sweep's MLflow callback against a real SQLite MLflow store."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

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


# "completion start" (down before the first call) is covered by the sweep's outage test too
@pytest.mark.fault
@pytest.mark.parametrize("stop_at", ["model upload"])
def test_a_server_outage_while_a_trial_completes_loses_nothing(tmp_path, monkeypatch, stop_at):
    """A real ``mlflow server`` stops as a trial completes (final metrics, artifacts and the
    pyfunc model are being logged) and comes back 10 s later: the completion finishes, once, with
    one model logged and loadable. ``model upload``: the server stops between the creation of
    the logged model and the upload of its files."""
    import threading

    import mlflow
    from mlflow.tracking import MlflowClient

    from tests.mlflow_server import free_port, mlflow_server, stop_server

    ckpt = _trained_checkpoint(tmp_path, 3)
    (ckpt / "plots").mkdir()
    (ckpt / "plots" / "note.txt").write_text("a plot")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    try:
        exp = ensure_experiment(uri, "outage-complete", None)
        c = MlflowClient(tracking_uri=uri)
        parent = c.create_run(exp).info.run_id
        cb = MLflowSweepCallback(uri, exp, parent, "outage-complete", {})
        result = {"final": 1.0, "epochs_trained": 3.0, "eval_seconds": 1.0}
        trial = SimpleNamespace(
            trial_id="t0002",
            config={"params": {"n_hidden": 16}},
            last_result={**result, "checkpoint_path": str(ckpt)},
        )
        run_id = cb.run_for(trial)
        down = threading.Event()
        holder = {"server": server}
        if stop_at == "completion start":
            stop_server(server)
            down.set()
        else:
            upload = MlflowClient.log_model_artifacts

            def upload_after_outage(self, model_id, local_dir):
                if not down.is_set():
                    stop_server(holder["server"])
                    down.set()
                return upload(self, model_id, local_dir)

            monkeypatch.setattr(MlflowClient, "log_model_artifacts", upload_after_outage)
        errors: list[BaseException] = []

        def complete():
            try:
                cb.on_trial_complete(0, [], trial)
            except BaseException as err:
                errors.append(err)

        worker = threading.Thread(target=complete, daemon=True)
        worker.start()
        assert down.wait(timeout=300)
        time.sleep(10)
        server = mlflow_server(tmp_path, port)  # same port, same store
        worker.join(timeout=600)
        assert not worker.is_alive(), "the completion hung after the server came back"
        assert not errors, errors
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["regvi.status"] == "completed"
        assert run.data.metrics["epochs_trained"] == 3.0
        assert len(c.get_metric_history(run_id, "epochs_trained")) == 1
        models = [m for m in c.search_logged_models([exp]) if m.source_run_id == run_id]
        ready = [m for m in models if m.status.name == "READY"]
        assert len(ready) == 1, [(m.model_id, m.status) for m in models]  # no duplicate
        assert run.data.tags["regvi.model_uri"] == f"models:/{ready[0].model_id}"
        mlflow.set_tracking_uri(uri)
        loaded = regvi.load(run.data.tags["regvi.model_uri"])
        assert loaded.config.n_hidden == 16
        cb.on_trial_complete(0, [], trial)  # a replay after --resume logs nothing again
        assert len(c.get_metric_history(run_id, "epochs_trained")) == 1
    finally:
        stop_server(server)
