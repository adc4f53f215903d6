"""The shared kNN graph: computed once per embedding, reused by every metric.

``Neighbours`` keeps scib-metrics' convention (row i's first neighbour is i itself, distance 0)
so it converts to :class:`scib_metrics.nearest_neighbors.NeighborsResults` without recomputing,
and carries UMAP-style fuzzy connectivities (self removed) for the neighbourhood metrics.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

EXACT_MAX_CELLS = 20_000  # below this, exact brute-force kNN is fast and deterministic


@dataclass(frozen=True)
class Neighbours:
    """kNN of one embedding.

    Attributes
    ----------
    indices
        ``(n_cells, k)`` neighbour indices, column 0 = the cell itself.
    distances
        ``(n_cells, k)`` Euclidean distances, column 0 = 0.
    method
        ``"exact"`` or ``"pynndescent"``.
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str = "exact"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        """Neighbours per cell, self included."""
        return self.indices.shape[1]

    def subset(self, k: int) -> Neighbours:
        """The first ``k`` neighbours (self included)."""
        if k > self.k:
            raise ValueError(f"k={k} exceeds the {self.k} neighbours computed")
        return Neighbours(self.indices[:, :k], self.distances[:, :k], self.method)

    def to_scib(self, k: int | None = None):
        """As :class:`scib_metrics.nearest_neighbors.NeighborsResults` (first ``k``).

        Its ``knn_graph_connectivities`` (also of the subsets scib-metrics' Benchmarker takes
        for its 15/50/90-neighbour metrics) come from the numpy port of UMAP's fuzzy simplicial
        set (:func:`evaluation.fuzzy.fuzzy_connectivities`, the same graph, self edges
        dropped as umap does) instead of umap's numba one, compiled anew in every process
        (~10 s)."""
        sub = self if k is None else self.subset(k)
        res = _ported_results_class()(indices=sub.indices, distances=sub.distances)
        res.__dict__["knn_graph_connectivities"] = self.connectivities(sub.k)  # cached per k
        return res

    def connectivities(self, k: int = 50) -> sp.csr_matrix:
        """UMAP fuzzy-simplicial-set connectivities on the first ``k`` neighbours, self removed.

        Symmetric, weights in (0, 1]; the same construction as ``scanpy.pp.neighbors``
        (:func:`evaluation.fuzzy.fuzzy_connectivities`). Cached per ``k``.
        """
        key = ("conn", k)
        if key not in self._cache:
            from evaluation.fuzzy import fuzzy_connectivities

            sub = self.subset(min(k, self.k))
            self._cache[key] = fuzzy_connectivities(sub.indices, sub.distances)
        return self._cache[key]


def compute_neighbours(
    embedding: np.ndarray, k: int = 90, method: str = "auto", seed: int = 0, n_jobs: int = 1
) -> Neighbours:
    """kNN of ``embedding`` (Euclidean), self included as neighbour 0.

    Parameters
    ----------
    embedding
        ``(n_cells, n_dims)`` array.
    k
        Neighbours per cell including self (90 covers scib-metrics' 15/50/90).
    method
        ``"exact"`` (blocked brute force), ``"pynndescent"`` (approximate, seeded) or ``"auto"``
        (exact up to 20,000 cells).
    seed
        Seed for pynndescent.
    n_jobs
        Threads for pynndescent.
    """
    X = np.ascontiguousarray(embedding, dtype=np.float32)
    n = X.shape[0]
    if X.ndim != 2 or n < 2:
        raise ValueError(f"embedding has shape {X.shape}; expected (n_cells >= 2, n_dims)")
    if not np.isfinite(X).all():
        raise ValueError("embedding contains NaN/inf values")
    k = min(k, n)
    if method == "auto":
        method = "exact" if n <= EXACT_MAX_CELLS else "pynndescent"
    if method == "exact":
        idx, dist = _exact_knn(X, k)
    elif method == "pynndescent":
        from pynndescent import NNDescent

        index = NNDescent(X, n_neighbors=k, random_state=seed, n_jobs=n_jobs, metric="euclidean")
        idx, dist = index.neighbor_graph
        idx, dist = _self_first(idx, dist)
    else:
        raise ValueError(f"method={method!r}; expected 'auto', 'exact' or 'pynndescent'")
    return Neighbours(idx.astype(np.int64), dist.astype(np.float32), method)


def _exact_knn(X: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    sq = (X.astype(np.float64) ** 2).sum(1)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = (
            sq[start:stop, None]
            + sq[None, :]
            - 2.0 * (X[start:stop].astype(np.float64) @ X.T.astype(np.float64))
        )
        np.maximum(d2, 0.0, out=d2)
        rows = np.arange(stop - start)
        d2[rows, rows + start] = -1.0  # self first, even with duplicate points
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        pd2 = np.take_along_axis(d2, part, 1)
        order = np.argsort(pd2, axis=1, kind="stable")
        idx[start:stop] = np.take_along_axis(part, order, 1)
        dist[start:stop] = np.sqrt(np.maximum(np.take_along_axis(pd2, order, 1), 0.0))
    return idx, dist


def _self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make column 0 the cell itself (approximate search may miss or misplace it)."""
    n, k = idx.shape
    rows = np.arange(n)[:, None]
    others = idx != rows
    # stable sort puts the (up to k) other neighbours first, in their original order
    order = np.argsort(~others, axis=1, kind="stable")[:, : k - 1]
    out_i = np.concatenate([rows, np.take_along_axis(idx, order, 1)], axis=1)
    out_d = np.concatenate(
        [np.zeros((n, 1), dist.dtype), np.take_along_axis(dist, order, 1)], axis=1
    )
    return out_i, out_d


@functools.cache
def _ported_results_class():
    """``NeighborsResults`` whose connectivities use :mod:`evaluation.fuzzy` (subsets too)."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    class PortedNeighborsResults(NeighborsResults):
        @functools.cached_property
        def knn_graph_connectivities(self):
            from evaluation.fuzzy import fuzzy_connectivities

            return fuzzy_connectivities(self.indices, self.distances)

    return PortedNeighborsResults
