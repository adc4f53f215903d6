"""Per-cell marker correlations with kNN neighbours, vectorised over edges
(docs/evaluation.md#neighbourhood-correlation).

All functions are pure and work on arrays; no loop runs over cells (only over fixed-size chunks of
edges). A constant profile (all markers equal, e.g. a cell with no marker counts) has no Pearson
correlation: it gives ``NaN``, never 0.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

EDGE_CHUNK_ELEMENTS = 1 << 21  # gathered floats per chunk in edge_correlations (2 × 16 MB)
CONSTANT_RTOL = 1e-10  # a profile whose centred norm is below this × its norm is constant


def marker_profiles(counts, marker_idx: np.ndarray) -> np.ndarray:
    """Marker expression normalised by each cell's total over ALL genes (not logged).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or sparse.
    marker_idx
        ``(n_markers,)`` column indices of the marker genes.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_markers)`` float64 fractions of each cell's total counts.
    """
    marker_idx = np.asarray(marker_idx, dtype=np.int64).ravel()
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
    else:
        counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts has shape {counts.shape}; expected (n_cells, n_genes)")
    if marker_idx.size < 2:
        raise ValueError(f"need at least 2 marker genes for a correlation, got {marker_idx.size}")
    if marker_idx.min() < 0 or marker_idx.max() >= counts.shape[1]:
        raise ValueError(f"marker_idx out of range for {counts.shape[1]} genes")
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()  # over ALL genes
    sub = counts[:, marker_idx]
    sub = sub.toarray() if sp.issparse(sub) else sub
    sub = np.asarray(sub, dtype=np.float64)
    if not (np.isfinite(totals).all() and np.isfinite(sub).all()) or (sub < 0).any():
        raise ValueError("counts must be finite and non-negative")
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    return sub * scale[:, None]


def standardise_rows(x: np.ndarray) -> np.ndarray:
    """Centre each row and scale it to unit norm, so that Pearson r = dot product.

    A row counts as constant when its centred norm is at most ``CONSTANT_RTOL`` times its norm
    (this absorbs the rounding of the mean and of differences of weighted sums).

    Parameters
    ----------
    x
        ``(n, m)`` array.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` float64; constant rows are all ``NaN``.
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    norm = np.sqrt(np.einsum("ij,ij->i", xc, xc))
    bad = norm <= CONSTANT_RTOL * np.sqrt(np.einsum("ij,ij->i", x, x))
    xc /= np.where(bad, 1.0, norm)[:, None]
    xc[bad] = np.nan
    return xc


def correlate_standardised(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between the rows of ``z`` (already standardised) and of ``y``.

    Parameters
    ----------
    z
        ``(n, m)`` output of :func:`standardise_rows`.
    y
        ``(n, m)`` array.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` correlations in [-1, 1]; ``NaN`` where either row is constant.
    """
    return np.clip(np.einsum("ij,ij->i", z, standardise_rows(y)), -1.0, 1.0)


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r between matching rows of ``x`` and ``y``.

    Parameters
    ----------
    x, y
        ``(n, m)`` arrays.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` correlations in [-1, 1]; ``NaN`` where either row is constant.
    """
    return correlate_standardised(standardise_rows(x), y)


def mirror_permutation(rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """For a structurally symmetric edge list, the index of each edge's reverse.

    Parameters
    ----------
    rows, cols
        ``(n_edges,)`` edges in CSR order (sorted by row, then column).

    Returns
    -------
    numpy.ndarray or None
        ``(n_edges,)`` ``perm`` with ``rows[perm] == cols`` and ``cols[perm] == rows``, or None if
        some edge has no reverse.
    """
    perm = np.lexsort((rows, cols))
    if np.array_equal(rows[perm], cols) and np.array_equal(cols[perm], rows):
        return perm
    return None


def edge_correlations(
    z: np.ndarray, rows: np.ndarray, cols: np.ndarray, mirror: np.ndarray | None = None
) -> np.ndarray:
    """Pearson r between the two cells of every edge.

    Parameters
    ----------
    z
        ``(n_cells, n_markers)`` output of :func:`standardise_rows`.
    rows, cols
        ``(n_edges,)`` cell indices.
    mirror
        Optional :func:`mirror_permutation` of the edges: then only edges with ``row < col`` are
        computed and copied to their reverse (half the work on a symmetric graph).

    Returns
    -------
    numpy.ndarray
        ``(n_edges,)`` r in [-1, 1], ``NaN`` where either profile is constant.
    """
    todo = np.flatnonzero(rows < cols) if mirror is not None else np.arange(rows.size)
    r = np.empty(rows.size)
    step = max(1, EDGE_CHUNK_ELEMENTS // max(1, z.shape[1]))
    a = np.empty((min(step, todo.size), z.shape[1]))
    b = np.empty_like(a)
    for start in range(0, todo.size, step):  # chunks of edges bound the gathered memory
        e = todo[start : start + step]
        np.take(z, rows[e], axis=0, out=a[: e.size])
        np.take(z, cols[e], axis=0, out=b[: e.size])
        r[e] = np.einsum("ij,ij->i", a[: e.size], b[: e.size])
    if mirror is not None:
        r[mirror[todo]] = r[todo]
    return np.clip(r, -1.0, 1.0)


def neighbour_sums(
    profiles: np.ndarray, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Connectivity-weighted sum of the neighbours' profiles.

    Parameters
    ----------
    profiles
        ``(n_cells, n_markers)`` marker profiles.
    rows, cols, weights
        ``(n_edges,)`` edges, ``rows`` non-decreasing.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_markers)``; row ``i`` is ``sum_j w_ij profiles[j]`` (0 without neighbours).
        Pearson r is invariant to the positive normalising constant, so this serves as the
        weighted mean profile.
    """
    n = profiles.shape[0]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    W = sp.csr_matrix((weights, cols, indptr), shape=(n, n))
    return np.asarray(W @ profiles)


def neighbour_mean_correlation(
    profiles: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    weights: np.ndarray,
) -> np.ndarray:
    """Pearson r between each cell and the connectivity-weighted mean profile of its neighbours.

    Parameters
    ----------
    profiles, rows, cols, weights
        Marker profiles and the edges of one mask, as in :func:`neighbour_sums`.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` ``corr_avg``; ``NaN`` for cells without neighbours in the edge set or with
        a constant own / mean profile.
    """
    return rowwise_pearson(profiles, neighbour_sums(profiles, rows, cols, weights))


def segment_stats(
    rows: np.ndarray, values: np.ndarray, weights: np.ndarray, n_cells: int
) -> dict[str, np.ndarray]:
    """Per-cell mean / median / weighted mean / std of edge values.

    Parameters
    ----------
    rows
        ``(n_edges,)`` owning cell of each value, non-decreasing, and within a cell the values
        sorted ascending (e.g. via ``np.lexsort((values, rows))``).
    values
        ``(n_edges,)`` finite values.
    weights
        ``(n_edges,)`` positive weights for the weighted mean.
    n_cells
        Number of cells.

    Returns
    -------
    dict
        ``mean``, ``median``, ``weighted``, ``std`` (population std, ddof = 0): ``(n_cells,)``
        float64 arrays, ``NaN`` for cells without values; ``count``: ``(n_cells,)`` int64.
    """
    count = np.bincount(rows, minlength=n_cells)
    has = count > 0
    safe = np.where(has, count, 1)

    def per_cell(v: np.ndarray, den: np.ndarray) -> np.ndarray:
        out = np.bincount(rows, weights=v, minlength=n_cells) / np.where(has, den, 1.0)
        out[~has] = np.nan
        return out

    mean = per_cell(values, safe)
    wsum = np.bincount(rows, weights=weights, minlength=n_cells)
    weighted = per_cell(weights * values, wsum)
    dev = values - mean[rows]
    std = np.sqrt(per_cell(dev * dev, safe))
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    lo = np.where(has, start + (safe - 1) // 2, 0)
    hi = np.where(has, start + safe // 2, 0)
    median = np.full(n_cells, np.nan)
    if values.size:
        median[has] = 0.5 * (values[lo[has]] + values[hi[has]])
    return {"mean": mean, "median": median, "weighted": weighted, "std": std, "count": count}
