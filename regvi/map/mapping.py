"""Map a query AnnData onto a trained reference model: :func:`map_query` and its steps.

Steps: check every input and build the query model (:func:`regvi.map.plan.prepare`); open the
MLflow run; train only the new categories' terms; encode the query (and reference) cells and
transfer labels; write the output atomically (and the query model); log metrics and plots.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regvi.map.inputs import (
    UNKNOWN,
    MappingSettings,
    check_accelerator,
    parse_fine_tune,
    write_h5ad_atomic,
)
from regvi.map.plan import Plan, prepare
from regvi.map.plots import MAX_PLOT_CELLS, mapping_plots
from regvi.map.tracking import DEFAULT_EXPERIMENT, end_run, log_run, redact, start_run
from regvi.training import QUERY_EPOCHS

#: default maximum number of query training epochs (early stopping usually ends sooner)
DEFAULT_EPOCHS = QUERY_EPOCHS.max_epochs
#: default early-stopping patience of query training, in epochs
DEFAULT_PATIENCE = QUERY_EPOCHS.patience
#: the latent in the output AnnData
LATENT_KEY = "X_regvi"


@dataclass
class MappingResult:
    """What :func:`map_query` produced."""

    #: the written output AnnData
    out: Path
    n_query_cells: int
    #: covariate key → categories the query added to the reference's
    added_categories: dict[str, list[str]]
    #: training time, ELBO, label-transfer summary (and accuracy with query labels)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the MLflow run (``None`` with ``log_mlflow=False``)
    run_id: str | None = None
    tracking_uri: str | None = None
    #: the saved query model directory, if asked for
    model_dir: Path | None = None
    #: the label-transfer table (``None`` without a reference AnnData)
    labels: pd.DataFrame | None = None


def map_query(
    model: str | os.PathLike,
    query: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    labels_key: str = "cell_type",
    query_labels_key: str | None = None,
    train_epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    batch_size: int = 128,
    fine_tune: str | Sequence[str] | None = None,
    allow_missing_genes: bool = False,
    n_neighbors: int = 15,
    threshold: float = 0.5,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    log_mlflow: bool = True,
    seed: int = 0,
    save_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    accelerator: str = "cpu",
    progress_bar: bool = True,
    max_plot_cells: int = MAX_PLOT_CELLS,
) -> MappingResult:
    """Map query cells onto a trained reference model (what ``python -m regvi.map`` runs).

    Parameters
    ----------
    model
        The reference model: a directory, ``runs:/ID/model``, ``models:/NAME@alias`` or
        ``models:/NAME/VERSION`` (resolved in ``tracking_uri``).
    query
        The query ``.h5ad``: raw counts with the reference's covariate columns in ``obs``.
    out
        The output ``.h5ad``: the query with ``obsm["X_regvi"]`` (and transferred labels).
    reference
        The atlas ``.h5ad`` the model was trained on, with labels in ``labels_key``; without it
        there is no label transfer (the output holds the latent only).
    labels_key
        The reference's label column; the output gets ``obs[f"{labels_key}_transferred"]``
        and ``obs[f"{labels_key}_confidence"]``.
    query_labels_key
        The query's own labels (if known) to score the transfer: accuracy, macro-F1 and a
        confusion plot.
    train_epochs
        Most query training epochs (early stopping on the validation ELBO); 0 skips training
        (the new categories keep their data-based initial values).
    patience
        Early-stopping patience in epochs.
    batch_size
        Cells per training minibatch.
    fine_tune
        Also train ``"conditioning"`` and/or ``"encoder"`` (see
        :meth:`regvi.RegVI.load_query_data`); a comma-separated string or a sequence.
    allow_missing_genes
        Fill reference genes the query lacks with zero counts instead of refusing.
    n_neighbors, threshold
        kNN label transfer settings (:func:`regvi.map.labels.transfer_labels`).
    tracking_uri
        MLflow tracking URI (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///`` ``mlflow.db``
        next to ``out``); also where ``models:/`` and ``runs:/`` URIs are resolved.
    experiment
        MLflow experiment of the mapping run.
    log_mlflow
        Log a mapping run (params, metrics, UMAP and confusion plots, model lineage tags).
    seed
        Seed of query training, the plots' subsample and UMAP.
    save_model
        Also save the trained query model to this directory.
    overwrite
        Replace an existing ``out`` / ``save_model``.
    accelerator
        ``"cpu"``, ``"gpu"`` or ``"auto"`` for query training.
    progress_bar
        Show a progress bar over the training epochs.
    max_plot_cells
        Most cells in the UMAP plot.

    Returns
    -------
    MappingResult
        The output path, the added categories, the metrics and the MLflow run id.

    Raises
    ------
    MappingInputError
        On any bad input, before training and before anything is written.
    """
    # locals() here are exactly the arguments above
    settings = MappingSettings(**{**locals(), "fine_tune": parse_fine_tune(fine_tune)})
    check_accelerator(accelerator)
    plan = prepare(settings)
    return _map(plan, settings)


def _map(plan: Plan, s: MappingSettings) -> MappingResult:
    """Open the mapping run, map the cells, close the run (``FAILED`` on any error)."""
    added = {k: list(v) for k, v in plan.query_model.query.added_categories.items()}
    params = _run_params(plan, s, added)
    c, run_id = start_run(plan, s.experiment, params)
    try:
        result = _run(plan, s, params, added, c, run_id)
    except BaseException:
        with contextlib.suppress(Exception):
            end_run(c, run_id, "FAILED")
        raise
    end_run(c, run_id, "FINISHED")
    result.tracking_uri = plan.uri
    return result


def _run_params(plan: Plan, s: MappingSettings, added: dict[str, list[str]]) -> dict[str, Any]:
    """The settings of the mapping (MLflow params and ``uns["regvi_mapping"]``)."""
    has_reference = s.reference is not None
    return {
        "model": redact(plan.model_text),
        "query": str(plan.query_path.resolve()),
        "reference": str(Path(s.reference).resolve()) if has_reference else "",
        "out": str(plan.out.resolve()),
        "n_query_cells": plan.query.n_obs,
        "n_reference_cells": plan.reference.n_obs if plan.reference is not None else 0,
        "new_categories": json.dumps(added),
        "n_new_categories": sum(len(v) for v in added.values()),
        "fine_tune": ",".join(s.fine_tune) or "none",
        "train_epochs": s.train_epochs,
        "patience": s.patience,
        "batch_size": s.batch_size,
        "labels_key": s.labels_key if has_reference else "",
        "query_labels_key": s.query_labels_key or "",
        "n_neighbors": s.n_neighbors,
        "threshold": s.threshold,
        "allow_missing_genes": s.allow_missing_genes,
        "seed": s.seed,
    }


def _train(plan: Plan, s: MappingSettings, added: dict[str, list[str]]) -> dict[str, float]:
    """Train the query model's new terms (if any); training time, epochs and ELBO."""
    qm = plan.query_model
    metrics: dict[str, float] = {"n_query_cells": float(plan.query.n_obs)}
    t0 = time.perf_counter()
    if s.train_epochs > 0 and (added or s.fine_tune):  # nothing new nor fine-tuned: no training
        n_val = 0.1 if plan.query.n_obs >= 20 else 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            qm.train(
                max_epochs=s.train_epochs,
                batch_size=s.batch_size,
                validation_fraction=n_val,
                early_stopping=True,
                patience=s.patience,
                seed=s.seed,
                accelerator=s.accelerator,
                progress_bar=s.progress_bar,
            )
    metrics["query_train_time_s"] = time.perf_counter() - t0
    history = qm.history
    metrics["query_n_epochs"] = float(len(history))
    for col in ("train_elbo", "validation_elbo"):
        if len(history) and col in history and pd.notna(history[col].iloc[-1]):
            metrics[f"query_final_{col}"] = float(history[col].iloc[-1])
    metrics["query_elbo"] = float(qm.get_elbo(seed=s.seed))
    return metrics


def _transfer(
    plan: Plan, s: MappingSettings, latent: np.ndarray, metrics: dict[str, float]
) -> tuple[pd.DataFrame, np.ndarray]:
    """kNN label transfer from the reference cells; its summary (and scores) into ``metrics``."""
    from regvi.map.labels import transfer_accuracy, transfer_labels, write_to_obs

    ref_latent = plan.query_model.get_latent_representation(plan.reference)
    table = transfer_labels(
        ref_latent,
        plan.reference_labels.to_numpy(),
        latent,
        n_neighbors=s.n_neighbors,
        threshold=s.threshold,
        unknown_label=UNKNOWN,
        query_index=plan.query.obs_names,
    )
    write_to_obs(plan.query, table, key=s.labels_key)
    metrics["fraction_unknown"] = float((table["label"] == UNKNOWN).mean())
    metrics["mean_confidence"] = float(table["confidence"].mean())
    if plan.query_labels is not None:
        acc = transfer_accuracy(plan.query_labels, table["label"], unknown_label=UNKNOWN)
        for k in ("accuracy", "accuracy_called", "macro_f1"):
            metrics[k] = float(acc[k])
        metrics["fraction_unknown_scored"] = float(acc["fraction_unknown"])
    return table, ref_latent


def _write(
    plan: Plan, s: MappingSettings, params: dict[str, Any], run_id: str | None
) -> Path | None:
    """The output AnnData (with the settings in ``uns``) and, if asked for, the query model."""
    plan.query.uns["regvi_mapping"] = {
        k: (v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v))
        for k, v in params.items()
    } | ({"mlflow_run_id": run_id} if run_id else {})
    write_h5ad_atomic(plan.query, plan.out)
    if plan.model_dir is None:
        return None
    plan.query_model.save(plan.model_dir, overwrite=s.overwrite)
    return plan.model_dir


def _run(
    plan: Plan,
    s: MappingSettings,
    params: dict[str, Any],
    added: dict[str, list[str]],
    c: Any,
    run_id: str | None,
) -> MappingResult:
    """Train, encode, transfer labels, write the outputs and log them on the run."""
    metrics = _train(plan, s, added)
    latent = plan.query_model.get_latent_representation()
    plan.query.obsm[LATENT_KEY] = latent
    table, ref_latent = None, None
    if plan.reference is not None and plan.reference_labels is not None:
        table, ref_latent = _transfer(plan, s, latent, metrics)
    model_dir = _write(plan, s, params, run_id)
    if c is not None and run_id is not None:
        with tempfile.TemporaryDirectory(prefix="regvi-map-") as tmp:
            plots = mapping_plots(Path(tmp), plan, s, latent, ref_latent, table, added)
            log_run(c, run_id, metrics, plots)
    return MappingResult(
        out=plan.out,
        n_query_cells=int(plan.query.n_obs),
        added_categories=added,
        metrics=metrics,
        run_id=run_id,
        model_dir=model_dir,
        labels=table,
    )
