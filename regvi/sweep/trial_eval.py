"""A trial's evaluation glue: the trained model's latent of the fixed evaluation subsample →
metrics, tables and figures in the trial's final checkpoint (rank 0 of its Train workers).

The metrics are computed by a warm evaluator of the sweep when one is free (see
:mod:`regvi.sweep.evaluator`), else here; the low-count robustness metrics re-encode thinned
counts with the model and the multimodal attribution needs the model, so both always run here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from regvi.sweep import checkpoints
from regvi.sweep.evaluator import evaluate_in_pool, evaluate_to_files
from regvi.sweep.settings import TrialSettings


def counts_modality(data_cfg: dict[str, Any]) -> str:
    """The modality whose counts the evaluation uses (default: the RNA-like one)."""
    from regvi.multimodal import modality_kind

    if data_cfg.get("counts_modality"):
        return data_cfg["counts_modality"]
    mods = sorted(data_cfg["modalities"])
    rna = [m for m in mods if modality_kind(m) == "rna"]
    return rna[0] if rna else mods[0]


def counts_layer(data_cfg: dict[str, Any]) -> str | None:
    """The layer the model reads the evaluated modality's counts from (``None``: ``X``).

    ``data.layer`` is one name, or for multimodal data one name or a dict modality → layer
    (as :class:`regvi.RegMultiVI` takes it)."""
    layer = data_cfg.get("layer")
    if isinstance(layer, dict):
        return layer.get(counts_modality(data_cfg))
    return layer


def _as_list(keys: str | list[str] | None) -> list[str]:
    """A key or a list of keys as a list (a single string is one key, not its letters)."""
    if keys is None:
        return []
    return [keys] if isinstance(keys, str) else list(keys)


def evaluate_trial(model, adata, settings: TrialSettings, out: Path) -> dict[str, float]:
    """Posterior means of the fixed evaluation subsample → evaluation metrics; the subsample's
    latent, tables and figures are written into the checkpoint folder ``out``."""
    from evaluation.subsample import stratified_subsample
    from regvi.plotting import plot_training_curves

    ev = settings.evaluation
    data = settings.data
    multimodal = isinstance(adata, dict)
    # multimodal: the joint latent is evaluated with the counts of one modality (RNA)
    counts = adata[counts_modality(data)] if multimodal else adata
    lib_key = data.get("library_key") or data.get("batch_key") or data.get("library_size_key")
    label_key = data.get("labels_key")
    strata = [k for k in (label_key, lib_key) if k]
    idx = stratified_subsample(counts.obs, strata, ev.n_subsample, settings.seed)
    sub = counts[idx].copy()
    sub.obsm["X_regvi"] = model.get_latent_representation(indices=idx, batch_size=1024)
    checkpoints.write_evaluation_subsample(out, sub.obsm["X_regvi"], idx)
    options = {
        "embedding_key": "X_regvi",
        "library_key": lib_key,
        "label_key": label_key,
        "dataset_key": data.get("dataset_key"),
        "technical_keys": _as_list(data.get("technical_covariate_keys")),
        "layer": counts_layer(data),
        "markers": ev.markers,
        "n_subsample": None,
        "seed": settings.seed,
        "scib": ev.scib and label_key is not None,
        "neighbourhood": ev.neighbourhood,
        "reference_cache": settings.reference_cache,
        "n_jobs": int(ev.n_jobs),
        "kmeans_starts": int(ev.kmeans_starts),
    }
    keys = [k for k in (label_key, lib_key, data.get("dataset_key")) if k]
    umap = bool(ev.umap)
    t = time.perf_counter()
    result = None
    if ev.pool:
        result = evaluate_in_pool(settings.sweep, sub, options, keys, umap, coords=multimodal)
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
    plots = checkpoints.plots_dir(out)
    for rel, blob in result["files"].items():
        (plots / rel).parent.mkdir(parents=True, exist_ok=True)
        (plots / rel).write_bytes(blob)
    if ev.lowcount:
        metrics.update(lowcount(model, adata, sub, idx, data, settings.seed, label_key, plots))
    plots.mkdir(parents=True, exist_ok=True)
    plot_training_curves(model.history, plots / "training_curves.png")
    if multimodal and model.config.latent_mode == "concat":  # "poe" has no latent blocks
        metrics.update(attribution(model, idx, result["coords"], label_key, sub.obs, plots))
    return metrics


def lowcount(
    model, adata, sub, idx, data: dict[str, Any], seed: int, label_key, plots: Path
) -> dict[str, float]:
    """Low-count robustness: thinned counts of the subsample re-encoded by the model.

    The thinned counts replace the counts the model reads: ``layers[data.layer]`` when the
    sweep sets a layer, else ``X`` (multimodal: the evaluated modality's layer)."""
    import pandas as pd

    from evaluation.evaluate import counts_matrix
    from evaluation.robustness import low_count_robustness

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
    found = low_count_robustness(encode, counts_matrix(sub, layer), emb, labels, seed=seed)
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


def attribution(model, idx, coords, label_key, obs, plots: Path) -> dict[str, float]:
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
