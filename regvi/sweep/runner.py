"""Run a sweep: Ray (embedded or cluster) + Tune (Optuna / random / grid, ASHA) + MLflow."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from regvi.sweep.cleanup import LeakedPlacementGroupReaper
from regvi.sweep.config import SweepConfig
from regvi.sweep.data_check import check_data_files
from regvi.sweep.durable import TuneStateSnapshot, atomic_filesystem, prepare_resume
from regvi.sweep.evaluator import start_pool
from regvi.sweep.metric_names import asha_metric, final_only_objective
from regvi.sweep.searcher import FinalResultOptunaSearch
from regvi.sweep.settings import TrialSettings
from regvi.sweep.space import define_by_run, grid
from regvi.sweep.storage import StorageFullError, is_storage_full, stopped_message
from regvi.sweep.summary import SweepResult, summarise
from regvi.sweep.tracking import (
    MLflowSweepCallback,
    client,
    ensure_experiment,
    flat_params,
    resolve_tracking_uri,
)
from regvi.sweep.trial import TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S, run_trial
from regvi.sweep.worker import build_model, read_data

__all__ = ["SweepResult", "check_data", "check_writable", "init_ray", "run_sweep"]

STATE_FILE = "sweep_state.json"
#: Environment of every Ray worker process of a sweep. JAX (scib-metrics, in the trial's
#: evaluation) allocates GPU memory on demand instead of pre-allocating 75 % of the device
#: that the trial's torch model (and other trials sharing the GPU) need.
#:
#: Ray Train's controller collects reports every 0.2 s instead of 2 s (see
#: :data:`regvi.sweep.trial.TRAIN_POLL_ENV`); a value set in the driver's environment wins.
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
    TRAIN_POLL_ENV: os.environ.get(TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S),
}
#: Bounds on what the embedded Ray's GCS keeps about finished work. A sweep starts about 8
#: actors per trial (Tune's trainable, Train's controller, worker, placement-group cleaner, ...);
#: Ray's default caches of dead actors, dead workers and task events are far larger than a
#: sweep needs, so the GCS's memory grew with every trial for the sweep's lifetime. ``benchmarks/bench_load.py`` measured
#: +16 MiB per 10 trials with Ray's defaults. Set only where not already set in the environment;
#: a cluster started by ``ray start`` takes its own settings (see cluster/).
GCS_ENV = {
    "RAY_maximum_gcs_destroyed_actor_cached_count": "50",
    "RAY_maximum_gcs_dead_worker_cached_count": "50",
    "RAY_task_events_max_num_task_in_gcs": "2000",
}
DRIVER_RESOURCES = {
    "cpu": 0,
    "memory": 256 * 1024**2,
}  # drivers must not hold the CPUs workers need


def _git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "regvi",
        "torch",
        "lightning",
        "ray",
        "optuna",
        "mlflow",
        "scib-metrics",
        "anndata",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def init_ray(address: str | None, cfg: SweepConfig) -> dict[str, float]:
    """Connect to (or start) Ray and check the trial's resources fit; returns cluster resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
        else:
            for key, value in GCS_ENV.items():
                os.environ.setdefault(key, value)
            ray.init(
                dashboard_host="127.0.0.1",
                log_to_driver=False,
                runtime_env={"env_vars": WORKER_ENV},
            )
    res = ray.cluster_resources()
    need_cpu = cfg.workers * cfg.cpus_per_worker
    need_gpu = cfg.workers * cfg.gpus_per_worker
    if need_cpu > res.get("CPU", 0) or need_gpu > res.get("GPU", 0) + 1e-9:
        raise ValueError(
            f"resources: a trial needs {cfg.workers} workers × {cfg.cpus_per_worker} CPU"
            f"{f' × {cfg.gpus_per_worker} GPU' if need_gpu else ''} = {need_cpu:g} CPU / "
            f"{need_gpu:g} GPU, but the Ray cluster has {res.get('CPU', 0):g} CPU / "
            f"{res.get('GPU', 0):g} GPU"
        )
    return res


def _searcher(cfg: SweepConfig, sweep_dir: Path):
    import optuna

    if cfg.search_algorithm == "grid":
        return None
    sampler = (
        optuna.samplers.RandomSampler(seed=cfg.seed)
        if cfg.search_algorithm == "random"
        else optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True)
    )
    storage = optuna.storages.RDBStorage(f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}")
    metric = cfg.objective_metrics if cfg.multi_objective else cfg.objective_metrics[0]
    mode = cfg.objective_modes if cfg.multi_objective else cfg.objective_modes[0]
    return FinalResultOptunaSearch(
        space=define_by_run(cfg),
        metric=metric,
        mode=mode,
        sampler=sampler,
        study_name=cfg.name,
        storage=storage,
        seed=None,
    )


def _reporter(cfg: SweepConfig):
    """Tune's progress table with the columns a user watches."""
    from ray import tune

    cols = {"epoch": "epoch", "validation_elbo": "val ELBO", "train_loss": "loss"}
    for m in cfg.objective_metrics:
        cols.setdefault(m, m)
    cols.setdefault("scib_total", "scib total")
    # "Current best trial" ranks by the objective (single objective; Tune's own default would
    # be the first metric column, the validation ELBO)
    best = (
        {}
        if cfg.multi_objective
        else {
            "metric": cfg.objective_metrics[0],
            "mode": cfg.objective_modes[0],
        }
    )
    return tune.CLIReporter(
        metric_columns=cols,
        parameter_columns=[f"params/{p.name}" for p in cfg.params],
        max_report_frequency=30,
        **best,
    )


#: Bytes the write probe writes: a full disk (or quota) is refused before any work, not only a
#: read-only or missing folder.
PROBE_BYTES = 1024**2


def check_writable(sweep_dir: Path) -> None:
    """Refuse an output folder that cannot be written (before Ray or MLflow start).

    Probes with a temporary file of :data:`PROBE_BYTES` (written and synced) that is removed
    again; a folder created only for the probe is removed too, so a refused sweep leaves nothing
    behind.
    """
    import tempfile

    missing = [p for p in (sweep_dir, *sweep_dir.parents) if not p.exists()]
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=sweep_dir, prefix=".write-probe-") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise ValueError(
            f"storage.path: cannot write the sweep folder {sweep_dir}: {err.strerror or err}"
        ) from None
    finally:
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()


def check_data(cfg: SweepConfig) -> Any:
    """Read the data and set up a model with the fixed options: covariate keys, counts and
    modalities are validated in the driver before Ray, MLflow or any file is touched."""
    import warnings

    try:
        data = read_data(cfg.data_path())
    except OSError as err:
        raise ValueError(f"data: cannot read {cfg.data_path()}: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(data, cfg.data, dict(cfg.model))
    except (KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"data check ({cfg.config_path or 'config'}): {msg}") from None
    return data


def run_sweep(
    cfg: SweepConfig, resume: bool = False, address: str | None = None, verbose: int = 1
) -> SweepResult:
    """Run (or ``resume``) the sweep described by ``cfg``.

    Bad input is refused (``ValueError`` / ``FileExistsError`` / ``FileNotFoundError``) before
    Ray or MLflow start or any folder is made: first the data's keys, layers and counts
    (:func:`~regvi.sweep.data_check.check_data_files`, as ``--dry-run`` checks them), then the
    output folder, then the data read in full. Storage filling up mid-sweep stops it with
    :class:`~regvi.sweep.storage.StorageFullError`; free space, then ``resume``.
    """
    check_data_files(cfg)  # cheap: obs/var and matrix metadata; names the key and the file
    sweep_dir = cfg.storage_path / cfg.name
    state_path = sweep_dir / STATE_FILE
    if resume and not state_path.is_file():
        raise FileNotFoundError(
            f"--resume: no sweep state at {state_path}; run without --resume first"
        )
    if not resume and state_path.is_file():
        raise FileExistsError(
            f"sweep {cfg.name!r} already exists in {sweep_dir}; pass --resume to continue it, or "
            "change 'name' / 'storage.path'"
        )
    uri = resolve_tracking_uri(cfg.tracking_uri, Path.cwd())
    check_writable(sweep_dir)  # also refuses a full disk
    data = None if resume else check_data(cfg)  # bad keys / counts fail before any work
    if resume:  # Tune's state complete and readable, or a clear error (never a fresh restart)
        prepare_resume(sweep_dir)
    try:
        return _run_sweep(cfg, resume, address, verbose, uri, data)
    except Exception as err:
        if not is_storage_full(err):
            raise
        raise StorageFullError(stopped_message(sweep_dir, err)) from None


def _tag_dataset(c: Any, parent_id: str, data: Any) -> None:
    """Tag the parent run with the dataset's fingerprint and shape (per modality)."""
    from evaluation.reference import dataset_fingerprint

    adata = data
    mods = adata if isinstance(adata, dict) else {"": adata}
    fingerprint = "+".join(dataset_fingerprint(a.X, a.obs_names) for a in mods.values())
    shape = "+".join(f"{m + ':' if m else ''}{a.n_obs}x{a.n_vars}" for m, a in mods.items())
    c.set_tag(parent_id, "dataset_fingerprint", fingerprint)
    c.set_tag(parent_id, "dataset_shape", shape)


def _start_parent_run(
    cfg: SweepConfig, uri: str, data: Any, sweep_dir: Path, state_path: Path
) -> tuple[str, str]:
    """Create the sweep's MLflow parent run and write the sweep state; returns its ids."""
    experiment_id = ensure_experiment(uri, cfg.experiment, sweep_dir / "mlflow_artifacts")
    c = client(uri)
    parent = c.create_run(
        experiment_id,
        run_name=f"sweep-{cfg.name}",
        tags={"regvi.sweep": cfg.name, "regvi.role": "sweep", "git_sha": _git_sha()},
    )
    parent_id = parent.info.run_id
    from mlflow.entities import Param

    params = flat_params({"config": cfg.resolved(), "versions": _versions()})
    c.log_batch(parent_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    c.log_dict(parent_id, cfg.resolved(), "sweep_config.json")
    _tag_dataset(c, parent_id, data)
    state_path.write_text(
        json.dumps(
            {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent_id}
        )
    )
    return experiment_id, parent_id


def _tracking_ids(
    cfg: SweepConfig, resume: bool, uri: str, data: Any, sweep_dir: Path, state_path: Path
) -> tuple[str, str, str]:
    """Tracking URI, experiment id and parent run id: read back (resume) or newly made."""
    if resume:
        state = json.loads(state_path.read_text())
        return state["tracking_uri"], state["experiment_id"], state["parent_run_id"]
    experiment_id, parent_id = _start_parent_run(cfg, uri, data, sweep_dir, state_path)
    return uri, experiment_id, parent_id


def _param_space(
    cfg: SweepConfig, settings: TrialSettings, searcher: Any
) -> tuple[dict[str, Any], int]:
    """Tune's param space and number of samples (a grid when there is no searcher)."""
    from ray import tune

    if searcher is None:
        return {"settings": settings, "params": tune.grid_search(grid(cfg))}, 1
    return {"settings": settings}, cfg.trials


def _scheduler(cfg: SweepConfig, settings: TrialSettings, metric: str, mode: str) -> Any:
    """The trial scheduler: ASHA on ``metric`` / ``mode``, or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler["name"] == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            # a report per epoch, the final report, and one to spare (a replayed final report):
            # ASHA never stops a trial before it has trained its last epoch and been evaluated
            max_t=settings.max_epochs + 2,
            grace_period=int(cfg.scheduler.get("grace_period", 5)),
            reduction_factor=float(cfg.scheduler.get("reduction_factor", 2)),
        )
    return FIFOScheduler()


def _concurrency(cfg: SweepConfig, resources: dict[str, float]) -> int:
    """How many trials fit the cluster's CPUs (and GPUs) at once."""
    concurrency = max(1, int(resources.get("CPU", 1) // (cfg.workers * cfg.cpus_per_worker)))
    if cfg.gpus_per_worker > 0:
        concurrency = min(
            concurrency, int(resources.get("GPU", 0) // (cfg.workers * cfg.gpus_per_worker))
        )
    return concurrency


def _tune_config(
    cfg: SweepConfig,
    searcher: Any,
    scheduler: Any,
    num_samples: int,
    concurrency: int,
    asha: tuple[str, str],
) -> Any:
    """Tune's config of a fresh sweep (``asha``: the metric and mode a grid search ranks by)."""
    from ray import tune

    a_metric, a_mode = asha
    return tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=concurrency,
        time_budget_s=cfg.time_budget_s,
        metric=None if searcher is not None else a_metric,
        mode=None if searcher is not None else a_mode,
        reuse_actors=False,
    )


def _run_config(cfg: SweepConfig, callback: MLflowSweepCallback, fs: Any, verbose: int) -> Any:
    """Tune's run config of a fresh sweep: storage, callbacks, progress and retries."""
    from ray import tune

    sweep_dir = cfg.storage_path / cfg.name
    return tune.RunConfig(
        name=cfg.name,
        storage_path=str(cfg.storage_path),
        storage_filesystem=fs,
        callbacks=[callback, TuneStateSnapshot(sweep_dir), LeakedPlacementGroupReaper()],
        verbose=verbose,
        progress_reporter=_reporter(cfg),
        # a trial whose driver died with its node is retried; Train restores its latest
        # checkpoint (a diverged trial fails fast on retry: see run_trial)
        failure_config=tune.FailureConfig(max_failures=2),
    )


def _restored_tuner(sweep_dir: Path, trainable: Any, fs: Any, param_space: dict[str, Any]) -> Any:
    """The interrupted sweep's tuner, resuming its unfinished (not its errored) trials."""
    from ray import tune

    return tune.Tuner.restore(
        str(sweep_dir),
        trainable=trainable,
        storage_filesystem=fs,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=False,
        param_space=param_space,
    )


def _run_sweep(
    cfg: SweepConfig, resume: bool, address: str | None, verbose: int, uri: str, data: Any
) -> SweepResult:
    """Start Ray, set up (or restore) the Tune run with MLflow tracking, fit and summarise."""
    import mlflow
    from ray import tune

    sweep_dir = cfg.storage_path / cfg.name
    state_path = sweep_dir / STATE_FILE
    if final_only_objective(cfg):
        # the objective is reported once, after evaluation; ASHA's metric is per epoch
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    resources = init_ray(address, cfg)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    uri, experiment_id, parent_id = _tracking_ids(cfg, resume, uri, data, sweep_dir, state_path)
    callback = MLflowSweepCallback(uri, experiment_id, parent_id, cfg.name, cfg.resolved())
    settings = TrialSettings.from_config(cfg, sweep_dir)  # every trial's, as the worker reads it
    searcher = _searcher(cfg, sweep_dir)
    param_space, num_samples = _param_space(cfg, settings, searcher)
    a_metric, a_mode = asha_metric(cfg)
    scheduler = _scheduler(cfg, settings, a_metric, a_mode)
    concurrency = _concurrency(cfg, resources)
    trainable = tune.with_resources(run_trial, DRIVER_RESOURCES)
    evaluators = None
    if settings.evaluation.pool:  # warm evaluation processes shared by the trials
        n_trials = num_samples if searcher is not None else len(grid(cfg))
        evaluators = start_pool(cfg.name, min(concurrency, max(1, n_trials)))
    fs = atomic_filesystem()  # no state file on storage is ever left cut short
    if resume:
        tuner = _restored_tuner(sweep_dir, trainable, fs, param_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=_tune_config(
                cfg, searcher, scheduler, num_samples, concurrency, (a_metric, a_mode)
            ),
            run_config=_run_config(cfg, callback, fs, verbose),
        )
    grid_results = tuner.fit()
    del evaluators  # the evaluator actors end with the sweep
    mlflow.set_tracking_uri(uri)
    return summarise(cfg, grid_results, uri, experiment_id, parent_id, sweep_dir)


def objective_value(cfg: SweepConfig, metrics: dict[str, Any]) -> float | None:
    """Scalar objective of a finished trial (first objective for multi-objective sweeps)."""
    v = metrics.get(cfg.objective_metrics[0])
    return float(v) if v is not None and math.isfinite(float(v)) else None
