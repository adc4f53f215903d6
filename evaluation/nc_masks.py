"""Neighbour masks for the neighbourhood-correlation metrics
(docs/evaluation.md#neighbourhood-correlation).

The kNN graph is handled as an edge list (CSR order: sorted by cell). A *mask* is a boolean per
edge saying whether neighbour ``j`` of cell ``i`` lies in one of ``i``'s comparison populations:

==================  =====================================================================
``same_library``    same library
``between_libraries``  other library (``same_library`` + ``between_libraries`` = all edges)
``cross_library``   same dataset, other library (only with a dataset key)
``cross_dataset``   other dataset (only with a dataset key; ``cross_library`` +
                    ``cross_dataset`` = ``between_libraries``)
``within_<key>``    same value of technical covariate ``<key>``
``between_<key>``   other value of ``<key>`` (edges touching a missing value are in neither)
``cross_technical`` union of the ``between_<key>`` masks
==================  =====================================================================

With a dataset key, a library is identified by its (dataset, library) pair, so a library label
reused in two datasets names two libraries. A mask is *applicable* when its population is non-empty
for at least one cell (e.g. ``between_libraries`` needs two libraries); masks that are not
applicable are omitted, never an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class EdgeList:
    """A directed, weighted neighbour graph in CSR order.

    Attributes
    ----------
    rows, cols
        ``(n_edges,)`` int64: edge ``e`` says ``cols[e]`` is a neighbour of ``rows[e]``;
        ``rows`` is non-decreasing, no self edges.
    weights
        ``(n_edges,)`` float64 connectivity weights (> 0).
    n_cells
        Number of cells.
    """

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    n_cells: int

    @property
    def degree(self) -> np.ndarray:
        """``(n_cells,)`` number of neighbours per cell."""
        return np.bincount(self.rows, minlength=self.n_cells)


@dataclass(frozen=True)
class CellGroups:
    """Integer-coded groupings of the cells.

    Attributes
    ----------
    library
        ``(n_cells,)`` library codes (a (dataset, library) pair when a dataset key is given).
    dataset
        ``(n_cells,)`` dataset codes, or None.
    technical
        ``{key: (n_cells,) codes}``, ``-1`` = missing value.
    """

    library: np.ndarray
    dataset: np.ndarray | None
    technical: dict[str, np.ndarray]

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.library.size


def edge_list(connectivities) -> EdgeList:
    """Edges of a ``(n_cells, n_cells)`` connectivity matrix (self loops and zeros dropped).

    Parameters
    ----------
    connectivities
        Square sparse (or dense) matrix of non-negative neighbour weights; row ``i`` holds the
        neighbours of cell ``i``.

    Returns
    -------
    EdgeList
    """
    W = sp.csr_matrix(connectivities, dtype=np.float64)
    if W.shape[0] != W.shape[1]:
        raise ValueError(f"connectivities has shape {W.shape}; expected square (n_cells, n_cells)")
    W.sum_duplicates()
    W.sort_indices()
    if W.nnz and (not np.isfinite(W.data).all() or W.data.min() < 0):
        raise ValueError("connectivities must be finite and non-negative")
    n = W.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(W.indptr))
    cols = W.indices.astype(np.int64)
    keep = (rows != cols) & (W.data > 0)
    return EdgeList(rows[keep], cols[keep], W.data[keep].copy(), n)


def encode_labels(labels, name: str, n_cells: int, allow_missing: bool) -> np.ndarray:
    """Integer codes of ``labels`` (``-1`` = missing).

    Parameters
    ----------
    labels
        ``(n_cells,)`` labels of any hashable type.
    name
        Used in error messages.
    n_cells
        Expected length.
    allow_missing
        If False, a missing label raises ``ValueError``.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` int64 codes.
    """
    series = pd.Series(np.asarray(labels, dtype=object).ravel())
    if series.size != n_cells:
        raise ValueError(f"{name} has {series.size} entries for {n_cells} cells")
    codes, _ = pd.factorize(series)
    if not allow_missing and (codes < 0).any():
        raise ValueError(f"{name} has {int((codes < 0).sum())} missing values")
    return codes.astype(np.int64)


def cell_groups(
    library: Sequence,
    dataset: Sequence | None = None,
    technical: Mapping[str, Sequence] | None = None,
) -> CellGroups:
    """Code the library / dataset / technical labels of the cells.

    Parameters
    ----------
    library
        ``(n_cells,)`` library labels (required, no missing values).
    dataset
        ``(n_cells,)`` dataset labels (no missing values) or None.
    technical
        ``{key: (n_cells,) labels}`` or None; missing values allowed.

    Returns
    -------
    CellGroups
    """
    n = np.asarray(library, dtype=object).ravel().size
    lib = encode_labels(library, "library", n, allow_missing=False)
    ds = None
    if dataset is not None:
        ds = encode_labels(dataset, "dataset", n, allow_missing=False)
        lib = pd.factorize(ds * (int(lib.max()) + 1) + lib)[0].astype(np.int64)
    tech = {
        str(key): encode_labels(values, f"technical[{key!r}]", n, allow_missing=True)
        for key, values in (technical or {}).items()
    }
    return CellGroups(lib, ds, tech)


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    """``(n_cells,)`` size of each cell's group (``NaN`` for missing codes)."""
    valid = codes >= 0
    sizes = np.bincount(codes[valid], minlength=int(codes.max(initial=-1)) + 1).astype(np.float64)
    out = np.full(codes.shape, np.nan)
    out[valid] = sizes[codes[valid]]
    return out


def _union_between_population(codes: np.ndarray, block: int = 1024) -> np.ndarray:
    """Per cell, how many cells differ from it in at least one (non-missing) technical key.

    ``codes`` is ``(n_cells, n_keys)``; the count runs over unique code tuples, so the cost is
    quadratic in the number of distinct tuples, not in cells.
    """
    uniq, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    n_compatible = np.empty(uniq.shape[0])
    for start in range(0, uniq.shape[0], block):  # blocks of distinct tuples
        a = uniq[start : start + block, None, :]
        b = uniq[None, :, :]
        compatible = ((a < 0) | (b < 0) | (a == b)).all(axis=2)
        n_compatible[start : start + block] = compatible.astype(np.float64) @ counts
    return codes.shape[0] - n_compatible[inverse]


def mask_populations(groups: CellGroups) -> dict[str, np.ndarray]:
    """Size of each cell's population per applicable mask (self excluded).

    Parameters
    ----------
    groups
        Coded cell groups.

    Returns
    -------
    dict
        ``{mask: (n_cells,) float64}``: number of *other* cells that would fall in the mask
        (``NaN`` where undefined, i.e. a missing technical value). Only applicable masks (some cell
        has a non-empty population) are returned, in the canonical order of the module table.
    """
    n = groups.n_cells
    lib = _group_sizes(groups.library)
    pops: dict[str, np.ndarray] = {"same_library": lib - 1, "between_libraries": n - lib}
    if groups.dataset is not None:
        ds = _group_sizes(groups.dataset)
        pops["cross_library"] = ds - lib
        pops["cross_dataset"] = n - ds
    for key, codes in groups.technical.items():
        size = _group_sizes(codes)
        pops[f"within_{key}"] = size - 1
        pops[f"between_{key}"] = float((codes >= 0).sum()) - size
    if groups.technical:
        pops["cross_technical"] = _union_between_population(
            np.column_stack(list(groups.technical.values()))
        )
    return {m: p for m, p in pops.items() if np.nansum(p) > 0}


def edge_masks(groups: CellGroups, edges: EdgeList, masks: Sequence[str]) -> dict[str, np.ndarray]:
    """Boolean edge masks.

    Parameters
    ----------
    groups
        Coded cell groups.
    edges
        The neighbour graph.
    masks
        Mask names to compute (see the module table).

    Returns
    -------
    dict
        ``{mask: (n_edges,) bool}``.
    """
    i, j = edges.rows, edges.cols

    def same(codes: np.ndarray) -> np.ndarray:
        return codes[i] == codes[j]

    def between(codes: np.ndarray) -> np.ndarray:
        ci, cj = codes[i], codes[j]
        return (ci >= 0) & (cj >= 0) & (ci != cj)

    def build(mask: str) -> np.ndarray:
        if mask == "same_library":
            return same(groups.library)
        if mask == "between_libraries":
            return ~same(groups.library)
        if mask == "cross_library" and groups.dataset is not None:
            return same(groups.dataset) & ~same(groups.library)
        if mask == "cross_dataset" and groups.dataset is not None:
            return ~same(groups.dataset)
        if mask == "cross_technical":
            out = np.zeros(i.size, dtype=bool)
            for codes in groups.technical.values():
                out |= between(codes)
            return out
        for key, codes in groups.technical.items():
            if mask == f"within_{key}":
                return same(codes) & (codes[i] >= 0)
            if mask == f"between_{key}":
                return between(codes)
        raise ValueError(f"unknown mask {mask!r}")

    return {m: build(m) for m in masks}
