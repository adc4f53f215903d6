"""Marker gene sets for the neighbourhood-correlation metrics
(docs/evaluation.md#neighbourhood-correlation).

Two sources, usable together:

- :func:`load_marker_csv`: a curated list (CSV with columns ``gene, cell_type, lineage, category``).
- :func:`data_driven_markers`: a data-driven set from a label column: per-cluster means of counts
  normalised per cell by the total over ALL genes (not logged), specificity = cluster mean / sum of
  the cluster means; genes with max mean > ``min_mean`` and max specificity > ``min_specificity``
  are kept and the ``top_n`` most specific per cluster are returned.

:func:`marker_indices` turns gene names into the column indices the metrics take.

The metrics need at least ``MIN_MARKERS`` = 2 marker genes in the data (a Pearson correlation
over fewer genes is undefined). :func:`present_marker_genes` (a curated CSV or gene list) and
:func:`require_markers` (any resolved set, e.g. a data-driven one) refuse fewer with a
``ValueError`` that names the source, how many of how many genes were found and what the data's
gene names look like -- so that a run never silently goes without its ``nc_*`` metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

MARKER_COLUMNS = ("gene", "cell_type", "lineage", "category")
MIN_MARKERS = 2  # marker genes needed for a per-cell Pearson correlation
TARGET_SUM = 1e4  # counts per 10k: the scale on which ``min_mean`` is expressed


def as_csr(counts) -> sp.csr_matrix:
    """``counts`` (cells × genes, dense or sparse) as a float64 CSR matrix."""
    if sp.issparse(counts):
        X = sp.csr_matrix(counts, dtype=np.float64)
    else:
        arr = np.asarray(counts, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"counts has shape {arr.shape}; expected (n_cells, n_genes)")
        X = sp.csr_matrix(arr)
    if X.nnz and (not np.isfinite(X.data).all() or X.data.min() < 0):
        raise ValueError("counts must be finite and non-negative")
    return X


def normalise_total(counts, target_sum: float = 1.0) -> sp.csr_matrix:
    """Scale each cell to ``target_sum`` total counts over all genes (not logged).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or sparse.
    target_sum
        Total of every normalised cell; cells with zero counts stay all-zero.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_cells, n_genes)`` float64.
    """
    X = as_csr(counts)
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return sp.csr_matrix(sp.diags(scale) @ X)


def read_marker_csv(path: str | Path) -> list[str]:
    """All marker genes a curated CSV names, whether in the data or not.

    Parameters
    ----------
    path
        CSV with (at least) the columns ``gene, cell_type, lineage, category``.

    Returns
    -------
    list of str
        Unique, stripped, non-empty gene names in file order.

    Raises
    ------
    ValueError
        If the file cannot be parsed or lacks a required column (the message names both).
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable marker CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in MARKER_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"{path}: marker CSV needs columns {list(MARKER_COLUMNS)}; missing {missing} "
            f"(found {list(table.columns)})"
        )
    genes = table["gene"].dropna().str.strip()
    return list(dict.fromkeys(g for g in genes if g))


def load_marker_csv(path: str | Path, var_names: Sequence[str]) -> list[str]:
    """Curated marker genes present in ``var_names``.

    Parameters
    ----------
    path
        CSV with (at least) the columns ``gene, cell_type, lineage, category``.
    var_names
        ``(n_genes,)`` gene names of the count matrix.

    Returns
    -------
    list of str
        Unique marker genes found in ``var_names``, in file order.

    Raises
    ------
    ValueError
        If the file cannot be parsed or lacks a required column (the message names both).
    """
    present = set(map(str, var_names))
    return [g for g in read_marker_csv(path) if g in present]


def require_markers(
    found: Sequence[str],
    n_requested: int | None,
    source: str,
    var_names: Sequence[str] = (),
    not_found: Sequence[str] = (),
    hint: str = "",
    min_markers: int = MIN_MARKERS,
) -> list[str]:
    """``found`` if it has at least ``min_markers`` genes, else a ``ValueError`` that says why.

    Parameters
    ----------
    found
        Marker genes present in the data.
    n_requested
        How many genes the source named (``None`` where that is not a count, e.g. data-driven).
    source
        What the genes came from, for the message (``"marker file /x.csv"``, ...).
    var_names
        The data's gene names (a few are quoted in the message, to show a naming mismatch).
    not_found
        Requested genes absent from the data (a few are quoted).
    hint
        Extra advice appended to the message.
    min_markers
        Minimum number of genes.

    Returns
    -------
    list of str
        ``found`` as a list.

    Raises
    ------
    ValueError
        Fewer than ``min_markers`` genes found.
    """
    found = list(found)
    if len(found) >= min_markers:
        return found
    of = f" of {n_requested}" if n_requested is not None else ""
    msg = (
        f"{source}: {len(found)}{of} marker genes found in the data {found}; the neighbourhood "
        f"metrics (nc_*) need at least {min_markers}"
    )
    if len(not_found):
        msg += f". Not found, e.g. {list(not_found)[:5]}"
    if len(var_names):
        msg += f"; the data's var_names look like {[str(v) for v in list(var_names)[:5]]}"
    fix = hint or "give marker genes named as in var_names, or neighbourhood=False"
    raise ValueError(f"{msg}. Fix: {fix}")


def present_marker_genes(
    markers: str | Path | Sequence[str],
    var_names: Sequence[str],
    min_markers: int = MIN_MARKERS,
) -> list[str]:
    """Genes of a curated marker CSV or a gene list that are in ``var_names`` (≥ ``min_markers``).

    Parameters
    ----------
    markers
        Path of a curated marker CSV (see :func:`read_marker_csv`) or a list of gene names.
    var_names
        ``(n_genes,)`` gene names of the count matrix.
    min_markers
        Minimum number of genes found.

    Returns
    -------
    list of str
        Unique marker genes found in ``var_names``, in the source's order.

    Raises
    ------
    ValueError
        Unreadable CSV, or fewer than ``min_markers`` genes found: the message names the file (or
        the list), how many of how many genes were found, some missing ones and some var_names.
    """
    if isinstance(markers, str | Path):
        requested = read_marker_csv(markers)
        source = f"marker file {markers}"
    else:
        requested = list(dict.fromkeys(map(str, markers)))
        source = f"marker list {requested[:5]}{' ...' if len(requested) > 5 else ''}"
    present = set(map(str, var_names))
    found = [g for g in requested if g in present]
    return require_markers(
        found,
        len(requested),
        source,
        var_names,
        [g for g in requested if g not in present],
        hint="use gene names as in var_names (symbols vs Ensembl IDs?), markers='data' "
        "(data-driven from label_key), or neighbourhood=False",
        min_markers=min_markers,
    )


def data_driven_markers(
    counts,
    var_names: Sequence[str],
    labels: Sequence,
    top_n: int = 10,
    min_mean: float = 1.0,
    min_specificity: float = 0.1,
    target_sum: float = TARGET_SUM,
) -> list[str]:
    """The ``top_n`` most cluster-specific genes of each cluster.

    Counts are normalised per cell by the total over ALL genes (to ``target_sum``, not logged);
    ``mean[c, g]`` is the mean of gene ``g`` over the cells of cluster ``c`` and
    ``specificity[c, g] = mean[c, g] / sum_c' mean[c', g]``. Genes with
    ``max_c mean > min_mean`` and ``max_c specificity > min_specificity`` are candidates; for each
    cluster (in sorted label order) the ``top_n`` candidates by that cluster's specificity are
    taken (ties by gene order).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or sparse.
    var_names
        ``(n_genes,)`` gene names.
    labels
        ``(n_cells,)`` cluster labels; cells with a missing label are ignored.
    top_n
        Genes per cluster.
    min_mean
        Threshold on the largest cluster mean (on the ``target_sum`` scale).
    min_specificity
        Threshold on the largest specificity.
    target_sum
        Per-cell total after normalisation (default: counts per 10k).

    Returns
    -------
    list of str
        Unique genes, grouped by cluster, most specific first.
    """
    X = normalise_total(counts, target_sum)
    var_names = np.asarray(var_names, dtype=str)
    if var_names.shape != (X.shape[1],):
        raise ValueError(f"{var_names.size} var_names for {X.shape[1]} genes")
    codes, _ = pd.factorize(pd.Series(labels, dtype="object"), sort=True)
    if codes.shape != (X.shape[0],):
        raise ValueError(f"{codes.size} labels for {X.shape[0]} cells")
    keep = codes >= 0
    n_clusters = int(codes.max()) + 1 if keep.any() else 0
    if n_clusters == 0 or top_n <= 0:
        return []
    cells = np.flatnonzero(keep)
    member = sp.csr_matrix(
        (np.ones(cells.size), (codes[keep], cells)), shape=(n_clusters, X.shape[0])
    )
    sizes = np.asarray(member.sum(axis=1)).ravel()
    means = np.asarray((member @ X).todense()) / sizes[:, None]  # (clusters, genes)
    total = means.sum(axis=0)
    specificity = np.divide(means, total, out=np.zeros_like(means), where=total > 0)
    candidate = (means.max(axis=0) > min_mean) & (specificity.max(axis=0) > min_specificity)
    cand_idx = np.flatnonzero(candidate)
    chosen: list[str] = []
    for c in range(n_clusters):  # loop over clusters, not cells
        order = np.argsort(-specificity[c, cand_idx], kind="stable")[:top_n]
        chosen.extend(var_names[cand_idx[order]])
    return list(dict.fromkeys(chosen))


def marker_indices(genes: Sequence[str], var_names: Sequence[str]) -> np.ndarray:
    """Column indices of ``genes`` in ``var_names`` (genes not found are dropped).

    Parameters
    ----------
    genes
        Marker gene names.
    var_names
        ``(n_genes,)`` gene names of the count matrix.

    Returns
    -------
    numpy.ndarray
        ``(n_markers,)`` int64 indices (first occurrence of a duplicated name), in ``genes``
        order, unique.
    """
    lookup: dict[str, int] = {}
    for i, g in enumerate(map(str, var_names)):  # loop over genes: the first occurrence wins
        lookup.setdefault(g, i)
    idx = [lookup[g] for g in dict.fromkeys(map(str, genes)) if g in lookup]
    return np.asarray(idx, dtype=np.int64)
