"""One sweep trial: a Tune function trainable (the driver) that launches a Ray Train run.

Data flow of a trial::

    Tune driver (run_trial)            Ray Train workers (train_worker), one per CPU/GPU slot
    ───────────────────────            ─────────────────────────────────────────────────────
    TorchTrainer(train_worker) ──────▶ read the .h5ad by path, build RegVI, restore checkpoint
                                       Lightning + RayDDPStrategy, sharded minibatches
    TuneReportCallback ◀────────────── ray.train.report(epoch metrics, checkpoint) every epoch
      → ASHA / Optuna see each epoch   rank 0 after training: latent of the fixed
                                       subsample → a warm evaluator of the sweep (or here),
                                       final model + plots in the last checkpoint
    raise TrialDiverged on NaN ◀────── reason written to <train run>/DIVERGED (not retried)

The Train V2 pattern is used: no ``Tuner(trainer)``, no ``ray.train.report`` inside Tune.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT_STATE = "trial_state.json"
LATENT_FILE = "eval_latent.npy"
EVAL_INDEX_FILE = "eval_indices.npy"
#: Ray Train's controller polls its workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by
#: default), and a worker's ``ray.train.report`` blocks until the previous report has been
#: collected (a queue of one). With Ray's default every epoch shorter than 2 s took 2 s: on the
#: bundled data a 0.7 s epoch waited 1.2 s in its report. regvi polls every 0.2 s, which cut
#: the per-epoch report from 1.29 s to 0.02 s (``benchmarks/bench_epoch_overhead.py``).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_INTERVAL_S = "0.2"


class TrialDiverged(RuntimeError):
    """Training produced NaN/inf; the trial is marked failed with this reason."""


def read_data(path: str | dict[str, str]):
    """Read the sweep's data: an AnnData by path (``bundled:kang_pbmc_small`` for the bundled
    data), or for multimodal sweeps a dict modality → AnnData."""
    import anndata as ad

    from regvi.sweep.config import BUNDLED_PREFIX

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


def counts_modality(data_cfg: dict[str, Any]) -> str:
    """The modality whose counts the evaluation uses (default: the RNA-like one)."""
    from regvi.multimodal import modality_kind

    if data_cfg.get("counts_modality"):
        return data_cfg["counts_modality"]
    mods = sorted(data_cfg["modalities"])
    rna = [m for m in mods if modality_kind(m) == "rna"]
    return rna[0] if rna else mods[0]


def _attach(model, data) -> None:
    from regvi.io import attach_data

    if hasattr(model, "attach"):
        model.attach(data)
    else:
        attach_data(model, data)


def _save_state(model, directory: Path, state: dict[str, Any]) -> None:
    model.save(directory / "model", overwrite=True)
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state))


def train_worker(cfg: dict[str, Any]) -> None:
    """Per-worker training loop (runs inside a Ray Train worker process).

    ``cfg`` holds: ``data`` (path + keys), ``model_kwargs``, ``train_kwargs``, ``evaluation``,
    ``cpus_per_worker``, ``use_gpu``, ``seed``.

    The final report carries where the trial's wall time went (``setup_*_s``, wall-clock
    seconds): from the trial's start to this function (Train controller and worker start-up),
    imports, reading the data, building the model, and training as a whole (epochs plus what
    runs between them).
    """
    stamps = {"enter": time.time()}
    import ray
    import ray.train
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    import regvi
    from regvi.io import load_optimizer_state
    from regvi.sweep.reporting import RayEpochReporter

    stamps["imports"] = time.time()

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    if cfg["use_gpu"]:
        # fractional GPUs: several trials share a device; cap each one's allocator at its share
        from regvi.data.device import limit_gpu_memory

        limit_gpu_memory(cfg["gpus_per_worker"])
    torch.manual_seed(cfg["seed"])
    data_cfg = cfg["data"]
    adata = read_data(data_cfg.get("modalities") or data_cfg["path"])
    stamps["data"] = time.time()
    model = build_model(adata, data_cfg, cfg["model_kwargs"])
    stamps["model"] = time.time()
    state: dict[str, Any] = {"training_done": False, "early_stopping": None}
    optimizer_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _replay_final(checkpoint, rank):
        return  # trained and evaluated before a restart: the same final result, not re-run
    if checkpoint is not None:  # worker restart (FailureConfig): continue from the last epoch
        with checkpoint.as_directory() as d:
            restored = regvi.load(Path(d) / "model")
            model.module.load_state_dict(restored.module.state_dict())
            model.history = restored.history
            state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
            optimizer_state = load_optimizer_state(d)
    train_kwargs = dict(cfg["train_kwargs"])
    max_epochs = int(train_kwargs.pop("max_epochs", 400))
    remaining = max_epochs - len(model.history)
    if not state["training_done"] and remaining > 0:
        reporter = RayEpochReporter(model, rank)
        try:
            model.train(
                max_epochs=remaining,
                accelerator="gpu" if cfg["use_gpu"] else "cpu",
                devices="auto",
                strategy=RayDDPStrategy(),
                plugins=[RayLightningEnvironment()],
                shard=(world, rank),
                callbacks=[reporter],
                progress_bar=False,
                seed=cfg["seed"],
                early_stopping_state=state.get("early_stopping"),
                optimizer_state=optimizer_state,
                **train_kwargs,
            )
        except FloatingPointError as err:
            # not retried (deterministic); the driver turns this into a failed trial
            if rank == 0:
                Path(cfg["divergence_file"]).parent.mkdir(parents=True, exist_ok=True)
                Path(cfg["divergence_file"]).write_text(str(err))
            return
    stamps["trained"] = time.time()
    model.module.cpu().eval()
    final: dict[str, Any] = {
        **_setup_seconds(stamps, cfg.get("trial_start")),
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
            final.update(_evaluate(model, adata, cfg, ckpt_dir))
            _save_state(
                model, ckpt_dir, {"training_done": True, "early_stopping": None, "final": final}
            )
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
        state = json.loads((Path(d) / CHECKPOINT_STATE).read_text())
        final = state.get("final")
        if not state.get("training_done") or final is None:
            return False
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                shutil.copytree(d, tmp, dirs_exist_ok=True)
            final = {**final, "replayed_final": 1.0}
            ray.train.report(
                final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            )
    return True


def _evaluate(model, adata, cfg: dict[str, Any], out: Path) -> dict[str, float]:
    """Posterior means of the fixed evaluation subsample → evaluation metrics and plots.

    The metrics are computed by a warm evaluator of the sweep when one is free (see
    :mod:`regvi.sweep.evaluator`), else here; the low-count robustness metrics re-encode
    thinned counts with the model and so always run here."""
    from evaluation.subsample import stratified_subsample
    from regvi.plotting import plot_training_curves
    from regvi.sweep.evaluator import evaluate_in_pool, evaluate_to_files

    ev_cfg = cfg.get("evaluation", {})
    data = cfg["data"]
    multimodal = isinstance(adata, dict)
    # multimodal: the joint latent is evaluated with the counts of one modality (RNA)
    counts = adata[counts_modality(data)] if multimodal else adata
    lib_key = data.get("library_key") or data.get("batch_key") or data.get("library_size_key")
    label_key = data.get("labels_key")
    strata = [k for k in (label_key, lib_key) if k]
    idx = stratified_subsample(counts.obs, strata, ev_cfg.get("n_subsample", 20_000), cfg["seed"])
    sub = counts[idx].copy()
    sub.obsm["X_regvi"] = model.get_latent_representation(indices=idx, batch_size=1024)
    np.save(out / LATENT_FILE, sub.obsm["X_regvi"], allow_pickle=False)
    np.save(out / EVAL_INDEX_FILE, idx, allow_pickle=False)
    options = {
        "embedding_key": "X_regvi",
        "library_key": lib_key,
        "label_key": label_key,
        "dataset_key": data.get("dataset_key"),
        "technical_keys": _as_list(data.get("technical_covariate_keys")),
        "layer": counts_layer(data),
        "markers": ev_cfg.get("markers"),
        "n_subsample": None,
        "seed": cfg["seed"],
        "scib": ev_cfg.get("scib", True) and label_key is not None,
        "neighbourhood": ev_cfg.get("neighbourhood", True),
        "reference_cache": cfg.get("reference_cache"),
        "n_jobs": int(ev_cfg.get("n_jobs", 1)),
    }
    keys = [k for k in (label_key, lib_key, data.get("dataset_key")) if k]
    umap = bool(ev_cfg.get("umap", True))
    t = time.perf_counter()
    result = None
    if ev_cfg.get("pool", True):
        result = evaluate_in_pool(cfg.get("sweep"), sub, options, keys, umap, coords=multimodal)
    pooled = result is not None
    if result is None:
        result = evaluate_to_files(sub, options, keys, umap, coords=multimodal)
    metrics = {
        k: float(v)
        for k, v in result["metrics"].items()
        if v is not None and math.isfinite(float(v))
    }
    metrics["eval_seconds_total"] = time.perf_counter() - t
    metrics["eval_in_pool"] = float(pooled)
    metrics["eval_warm"] = float(result.get("evaluator_warm", 0.0))
    plots = out / "plots"
    for rel, blob in result["files"].items():
        (plots / rel).parent.mkdir(parents=True, exist_ok=True)
        (plots / rel).write_bytes(blob)
    if ev_cfg.get("lowcount", False):
        metrics.update(_lowcount(model, adata, sub, idx, cfg, label_key, plots))
    plots.mkdir(parents=True, exist_ok=True)
    plot_training_curves(model.history, plots / "training_curves.png")
    if multimodal:
        metrics.update(_attribution(model, idx, result["coords"], label_key, sub.obs, plots))
    return metrics


def _as_list(keys: str | list[str] | None) -> list[str]:
    """A key or a list of keys as a list (a single string is one key, not its letters)."""
    if keys is None:
        return []
    return [keys] if isinstance(keys, str) else list(keys)


def counts_layer(data_cfg: dict[str, Any]) -> str | None:
    """The layer the model reads the evaluated modality's counts from (``None``: ``X``).

    ``data.layer`` is one name, or for multimodal data one name or a dict modality → layer
    (as :class:`regvi.RegMultiVI` takes it)."""
    layer = data_cfg.get("layer")
    if isinstance(layer, dict):
        return layer.get(counts_modality(data_cfg))
    return layer


def _lowcount(model, adata, sub, idx, cfg, label_key, plots: Path) -> dict[str, float]:
    """Low-count robustness: thinned counts of the subsample re-encoded by the model.

    The thinned counts replace the counts the model reads: ``layers[data.layer]`` when the
    sweep sets a layer, else ``X`` (multimodal: the evaluated modality's layer)."""
    import pandas as pd

    from evaluation.evaluate import counts_matrix
    from evaluation.robustness import low_count_robustness

    data = cfg["data"]
    multimodal = isinstance(adata, dict)
    layer = counts_layer(data) if multimodal else data.get("layer")

    def encode(X):
        thinned = sub.copy()
        if layer is None:
            thinned.X = X
        else:
            thinned.layers[layer] = X
        if multimodal:  # thin the evaluated modality only; the others as observed
            name = counts_modality(data)
            other = {m: a[idx].copy() for m, a in adata.items() if m != name}
            return model.get_latent_representation({name: thinned, **other}, batch_size=1024)
        return model.get_latent_representation(thinned, batch_size=1024)

    t = time.perf_counter()
    labels = sub.obs[label_key].astype(str).to_numpy() if label_key else None
    emb = np.asarray(sub.obsm["X_regvi"], dtype=np.float32)
    found = low_count_robustness(encode, counts_matrix(sub, layer), emb, labels, seed=cfg["seed"])
    found = {k: float(v) for k, v in found.items() if v is not None and math.isfinite(float(v))}
    found["eval_seconds_lowcount"] = time.perf_counter() - t
    # the metric tables written by the evaluation include them too
    path = plots / "metrics.json"
    if path.is_file():
        doc = json.loads(path.read_text())
        doc["metrics"].update(found)
        path.write_text(json.dumps(doc, indent=2, default=str))
        pd.Series(doc["metrics"], name="value").to_csv(plots / "metrics.csv", index_label="metric")
    return found


def _attribution(model, idx, coords, label_key, obs, plots: Path) -> dict[str, float]:
    """Jacobian modality attribution on the evaluation subsample: summary + table + PNG
    (``coords``: the UMAP of the subsample's latent)."""
    attr = model.get_modality_attribution(indices=idx, batch_size=256)
    attr.per_cell.to_csv(plots / "attribution_per_cell.csv")
    labels = obs[label_key] if label_key else None
    model.plot_attribution_scatter(
        path=str(plots / "attribution.png"),
        attribution=attr,
        coords=coords,
        labels=labels,
    )
    return {k: float(v) for k, v in attr.summary().items() if math.isfinite(v)}


def model_arguments(static: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Fixed model arguments + this trial's sampled ones; ``name.modality`` entries set one
    modality's value of a per-modality option (scalars are expanded to every modality)."""
    kwargs = dict(static["model"])
    modalities = sorted(static["data"].get("modalities", {}))
    for k, v in params.items():
        if k not in static["model_params"]:
            continue
        if "." in k and modalities:
            base, modality = k.split(".", 1)
            current = kwargs.get(base)
            if not isinstance(current, dict):
                current = (
                    {}
                    if current is None or base == "lr_multipliers"
                    else {m: current for m in modalities}
                )
            kwargs[base] = {**current, modality: v}
        else:
            kwargs[k] = v
    return kwargs


def data_arguments(static: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Fixed data keys + this trial's sampled covariate purposes (lists decoded from JSON)."""
    from regvi.sweep.config import decode_data_value

    data = dict(static["data"])
    for k, v in params.items():
        if k in static.get("data_params", ()):
            data[k] = decode_data_value(v)
    return data


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one Ray Train run (+ evaluation in rank 0)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from regvi.sweep.durable import atomic_filesystem

    static = config["static"]
    params = config["params"]
    model_kwargs = model_arguments(static, params)
    train_kwargs = {
        **static["training"],
        **{k: v for k, v in params.items() if k in static["train_params"]},
    }
    ctx = ray.tune.get_context()
    trial_id = ctx.get_trial_id()
    use_gpu = static["gpus_per_worker"] > 0
    resources = {"CPU": static["cpus_per_worker"]}
    if use_gpu:
        resources["GPU"] = static["gpus_per_worker"]
    os.environ.pop("MLFLOW_RUN_ID", None)  # never let a worker attach to another run
    # set here too for a Ray started outside regvi (without the sweep's runtime env)
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_INTERVAL_S)
    divergence_file = Path(static["train_storage"]) / f"train_{trial_id}" / "DIVERGED"
    if divergence_file.is_file():  # a retry of a diverged trial: deterministic, do not re-run
        raise TrialDiverged(divergence_file.read_text())
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "data": data_arguments(static, params),
            "model_kwargs": model_kwargs,
            "train_kwargs": train_kwargs,
            "evaluation": static["evaluation"],
            "cpus_per_worker": static["cpus_per_worker"],
            "use_gpu": use_gpu,
            "gpus_per_worker": static["gpus_per_worker"],
            "seed": static["seed"],
            "reference_cache": static.get("reference_cache"),
            "sweep": static.get("sweep"),
            "trial_start": time.time(),
            "divergence_file": str(divergence_file),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=static["workers"], use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",  # stable name so restarts find the same run
            storage_path=static["train_storage"],
            storage_filesystem=atomic_filesystem(),  # Train's snapshot never left cut short
            failure_config=ray.train.FailureConfig(max_failures=static.get("max_failures", 2)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
    if divergence_file.is_file():
        raise TrialDiverged(divergence_file.read_text())
