"""What a mapping checks before training: the model, the query, the reference, the query model.

:func:`prepare` checks the cheap things first (numbers, paths, the tracking URI), then loads the
reference model, reads the query (and reference) AnnData and builds the query model; it writes
nothing, and every refusal is a :class:`regvi.map.inputs.MappingInputError`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from regvi.map.inputs import (
    UNKNOWN,
    MappingSettings,
    check_numbers,
    check_paths,
    fail,
    read_h5ad,
)
from regvi.map.tracking import is_mlflow_uri, model_lineage, redact, resolve_uri, sqlite_path
from regvi.map.tracking import tracking as use_tracking_uri

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything :func:`regvi.map.mapping.map_query` checked before training."""

    model_text: str
    reference_model: Any
    query_path: Path
    query: Any  # AnnData as read (written back with the results)
    query_model: Any
    out: Path
    model_dir: Path | None
    reference: Any  # reference AnnData aligned to the model's genes, or None
    reference_labels: pd.Series | None
    query_labels: pd.Series | None
    uri: str | None
    lineage: dict[str, str]


def _reason(err: Exception) -> Any:
    """A KeyError's message without the quotes ``str(KeyError)`` adds."""
    return err.args[0] if isinstance(err, KeyError) and err.args else err


def _model_uri(text: str, tracking_uri: str | None, out: Path, log_mlflow: bool) -> str | None:
    """The tracking URI (if MLflow is used); refuses a model that is neither a URI nor a folder."""
    is_uri = is_mlflow_uri(text)
    uri = resolve_uri(tracking_uri, out, needed=log_mlflow or is_uri)
    if is_uri and uri is not None:
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            raise fail(
                "--tracking-uri",
                f"{uri} does not exist, so {text!r} cannot be found there "
                "(pass the tracking URI the model was registered in)",
            )
    elif not is_uri and not Path(text).is_dir():
        raise fail("--model", f"{text!r} is not a model directory nor an MLflow model URI")
    return uri


def _load_model(text: str, uri: str | None, log_mlflow: bool) -> tuple[Any, dict[str, str]]:
    """The trained reference RegVI and its lineage tags (empty when MLflow is not used)."""
    from regvi.io import load
    from regvi.model import RegVI

    is_uri = is_mlflow_uri(text)
    with use_tracking_uri(uri if is_uri else None):
        try:
            reference_model = load(text)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            raise fail("--model", f"cannot load {redact(text)!r}: {err}") from None
        lineage = {}
        if log_mlflow or is_uri:
            try:
                lineage = model_lineage(text, uri)
            except Exception as err:  # MLflow raises its own exception types
                raise fail("--model", f"cannot resolve {redact(text)!r}: {err}") from None
    if not isinstance(reference_model, RegVI):
        raise fail(
            "--model",
            f"{redact(text)!r} is a {type(reference_model).__name__}; mapping needs a RegVI",
        )
    if not reference_model.is_trained:
        raise fail("--model", f"{redact(text)!r} is not trained")
    return reference_model, lineage


def _read_query(path: Path, labels_key: str | None) -> tuple[Any, pd.Series | None]:
    """The query AnnData (with cells) and its own labels (``--query-labels-key``) if asked for."""
    adata = read_h5ad(path, "--query")
    if adata.n_obs == 0:
        raise fail("--query", f"{str(path)!r} has no cells")
    if not labels_key:
        return adata, None
    if labels_key not in adata.obs.columns:
        raise fail(
            "--query-labels-key",
            f"{labels_key!r} is not a column of the query's obs "
            f"(columns: {list(adata.obs.columns)[:20]})",
        )
    return adata, adata.obs[labels_key]


def _reference_labels(ref: Any, path: Path, labels_key: str, n_neighbors: int) -> pd.Series:
    """The reference's labels: a column with at least ``n_neighbors`` labels, none ``unknown``."""
    if labels_key not in ref.obs.columns:
        raise fail(
            "--labels-key",
            f"{labels_key!r} is not a column of the reference's obs "
            f"({str(path)!r}; columns: {list(ref.obs.columns)[:20]})",
        )
    labels = ref.obs[labels_key]
    n_labelled = int(labels.notna().sum())
    if n_labelled < n_neighbors:
        raise fail(
            "--n-neighbors",
            f"{n_neighbors} neighbours but the reference has {n_labelled} labelled cells "
            f"in obs[{labels_key!r}]",
        )
    if UNKNOWN in {str(v) for v in pd.unique(labels.dropna())}:
        raise fail(
            "--labels-key",
            f"obs[{labels_key!r}] uses {UNKNOWN!r} as a label, which marks uncalled cells",
        )
    return labels


def _read_reference(
    path: Path, s: MappingSettings, query: Any, reference_model: Any
) -> tuple[Any, pd.Series]:
    """The reference AnnData aligned to the model's genes, and its labels."""
    from regvi.map.query import align_genes

    if not query.obs_names.is_unique:
        raise fail("--query", "obs_names are not unique; make them unique for label transfer")
    raw = read_h5ad(path, "--reference")
    labels = _reference_labels(raw, path, s.labels_key, s.n_neighbors)
    reg = reference_model.registry
    try:
        return align_genes(raw, reg.var_names, reg.layer, False), labels
    except ValueError as err:
        raise fail("--reference", f"genes do not match the model: {err}") from None


def _query_model(adata: Any, path: Path, reference_model: Any, s: MappingSettings) -> Any:
    """:meth:`regvi.RegVI.load_query_data` (genes, covariates and counts are checked there)."""
    from regvi.model import RegVI

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*missing in the query.*")
            query_model = RegVI.load_query_data(
                adata,
                reference_model,
                allow_missing_genes=s.allow_missing_genes,
                fine_tune=s.fine_tune,
            )
    except (ValueError, KeyError, TypeError) as err:
        raise fail("--query", f"{str(path)!r} does not fit the model: {_reason(err)}") from None
    if s.allow_missing_genes:
        n_missing = len(set(reference_model.registry.var_names) - set(map(str, adata.var_names)))
        if n_missing:
            logger.warning("%d reference genes are missing in the query (zero counts)", n_missing)
    return query_model


def _check_reference_fits(query_model: Any, ref_adata: Any, path: Path) -> None:
    """Covariates / counts of the reference cells: encode a few now, all after training."""
    try:
        query_model.get_latent_representation(ref_adata, indices=np.arange(min(8, ref_adata.n_obs)))
    except (ValueError, KeyError, TypeError) as err:
        raise fail("--reference", f"{str(path)!r} does not fit the model: {_reason(err)}") from None


def prepare(s: MappingSettings) -> Plan:
    """Check every input (cheap checks first) and build the query model; writes nothing."""
    check_numbers(s)
    paths = check_paths(s)
    text = str(s.model)
    uri = _model_uri(text, s.tracking_uri, paths.out, s.log_mlflow)
    reference_model, lineage = _load_model(text, uri, s.log_mlflow)
    adata, q_labels = _read_query(paths.query, s.query_labels_key)
    ref_adata, ref_labels = None, None
    if paths.reference is not None:
        ref_adata, ref_labels = _read_reference(paths.reference, s, adata, reference_model)
    query_model = _query_model(adata, paths.query, reference_model, s)
    if ref_adata is not None:
        _check_reference_fits(query_model, ref_adata, paths.reference)
    return Plan(
        text,
        reference_model,
        paths.query,
        adata,
        query_model,
        paths.out,
        paths.model_dir,
        ref_adata,
        ref_labels,
        q_labels,
        uri if s.log_mlflow else None,
        lineage,
    )
