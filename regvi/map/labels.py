"""Label transfer from a reference atlas to query cells by kNN voting in a shared latent space.

This module is deliberately light: it needs only numpy, pandas, scikit-learn and (for
:func:`confusion_plot`) matplotlib, so it can be used on any latent representation (a regvi
latent, a PCA, ...) without importing torch.

Typical use after mapping a query onto a trained reference model::

    table = transfer_labels(
        reference_latent, reference_adata.obs["cell_type"], query_latent,
        query_index=query_adata.obs_names,
    )
    write_to_obs(query_adata, table, key="cell_type")
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

__all__ = ["confusion_plot", "transfer_accuracy", "transfer_labels", "write_to_obs"]

WEIGHTINGS = ("distance", "uniform")

#: default number of query cells per kNN search chunk (bounds the temporary arrays)
DEFAULT_CHUNK_SIZE = 20_000


# --------------------------------------------------------------------------- validation helpers
def _as_latent(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite 2-D float array, or a ValueError naming ``name``."""
    try:
        arr = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic array-likes
        raise ValueError(
            f"{name}: expected a 2-D numeric array, could not convert it ({err})"
        ) from err
    if arr.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array (cells x latent dimensions), got {arr.ndim} dimension(s) "
            f"with shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name}: expected a non-empty array (at least 1 cell and 1 latent dimension), "
            f"got shape {arr.shape}"
        )
    if arr.dtype.kind == "b" or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{name}: expected only finite values, found NaN/inf in {rows.size} row(s) "
            f"(first rows: {rows[:5].tolist()})"
        )
    return arr


def _as_label_array(labels: Any, name: str) -> tuple[np.ndarray, np.ndarray, list[Any] | None]:
    """Return (values as object array, missing mask, categorical order or None)."""
    if isinstance(labels, pd.DataFrame):
        raise ValueError(f"{name}: expected a 1-D sequence of labels, got a DataFrame")
    categories: list[Any] | None = None
    if isinstance(labels, pd.Series) and isinstance(labels.dtype, pd.CategoricalDtype):
        categories = list(labels.cat.categories)
    elif isinstance(labels, pd.Categorical):
        categories = list(labels.categories)
    values = np.asarray(labels, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of labels, got shape {values.shape}")
    missing = np.asarray(pd.isna(values), dtype=bool)
    return values, missing, categories


def _check_weighting(weighting: Any) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- voting
def _neighbour_weights(distances: np.ndarray, weighting: str) -> np.ndarray:
    """Vote weights for a (cells x k) distance block (see :func:`transfer_labels`)."""
    if weighting == "uniform":
        return np.ones_like(distances, dtype=np.float64)
    d = distances.astype(np.float64, copy=False)
    zero = d <= 0.0
    with np.errstate(divide="ignore"):
        w = 1.0 / d
    has_zero = zero.any(axis=1)
    if has_zero.any():
        # exact duplicates of a reference cell: those neighbours share all the weight
        w[has_zero] = zero[has_zero].astype(np.float64)
    return w


def _check_settings(
    weighting: Any, threshold: Any, n_neighbors: Any, chunk_size: Any
) -> tuple[int, int]:
    """Check the scalar settings; returns ``n_neighbors`` and ``chunk_size`` as ints."""
    _check_weighting(weighting)
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not (0.0 <= float(threshold) <= 1.0)
    ):
        raise ValueError(f"threshold: expected a number in [0, 1], got {threshold!r}")
    return _check_int(n_neighbors, "n_neighbors", 1), _check_int(chunk_size, "chunk_size", 1)


def _check_latents(reference_latent: Any, query_latent: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both latents as finite 2-D float arrays of the same width."""
    ref = _as_latent(reference_latent, "reference_latent")
    query = _as_latent(query_latent, "query_latent")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(
            f"query_latent: expected {ref.shape[1]} latent dimensions like reference_latent, "
            f"got {query.shape[1]}"
        )
    return ref, query


def _reference_labels(
    reference_labels: Any, n_reference: int, n_neighbors: int
) -> tuple[np.ndarray, np.ndarray, list[Any] | None]:
    """Label values, labelled mask and categorical order (or None), with enough labelled cells."""
    values, missing, categories = _as_label_array(reference_labels, "reference_labels")
    if values.shape[0] != n_reference:
        raise ValueError(
            f"reference_labels: expected one label per reference_latent row ({n_reference}), "
            f"got {values.shape[0]}"
        )
    labelled = ~missing
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        raise ValueError("reference_labels: expected at least one labelled cell, all are missing")
    if n_neighbors > n_labelled:
        raise ValueError(
            f"n_neighbors: expected at most the number of labelled reference cells ({n_labelled}), "
            f"got {n_neighbors}"
        )
    return values, labelled, categories


def _label_classes(
    values: np.ndarray, labelled: np.ndarray, categories: list[Any] | None, unknown_label: str
) -> list[Any]:
    """The labels present, in categorical (else sorted) order; ``unknown_label`` not among them."""
    present = pd.unique(values[labelled])
    if categories is not None:
        present_set = set(present)
        classes = [c for c in categories if c in present_set]
    else:
        try:
            classes = sorted(present)
        except TypeError:  # mixed, unorderable label types
            classes = sorted(present, key=str)
    if unknown_label in set(classes):
        raise ValueError(
            f"unknown_label: {unknown_label!r} is also a reference label; pick another "
            "unknown_label or mark those reference cells as missing (NaN)"
        )
    return classes


def _output_index(query_index: Sequence[Any] | pd.Index | None, n_query: int) -> pd.Index:
    """The output table's index: ``query_index`` (one entry per query cell) or ``0..n-1``."""
    if query_index is not None:
        out_index = pd.Index(query_index)
        if len(out_index) != n_query:
            raise ValueError(
                f"query_index: expected {n_query} entries (one per query_latent row), "
                f"got {len(out_index)}"
            )
    else:
        out_index = pd.RangeIndex(n_query)
    return out_index


def _knn_vote(
    nn: NearestNeighbors,
    codes: np.ndarray,
    n_classes: int,
    query: np.ndarray,
    weighting: str,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Winning class code and its vote share (clipped to [0, 1]) per query cell, by chunks."""
    n_query = query.shape[0]
    winner = np.empty(n_query, dtype=np.intp)
    confidence = np.empty(n_query, dtype=np.float64)
    for start in range(0, n_query, chunk_size):
        stop = min(start + chunk_size, n_query)
        dist, idx = nn.kneighbors(query[start:stop], return_distance=True)
        w = _neighbour_weights(dist, weighting)
        n_rows = stop - start
        flat = (np.arange(n_rows)[:, None] * n_classes + codes[idx]).ravel()
        votes = np.bincount(flat, weights=w.ravel(), minlength=n_rows * n_classes)
        votes = votes.reshape(n_rows, n_classes)
        total = votes.sum(axis=1)
        best = votes.argmax(axis=1)  # first maximum: ties go to the earlier label
        winner[start:stop] = best
        confidence[start:stop] = votes[np.arange(n_rows), best] / total
    np.clip(confidence, 0.0, 1.0, out=confidence)
    return winner, confidence


def transfer_labels(
    reference_latent: Any,
    reference_labels: Any,
    query_latent: Any,
    *,
    n_neighbors: int = 15,
    threshold: float = 0.5,
    unknown_label: str = "unknown",
    weighting: str = "distance",
    prefix: str = "",
    query_index: Sequence[Any] | pd.Index | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    r"""Transfer reference cell labels to query cells by a weighted kNN vote in a latent space.

    For every query cell the ``n_neighbors`` nearest *labelled* reference cells are found
    (exact Euclidean kNN with :class:`sklearn.neighbors.NearestNeighbors`, ``algorithm="auto"``,
    i.e. the KD-tree / ball-tree / brute-force choice scikit-learn makes for the data). The query
    is searched in chunks of ``chunk_size`` cells so memory stays bounded for 10^5–10^6 cells.
    Each neighbour votes for its label with weight :math:`w_{ij}`:

    * ``weighting="distance"`` (inverse distance, as ``KNeighborsClassifier(weights="distance")``)

      .. math:: w_{ij} = \frac{1}{d_{ij}},

      where :math:`d_{ij}` is the Euclidean latent distance between query cell :math:`i` and its
      neighbour :math:`j`. If some neighbours are at distance exactly 0 (duplicates of a reference
      cell), those neighbours get weight 1 and all others weight 0.
    * ``weighting="uniform"``: :math:`w_{ij} = 1` (plain majority vote).

    The confidence of query cell :math:`i` is the weighted vote share of the winning label

    .. math:: c_i = \max_\ell \frac{\sum_j w_{ij}\,[y_j = \ell]}{\sum_j w_{ij}},

    ties being broken by label order (categorical order if ``reference_labels`` is categorical,
    else sorted). The predicted label is the winning label if :math:`c_i \ge` ``threshold`` and
    ``unknown_label`` otherwise; the uncertainty is :math:`1 - c_i`.

    Parameters
    ----------
    reference_latent
        ``(n_reference, d)`` array of reference cells in the latent space.
    reference_labels
        ``n_reference`` labels (pandas Series / Categorical / array of strings). Missing values
        (NaN / None) mark unlabelled cells: they are left out of the kNN index and never vote.
    query_latent
        ``(n_query, d)`` array of query cells in the same latent space.
    n_neighbors
        Number of labelled reference neighbours per query cell, ``1 <= n_neighbors <=`` number of
        labelled reference cells.
    threshold
        Confidence in ``[0, 1]`` below which a cell is called ``unknown_label``; 0 never calls
        unknown.
    unknown_label
        Label for low-confidence cells; must not be one of the reference labels.
    weighting
        ``"distance"`` (inverse distance) or ``"uniform"``.
    prefix
        Prefix for the output column names.
    query_index
        Optional index for the output (e.g. ``query_adata.obs_names``), ``n_query`` long.
        Defaults to ``0 .. n_query - 1`` (query order).
    chunk_size
        Query cells per kNN search chunk.
    n_jobs
        Passed to :class:`~sklearn.neighbors.NearestNeighbors`.

    Returns
    -------
    pandas.DataFrame
        One row per query cell, in query order, with columns ``f"{prefix}label"`` (categorical:
        the reference labels, then ``unknown_label``), ``f"{prefix}confidence"`` and
        ``f"{prefix}uncertainty"`` (``1 - confidence``).

    Raises
    ------
    ValueError
        On bad input, before any neighbour search: latents that are not 2-D, empty, non-finite
        or of different widths; ``reference_labels`` of the wrong length or with no labelled cell;
        ``n_neighbors`` outside ``[1, n_labelled_reference]``; ``threshold`` outside ``[0, 1]``;
        an unknown ``weighting``; ``unknown_label`` among the reference labels; a ``query_index``
        of the wrong length.

    Notes
    -----
    The confidence measures how much a cell's neighbours *agree*, not how close they are: a
    query cell type absent from the reference is called ``unknown_label`` when its neighbours
    come from several reference types, but a novel type that lies next to a single reference
    type gets that type's label with high confidence (on Kang 2018 PBMC with NK cells removed
    from the reference, query NK cells are called CD4 T cells).
    """
    # ---- validate everything before doing any work
    n_neighbors, chunk_size = _check_settings(weighting, threshold, n_neighbors, chunk_size)
    ref, query = _check_latents(reference_latent, query_latent)
    values, labelled, categories = _reference_labels(reference_labels, ref.shape[0], n_neighbors)
    classes = _label_classes(values, labelled, categories, unknown_label)
    out_index = _output_index(query_index, query.shape[0])

    # ---- kNN vote
    ref_lab = ref[labelled] if not labelled.all() else ref
    codes = pd.Categorical(values[labelled], categories=classes).codes.astype(np.intp)
    n_classes = len(classes)
    nn = NearestNeighbors(n_neighbors=n_neighbors, algorithm="auto", n_jobs=n_jobs)
    nn.fit(ref_lab)
    winner, confidence = _knn_vote(nn, codes, n_classes, query, weighting, chunk_size)

    call = confidence >= float(threshold)
    out_codes = np.where(call, winner, n_classes)
    label = pd.Categorical.from_codes(out_codes, categories=[*classes, unknown_label])
    return pd.DataFrame(
        {
            f"{prefix}label": label,
            f"{prefix}confidence": confidence,
            f"{prefix}uncertainty": 1.0 - confidence,
        },
        index=out_index,
    )


# --------------------------------------------------------------------------- AnnData helper
def write_to_obs(
    adata: Any, table: pd.DataFrame, key: str = "cell_type", *, prefix: str = ""
) -> None:
    """Write a :func:`transfer_labels` table into ``adata.obs``, aligned by ``obs_names``.

    Adds ``f"{key}_transferred"`` (the label, categorical) and ``f"{key}_confidence"``; existing
    columns of those names are overwritten. ``adata`` is modified in place.

    Parameters
    ----------
    adata
        An AnnData (anything with ``obs`` and ``obs_names``) holding the query cells.
    table
        Output of :func:`transfer_labels`, indexed by the query ``obs_names`` (pass
        ``query_index=adata.obs_names`` to :func:`transfer_labels`). Its rows may be in any order.
    key
        Base name of the new ``obs`` columns.
    prefix
        The ``prefix`` the table was made with.

    Raises
    ------
    ValueError
        If ``table`` lacks the label/confidence columns, if its index is not exactly the set of
        ``adata.obs_names`` (or either has duplicates).
    """
    label_col, conf_col = f"{prefix}label", f"{prefix}confidence"
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table: expected the DataFrame from transfer_labels, got {type(table)}")
    missing_cols = [c for c in (label_col, conf_col) if c not in table.columns]
    if missing_cols:
        raise ValueError(
            f"table: expected columns {[label_col, conf_col]} (prefix={prefix!r}), "
            f"missing {missing_cols}; columns are {list(table.columns)}"
        )
    if not isinstance(key, str) or not key:
        raise ValueError(f"key: expected a non-empty string, got {key!r}")
    obs_names = pd.Index(adata.obs_names)
    if obs_names.has_duplicates:
        raise ValueError(
            "adata: obs_names are not unique; cannot align the table (adata.obs_names_make_unique())"
        )
    if table.index.has_duplicates:
        raise ValueError("table: index has duplicate entries; cannot align it to adata.obs_names")
    tab_index = pd.Index(table.index.astype(str))
    if len(tab_index) != len(obs_names) or not tab_index.isin(obs_names).all():
        n_extra = int((~tab_index.isin(obs_names)).sum())
        n_absent = int((~obs_names.isin(tab_index)).sum())
        hint = (
            " (the table has a default 0..n-1 index: pass query_index=adata.obs_names to transfer_labels)"
            if isinstance(table.index, pd.RangeIndex)
            else ""
        )
        raise ValueError(
            f"table: index does not match adata.obs_names ({len(tab_index)} table rows vs "
            f"{len(obs_names)} cells; {n_extra} table rows not in adata, {n_absent} cells not in "
            f"the table){hint}"
        )
    aligned = table.set_axis(tab_index).reindex(obs_names)
    label = aligned[label_col]
    if isinstance(table[label_col].dtype, pd.CategoricalDtype):
        label = pd.Categorical(label, categories=table[label_col].cat.categories)
    adata.obs[f"{key}_transferred"] = (
        np.asarray(label) if not isinstance(label, pd.Categorical) else label
    )
    adata.obs[f"{key}_confidence"] = aligned[conf_col].to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------- evaluation
def _paired_labels(
    true_labels: Any, predicted: Any, unknown_label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """(true as str, predicted as str, known-truth mask, true categories as str), validated."""
    if isinstance(predicted, pd.DataFrame):
        raise ValueError(
            "predicted: expected a 1-D sequence of labels, got a DataFrame "
            "(pass the label column, e.g. table['label'])"
        )
    if (
        isinstance(true_labels, pd.Series)
        and isinstance(predicted, pd.Series)
        and not true_labels.index.equals(predicted.index)
    ):
        if len(true_labels) == len(predicted) and predicted.index.isin(true_labels.index).all():
            if predicted.index.has_duplicates or true_labels.index.has_duplicates:
                raise ValueError("predicted: index has duplicates; cannot align to true_labels")
            predicted = predicted.reindex(true_labels.index)
        else:
            raise ValueError(
                "predicted: its index does not match the index of true_labels "
                "(pass arrays to compare by position)"
            )
    true, true_missing, true_categories = _as_label_array(true_labels, "true_labels")
    pred, pred_missing, _ = _as_label_array(predicted, "predicted")
    if true.shape[0] != pred.shape[0]:
        raise ValueError(
            f"predicted: expected one label per entry of true_labels ({true.shape[0]}), "
            f"got {pred.shape[0]}"
        )
    if true.shape[0] == 0:
        raise ValueError("true_labels: expected at least one cell, got an empty sequence")
    true_s = np.array([str(v) for v in true], dtype=object)
    pred_s = np.array([str(v) for v in pred], dtype=object)
    pred_s[pred_missing] = unknown_label  # a missing prediction is no call
    known = ~true_missing & (true_s != unknown_label)
    order = None if true_categories is None else [str(c) for c in true_categories]
    return true_s, pred_s, known, order


def transfer_accuracy(
    true_labels: Any, predicted: Any, unknown_label: str = "unknown"
) -> dict[str, float | int]:
    """Accuracy, macro-F1 and unknown rate of transferred labels against known labels.

    Only cells whose true label is known (not NaN and not ``unknown_label``) are scored.
    Labels are compared as strings.

    Parameters
    ----------
    true_labels
        Ground-truth labels (Series / Categorical / array), NaN for unknown.
    predicted
        Predicted labels, e.g. ``table["label"]`` from :func:`transfer_labels`; same length (if
        both are pandas Series with different indexes they are aligned by index).
    unknown_label
        The label :func:`transfer_labels` used for cells below the confidence threshold.

    Returns
    -------
    dict
        ``accuracy``: fraction of scored cells predicted correctly (an ``unknown_label``
        prediction counts as wrong); ``accuracy_called``: accuracy over scored cells that got a
        label (NaN if none did); ``macro_f1``: :func:`sklearn.metrics.f1_score` with
        ``average="macro"`` over the true label set (an ``unknown_label`` prediction is a miss
        for its true class, not an extra class; classes never predicted score 0);
        ``fraction_unknown``: fraction of scored cells predicted ``unknown_label``;
        ``n_cells``: number of scored cells; ``n_called``: number of those with a label.

    Raises
    ------
    ValueError
        On different lengths, misaligned indexes or no cell with a known true label.
    """
    true_s, pred_s, known, _ = _paired_labels(true_labels, predicted, unknown_label)
    if not known.any():
        raise ValueError(
            "true_labels: expected at least one cell with a known label, all are missing"
        )
    t, p = true_s[known], pred_s[known]
    called = p != unknown_label
    correct = t == p
    classes = sorted(set(t))
    macro_f1 = f1_score(t, p, labels=classes, average="macro", zero_division=0)
    return {
        "accuracy": float(correct.mean()),
        "accuracy_called": float(correct[called].mean()) if called.any() else math.nan,
        "macro_f1": float(macro_f1),
        "fraction_unknown": float((~called).mean()),
        "n_cells": int(t.size),
        "n_called": int(called.sum()),
    }


def _natural_key(label: str) -> list[Any]:
    """Sort key that orders "T2" before "T10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", label)]


def confusion_plot(
    true_labels: Any,
    predicted: Any,
    path: str | Path,
    *,
    unknown_label: str = "unknown",
    title: str | None = None,
) -> Path:
    """Save a row-normalised confusion matrix (true x predicted) as a PNG.

    Rows are the known true labels (with their cell counts); columns are the same labels, then
    any other predicted label, then ``unknown_label`` as the last column. Each cell shows the
    percentage of the row's cells predicted as the column label.

    Parameters
    ----------
    true_labels, predicted
        As in :func:`transfer_accuracy`.
    path
        Output file; parent folders are created. Written in PNG format whatever the suffix.
    unknown_label
        Label for unassigned cells (always shown as the last column).
    title
        Figure title; defaults to a summary with accuracy and macro-F1.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    true_s, pred_s, known, order = _paired_labels(true_labels, predicted, unknown_label)
    if not known.any():
        raise ValueError(
            "true_labels: expected at least one cell with a known label, all are missing"
        )
    path = Path(path)
    t, p = true_s[known], pred_s[known]
    present = set(t)
    if order is not None:  # categorical truth: keep its category order
        rows = [c for c in order if c in present]
        rows += sorted(present - set(rows), key=_natural_key)
    else:
        rows = sorted(present, key=_natural_key)
    extra = sorted(set(p) - set(rows) - {unknown_label}, key=_natural_key)
    cols = [*rows, *extra, unknown_label]
    r_idx = {lab: i for i, lab in enumerate(rows)}
    c_idx = {lab: i for i, lab in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(counts, ([r_idx[v] for v in t], [c_idx[v] for v in p]), 1)
    frac = counts / counts.sum(axis=1, keepdims=True)

    if title is None:
        acc = transfer_accuracy(t, p, unknown_label=unknown_label)
        title = (
            f"Label transfer: accuracy {acc['accuracy']:.3f}, macro-F1 {acc['macro_f1']:.3f}, "
            f"unknown {acc['fraction_unknown']:.1%} (n={acc['n_cells']})"
        )

    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    n_r, n_c = len(rows), len(cols)
    cell = 0.55 if max(n_r, n_c) > 12 else 0.8
    fig = Figure(figsize=(max(5.5, 2.8 + cell * n_c), max(4.0, 2.6 + cell * n_r)), dpi=150)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fontsize = 8 if max(n_r, n_c) <= 12 else 6.5
    for i in range(n_r):
        for j in range(n_c):
            if counts[i, j] == 0:
                continue
            v = frac[i, j]
            text = f"{100 * v:.0f}" if v >= 0.01 else "<1"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if v > 0.6 else "black",
            )
    ax.set_xticks(range(n_c))
    ax.set_xticklabels(cols, rotation=45, ha="right", rotation_mode="anchor", fontsize=fontsize + 1)
    ax.set_yticks(range(n_r))
    row_n = counts.sum(axis=1)
    ax.set_yticklabels(
        [f"{lab} (n={n})" for lab, n in zip(rows, row_n, strict=True)], fontsize=fontsize + 1
    )
    if unknown_label in c_idx:
        ax.axvline(n_c - 1.5, color="0.3", linewidth=1.0)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(title, fontsize=9)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("Fraction of true-label cells (row-normalised); numbers are %", fontsize=7)
    cbar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
