"""MLflow tracking of a sweep: one parent run, one child run per trial, written from ONE process.

The Tune driver process owns every MLflow write (:class:`MLflowSweepCallback`), so an embedded
SQLite store is never written concurrently ("database is locked" cannot happen), and any remote
tracking URI works unchanged. Child runs are keyed by the Ray trial id (tag ``regvi.trial_id``):
after a crash and ``--resume`` the same run is found and reused, never duplicated, and a run that
was already completed is not logged again.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from regvi.sweep import checkpoints
from regvi.sweep.metric_names import EVALUATION_METRIC_PREFIXES
from regvi.sweep.storage import StorageFullError, first_line, is_storage_full

TAG_PARENT = "mlflow.parentRunId"
TAG_TRIAL = "regvi.trial_id"
TAG_SWEEP = "regvi.sweep"
TAG_DONE = "regvi.logged_final"
MODEL_NAME = "model"
TAG_KIND = "mlflow.experimentKind"  # read by the MLflow UI
KIND_TRAINING = "custom_model_development"  # the UI's "Machine learning" kind


def resolve_tracking_uri(configured: str | None, workdir: Path) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else SQLite in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("file:") or (
            not uri.startswith(("http", "sqlite", "postgresql", "mysql", "databricks"))
        ):
            raise ValueError(
                f"tracking URI {uri!r}: MLflow 3.x refuses file stores; use sqlite:////abs/path.db "
                "or an http(s):// tracking server"
            )
        return uri
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def client(uri: str):
    """An ``MlflowClient`` for ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Experiment id of ``name`` (created if missing), tagged as a training experiment.

    ``mlflow.experimentKind = custom_model_development`` marks it as model training, not a GenAI
    app; an existing experiment gets the tag only if it has none (a user's own value is kept).
    """
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        location = (
            artifact_root.resolve().as_uri()
            if artifact_root is not None and uri.startswith("sqlite")
            else None
        )
        return c.create_experiment(name, artifact_location=location, tags={TAG_KIND: KIND_TRAINING})
    if TAG_KIND not in exp.tags and exp.lifecycle_stage == "active":
        c.set_experiment_tag(exp.experiment_id, TAG_KIND, KIND_TRAINING)
    return exp.experiment_id


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to ``a.b`` keys with string values (MLflow params are flat)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


def _log_metrics(c, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), ts, step if step is not None else 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for i in range(0, len(batch), 500):
        _retry(lambda b=batch[i : i + 500]: c.log_batch(run_id, metrics=b))


def _epoch_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The per-epoch curves of a report or a history row (logged with step = epoch)."""
    return {
        k: v
        for k, v in row.items()
        if k.startswith(("train_", "validation_")) or k in ("kl_weight", "epoch_time_s")
    }


def _retry(fn, attempts: int = 8, delay: float = 1.0):
    """Retry transient tracking failures (server restart, lock) with backoff; re-raise at the end.

    A full disk is not transient: it is re-raised at once (the sweep stops, see ``storage``).
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:
            if i == attempts - 1 or is_storage_full(err):
                raise
            time.sleep(delay * (2**i) if i < 5 else 30)
    return None


def find_child(c, experiment_id: str, parent_id: str, trial_id: str):
    """The child run of ``trial_id`` under ``parent_id`` or ``None``."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


def log_model_dir(uri: str, run_id: str, model_dir: Path) -> str:
    """Log a regvi model directory as a pyfunc (model from code) on ``run_id``; returns its URI."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    code = Path(__file__).with_name("pyfunc_model.py")
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(code),
                artifacts={"regvi_model": str(model_dir)},
                pip_requirements=["regvi"],
            )
    except BaseException:
        # leaving the `with` on an error marked the run FAILED; a failed upload (e.g. a full
        # disk) leaves the trial unfinished instead, so --resume logs it again
        client(uri).update_run(run_id, status="RUNNING")
        raise
    return info.model_uri


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


class MLflowSweepCallback(_TuneCallback):
    """Tune callback writing one MLflow child run per trial (params, curves, metrics, artifacts).

    Picklable (holds only ids and URIs), so a restored sweep keeps logging into the same runs.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_name: str,
        resolved_config: dict[str, Any],
    ):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.resolved_config = resolved_config
        self._runs: dict[str, str] = {}
        self._last_step: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runs"], state["_last_step"] = {}, {}
        return state

    # -- helpers
    def _client(self):
        return client(self.tracking_uri)

    def run_for(self, trial) -> str:
        """Child run id of ``trial`` (found by tag, else created)."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        c = self._client()
        existing = _retry(lambda: find_child(c, self.experiment_id, self.parent_run_id, tid))
        if existing is not None:
            run_id = existing.info.run_id
            hist = _retry(lambda: c.get_metric_history(run_id, "train_loss"))
            self._last_step[tid] = max((m.step for m in hist), default=-1)
        else:

            def create():
                # idempotent under retries: a create whose reply was lost is found by its tag
                found = find_child(c, self.experiment_id, self.parent_run_id, tid)
                return found or c.create_run(
                    self.experiment_id,
                    run_name=f"{self.sweep_name}-{tid}",
                    tags={
                        TAG_PARENT: self.parent_run_id,
                        TAG_TRIAL: tid,
                        TAG_SWEEP: self.sweep_name,
                    },
                )

            run_id = _retry(create).info.run_id
            params = flat_params(trial.config.get("params", {}), "")
            from mlflow.entities import Param

            _retry(lambda: c.log_batch(run_id, params=[Param(k, v) for k, v in params.items()]))
            self._last_step[tid] = -1
        self._runs[tid] = run_id
        return run_id

    # -- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        if result.get("final"):
            return  # logged on completion
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        if epoch <= self._last_step.get(trial.trial_id, -1):
            return  # replayed after a restart: already logged
        _log_metrics(self._client(), run_id, _epoch_metrics(result), step=epoch)
        self._last_step[trial.trial_id] = epoch

    def _backfill_epochs(self, run_id: str, checkpoint_dir: Path | None) -> int:
        """Log the epochs of the checkpoint's history that MLflow lacks; returns how many.

        A node that dies after Ray Train registered an epoch's checkpoint but before that
        epoch's report reached this driver loses the report, and the restarted run continues
        after it. The checkpoint's model history still has the epoch: it is logged from there,
        so every trained epoch is in MLflow exactly once."""
        from regvi.io import HISTORY

        if checkpoint_dir is None:
            return 0
        history = Path(checkpoint_dir) / checkpoints.MODEL_DIR / HISTORY
        if not history.is_file():
            return 0
        import pandas as pd

        rows = pd.read_csv(history)
        if "epoch" not in rows or "train_loss" not in rows:
            return 0
        c = self._client()
        logged = {m.step for m in _retry(lambda: c.get_metric_history(run_id, "train_loss"))}
        missing = rows[~rows["epoch"].astype(int).isin(logged)]
        for _, row in missing.iterrows():
            _log_metrics(c, run_id, _epoch_metrics(row.to_dict()), step=int(row["epoch"]))
        return len(missing)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        c = self._client()
        run = _retry(lambda: c.get_run(run_id))
        if run.data.tags.get(TAG_DONE) == "1":
            return
        result = trial.last_result or {}
        if not result.get("final"):
            # stopped by ASHA (no evaluation) — record as finished with its last epoch
            last = getattr(trial, "checkpoint", None)
            self._backfill_epochs(run_id, Path(last.path) if last is not None else None)
            c.set_tag(run_id, "regvi.status", "pruned")
            _retry(lambda: c.set_terminated(run_id, "FINISHED"))
            return
        final = {
            k: v
            for k, v in result.items()
            if k.startswith(EVALUATION_METRIC_PREFIXES)
            or k.startswith("setup_")
            or k in ("epochs_trained", "world_size", "resumed_optimizer_state", "training_wall_s")
        }
        _log_metrics(c, run_id, final)
        ckpt = result.get("checkpoint_path")
        if ckpt and Path(ckpt).is_dir():
            ckpt = Path(ckpt)
            self._backfill_epochs(run_id, ckpt)
            for sub in (checkpoints.PLOTS_DIR,):
                if (ckpt / sub).is_dir():
                    _retry(lambda s=sub: c.log_artifacts(run_id, str(ckpt / s), s))
            for f in (checkpoints.LATENT_FILE, checkpoints.EVAL_INDEX_FILE):
                if (ckpt / f).is_file():
                    _retry(lambda f=f: c.log_artifact(run_id, str(ckpt / f), "evaluation"))
            cfg_path = ckpt / "resolved_config.json"
            cfg_path.write_text(
                json.dumps(
                    {"sweep": self.resolved_config, "params": trial.config.get("params", {})},
                    indent=2,
                    default=str,
                )
            )
            _retry(lambda: c.log_artifact(run_id, str(cfg_path)))
            model_uri = _retry(
                lambda: log_model_dir(self.tracking_uri, run_id, ckpt / checkpoints.MODEL_DIR)
            )
            c.set_tag(run_id, "regvi.model_uri", model_uri)
            c.set_tag(run_id, "regvi.checkpoint", str(ckpt))
        if result.get("worker_node_id"):
            c.set_tag(run_id, "regvi.worker_node", str(result["worker_node_id"]))
        c.set_tag(run_id, TAG_DONE, "1")
        c.set_tag(run_id, "regvi.status", "completed")
        _retry(lambda: c.set_terminated(run_id, "FINISHED"))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial failed (e.g. its node died) and Tune retries it: count, keep the run.

        A trial that failed because storage is full stops the sweep instead (retries would fail
        the same way); its run stays unfinished and ``--resume`` continues it."""
        _raise_if_storage_full(trial)
        run_id = self.run_for(trial)
        c = self._client()
        n = int(trial.num_failures) if hasattr(trial, "num_failures") else 1
        _retry(lambda: c.set_tag(run_id, "regvi.trial_retries", str(n)))

    def on_trial_error(self, iteration, trials, trial, **info):
        _raise_if_storage_full(trial)  # not the trial's fault: leave it unfinished, stop
        run_id = self.run_for(trial)
        c = self._client()
        reason = _error_text(trial)
        c.set_tag(run_id, "regvi.status", "failed")
        c.set_tag(run_id, "regvi.error", reason[:4900])
        _retry(lambda: c.set_terminated(run_id, "FAILED"))


def _last_failure(trial) -> str:
    """The text of the trial's latest failure (Tune appends every failure to its error file)."""
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text().rsplit("Failure # ", 1)[-1]
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "")


def _raise_if_storage_full(trial) -> None:
    text = _last_failure(trial)
    if is_storage_full(text):
        raise StorageFullError(f"trial {trial.trial_id} failed: {first_line(text)}")


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            text = Path(path).read_text()
            # the last line of the remote traceback carries the exception and reason
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            for ln in reversed(lines):
                if "Error" in ln or "Diverged" in ln:
                    return ln.strip()
            return lines[-1] if lines else "unknown error"
    except OSError:
        pass
    return str(getattr(trial, "error_msg", None) or "unknown error")
