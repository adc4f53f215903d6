"""The training loop of a sweep trial, run inside each of its Ray Train workers.

Each worker reads the data by path, builds the model (RegVI, or RegMultiVI for paired
modalities), restores the latest checkpoint after a restart and trains its shard of the
minibatches with Lightning + ``RayDDPStrategy``; :class:`~regvi.sweep.reporting.RayEpochReporter`
reports and checkpoints every epoch. After training rank 0 evaluates
(:func:`regvi.sweep.trial_eval.evaluate_trial`) and writes the final checkpoint
(layout: :mod:`regvi.sweep.checkpoints`); every rank sends the final report.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from regvi.sweep import checkpoints
from regvi.sweep.config import BUNDLED_PREFIX
from regvi.sweep.reporting import RayEpochReporter
from regvi.sweep.settings import TrialSettings
from regvi.sweep.trial_eval import evaluate_trial


def read_data(path: str | dict[str, str]):
    """Read the sweep's data: an AnnData by path (``bundled:kang_pbmc_small`` for the bundled
    data), or for multimodal sweeps a dict modality → AnnData."""
    import anndata as ad

    if isinstance(path, dict):
        return {m: ad.read_h5ad(p) for m, p in sorted(path.items())}
    if path.startswith(BUNDLED_PREFIX):
        from regvi import datasets

        return datasets.kang_pbmc_small()
    return ad.read_h5ad(path)


def _data_kwargs(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("path", "modalities", "counts_modality")}


def build_model(data: Any, data_cfg: dict[str, Any], model_kwargs: dict[str, Any]):
    """RegVI for one modality, RegMultiVI for ``data.modalities``."""
    import regvi

    if "modalities" in data_cfg:
        return regvi.RegMultiVI(data, **_data_kwargs(data_cfg), **model_kwargs)
    return regvi.RegVI(data, **_data_kwargs(data_cfg), **model_kwargs)


def _attach(model, data) -> None:
    from regvi.io import attach_data

    if hasattr(model, "attach"):
        model.attach(data)
    else:
        attach_data(model, data)


def train_worker(config: dict[str, TrialSettings]) -> None:
    """Per-worker training loop (runs inside a Ray Train worker process).

    ``config["settings"]``: the trial's settings, its sampled parameters merged in
    (:meth:`TrialSettings.for_trial <regvi.sweep.settings.TrialSettings.for_trial>`).

    The final report carries where the trial's wall time went (``setup_*_s``, wall-clock
    seconds): from the trial's start to this function (Train controller and worker start-up),
    imports, reading the data, building the model, and training as a whole (epochs plus what
    runs between them).
    """
    stamps = {"enter": time.time()}
    settings = config["settings"]
    import ray
    import ray.train
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    stamps["imports"] = time.time()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    if settings.use_gpu:
        # fractional GPUs: several trials share a device; cap each one's allocator at its share
        from regvi.data.device import limit_gpu_memory

        limit_gpu_memory(settings.gpus_per_worker)
    torch.manual_seed(settings.seed)
    adata = read_data(settings.data_source)
    stamps["data"] = time.time()
    model = build_model(adata, settings.data, settings.model)
    stamps["model"] = time.time()
    state: dict[str, Any] = {"training_done": False, "early_stopping": None}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _replay_final(checkpoint, rank):
        return  # trained and evaluated before a restart: the same final result, not re-run
    if checkpoint is not None:  # worker restart (FailureConfig): continue from the last epoch
        with checkpoint.as_directory() as d:
            state, optimizer_state = checkpoints.restore(d, model)
    remaining = settings.max_epochs - len(model.history)
    if not state["training_done"] and remaining > 0:
        reporter = RayEpochReporter(model, rank)
        try:
            model.train(
                max_epochs=remaining,
                accelerator="gpu" if settings.use_gpu else "cpu",
                devices="auto",
                strategy=RayDDPStrategy(),
                plugins=[RayLightningEnvironment()],
                shard=(world, rank),
                callbacks=[reporter],
                progress_bar=False,
                seed=settings.seed,
                early_stopping_state=state.get("early_stopping"),
                optimizer_state=optimizer_state,
                **settings.train_kwargs,
            )
        except FloatingPointError as err:
            # not retried (deterministic); the driver turns this into a failed trial
            if rank == 0:
                Path(settings.divergence_file).parent.mkdir(parents=True, exist_ok=True)
                Path(settings.divergence_file).write_text(str(err))
            return
    stamps["trained"] = time.time()
    model.module.cpu().eval()
    final: dict[str, Any] = {
        **_setup_seconds(stamps, settings.trial_start),
        "final": 1.0,
        "epochs_trained": float(len(model.history)),
        "worker_node_id": ray.get_runtime_context().get_node_id(),
        "world_size": float(world),
        "resumed_optimizer_state": float(optimizer_state is not None),
    }
    if len(model.history):  # the final report carries the last epoch's values (objective, ASHA)
        last = model.history.iloc[-1]
        final.update({k: float(v) for k, v in last.items() if np.isfinite(v)})
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp)
        if rank == 0:
            _attach(model, adata)
            final.update(evaluate_trial(model, adata, settings, ckpt_dir))
            checkpoints.write_final(ckpt_dir, model, final)
        ray.train.report(
            final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        )


def _setup_seconds(stamps: dict[str, float], trial_start: float | None) -> dict[str, float]:
    """Wall-clock seconds of a trial's stages, from the time stamps of :func:`train_worker`."""
    out = {
        "setup_imports_s": stamps["imports"] - stamps["enter"],
        "setup_data_s": stamps["data"] - stamps["imports"],
        "setup_model_s": stamps["model"] - stamps["data"],
        "training_wall_s": stamps["trained"] - stamps["model"],
    }
    if trial_start is not None:  # the trial driver's clock: the same node's, or a synced one
        out["setup_workers_s"] = max(0.0, stamps["enter"] - trial_start)
    return out


def _replay_final(checkpoint, rank: int) -> bool:
    """Report the final result stored in a finished trial's last checkpoint again.

    A trial whose final report was checkpointed but not recorded by Tune (the sweep driver was
    killed in between, then ``--resume``) restarts with that checkpoint. Training and
    evaluation are deterministic and done; re-running evaluation would cost minutes. Returns
    ``False`` for a checkpoint of an unfinished trial."""
    import shutil

    import ray.train

    with checkpoint.as_directory() as d:
        final = checkpoints.final_result(d)
        if final is None:
            return False
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                shutil.copytree(d, tmp, dirs_exist_ok=True)
            final = {**final, "replayed_final": 1.0}
            ray.train.report(
                final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            )
    return True
