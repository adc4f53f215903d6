"""UMAP's fuzzy simplicial set (the kNN connectivities scanpy and scib-metrics use), in numpy.

The same construction as ``umap.umap_.fuzzy_simplicial_set`` with ``local_connectivity=1`` and
``set_op_mix_ratio=1`` on a precomputed kNN, vectorised over cells instead of compiled with numba.
umap compiles its version on first use in every new process (~4 s, plus ~9 s to import umap and
pynndescent); a sweep evaluates each trial in a fresh Train worker, so that cost was paid per trial.

For cell i with sorted neighbour distances ``d_ij`` (column 0 = the cell itself):

* ``rho_i`` = distance to the nearest neighbour at distance > 0;
* ``sigma_i`` solves ``sum_{j>=1} exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k)`` by 64-step
  bisection (as umap: tolerance 1e-5, floored at 1e-3 × the mean distance);
* membership ``w_ij = exp(-max(d_ij - rho_i, 0) / sigma_i)`` (0 for the cell itself);
* symmetrised by the fuzzy union ``W + Wᵀ − W ∘ Wᵀ``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3
N_ITER = 64
_FLOATMAX = float(np.finfo(np.float32).max)


def smooth_knn_dist(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell bandwidth ``sigma`` and nearest non-zero distance ``rho`` (float32, as umap)."""
    d = np.asarray(distances, dtype=np.float32)
    n, k = d.shape
    target = np.log2(k)
    positive = d > 0
    has = positive.any(axis=1)
    rho = np.where(has, d[np.arange(n), positive.argmax(axis=1)], 0).astype(np.float32)
    # float32 difference as umap; exp(-0) = 1 is umap's "1 when d_ij <= rho_i"
    excess = np.maximum(d[:, 1:] - rho[:, None], 0).astype(np.float64)
    lo = np.zeros(n)
    hi = np.full(n, _FLOATMAX)
    mid = np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(N_ITER):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        e, m = excess[rows], mid[rows]
        psum = np.exp(-(e / m[:, None])).sum(axis=1)
        go = np.abs(psum - target) >= SMOOTH_K_TOLERANCE
        rows, psum, m = rows[go], psum[go], m[go]
        too_wide = psum > target
        lo_r, hi_r = lo[rows], hi[rows]
        hi_r = np.where(too_wide, m, hi_r)
        lo_r = np.where(too_wide, lo_r, m)
        grow = ~too_wide & (hi_r >= _FLOATMAX)
        mid[rows] = np.where(grow, m * 2, (lo_r + hi_r) / 2.0)
        lo[rows], hi[rows] = lo_r, hi_r
        active[:] = False
        active[rows] = True
    sigma = mid.astype(np.float32)
    floor = MIN_K_DIST_SCALE * np.where(rho > 0, d.mean(axis=1), d.mean())
    sigma = np.where(sigma < floor, floor, sigma).astype(np.float32)
    return sigma, rho


def fuzzy_connectivities(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
    """Symmetric fuzzy-union connectivities of a kNN graph, self edges removed (CSR, float32).

    Parameters
    ----------
    indices, distances
        ``(n_cells, k)`` neighbours sorted by distance, column 0 the cell itself (``-1`` marks a
        missing neighbour).
    """
    idx = np.asarray(indices)
    d = np.asarray(distances, dtype=np.float32)
    n, _ = idx.shape
    sigma, rho = smooth_knn_dist(d)
    excess = np.maximum(d - rho[:, None], 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.exp(-(excess / sigma[:, None])).astype(np.float32)
    w = np.where((excess == 0) | (sigma[:, None] == 0), np.float32(1.0), w)
    rows = np.repeat(np.arange(n), idx.shape[1])
    w = np.where(idx == np.arange(n)[:, None], np.float32(0.0), w).ravel()
    cols = idx.ravel()
    keep = cols >= 0
    graph = sp.coo_matrix((w[keep], (rows[keep], cols[keep])), shape=(n, n)).tocsr()
    graph.eliminate_zeros()
    t = graph.T.tocsr()
    graph = (graph + t - graph.multiply(t)).tocsr()
    graph.eliminate_zeros()
    return graph.astype(np.float32)
