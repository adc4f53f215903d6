"""Low-count robustness: binomial thinning, re-encoding, displacement
(docs/evaluation.md#low-count-robustness).

Thinning keeps each UMI with probability q, simulating a shallower cell. A model that keeps
thinned cells where their deep originals are is more useful for cheap or archival data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from evaluation.knn import compute_neighbours

DEFAULT_QS = (0.5, 0.25, 0.1)


def binomial_thin(counts: np.ndarray | sp.spmatrix, q: float, seed: int = 0) -> sp.csr_matrix:
    """Keep each UMI independently with probability ``q`` (Binomial(x, q) per entry), CSR out."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"thinning probability q={q}; expected 0 < q <= 1")
    X = sp.csr_matrix(counts, copy=True)
    rng = np.random.default_rng(seed)
    X.data = rng.binomial(X.data.astype(np.int64), q).astype(X.dtype)
    X.eliminate_zeros()
    return X


def _nearest_original(thinned: np.ndarray, original: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest ORIGINAL cells of every thinned cell, ``(n, k)``."""
    sq_o = (original.astype(np.float64) ** 2).sum(1)
    out = np.empty((thinned.shape[0], k), dtype=np.int64)
    for start in range(0, thinned.shape[0], 2048):
        t = thinned[start : start + 2048].astype(np.float64)
        d2 = (t**2).sum(1)[:, None] + sq_o[None, :] - 2 * t @ original.T.astype(np.float64)
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d2, part, 1), axis=1)
        out[start : start + 2048] = np.take_along_axis(part, order, 1)
    return out


def _majority(labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    codes, inverse = np.unique(labels, return_inverse=True)
    votes = np.zeros((idx.shape[0], len(codes)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), inverse[idx].ravel()), 1)
    return votes.argmax(1)


def low_count_robustness(
    encode: Callable[[sp.csr_matrix], np.ndarray],
    counts: np.ndarray | sp.spmatrix,
    original: np.ndarray,
    labels: np.ndarray | None = None,
    qs: Sequence[float] = DEFAULT_QS,
    k: int = 15,
    seed: int = 0,
) -> dict[str, float]:
    """Re-encode thinned copies and measure how far cells move.

    Parameters
    ----------
    encode
        Function from a CSR count matrix (same cells, same genes) to an embedding, e.g.
        ``lambda X: model.get_latent_representation(adata_with(X))``.
    counts
        Raw counts of the evaluation cells.
    original
        Embedding of the unthinned cells, ``(n_cells, n_dims)``.
    labels
        Optional labels: enables the label-majority metric.
    qs
        Thinning probabilities.
    k
        Neighbourhood size.
    seed
        Seed of the thinning.

    Returns
    -------
    dict
        Per q (as ``q0.25``): ``lowcount_q0.25_knn_preservation`` (share of the original cell's
        k neighbours among the thinned cell's k nearest original cells),
        ``lowcount_q0.25_label_majority`` (the thinned cell's nearest original cells have the same
        label majority as the original cell's neighbourhood), ``lowcount_q0.25_displacement``
        (median ||thinned − original|| / median inter-cell distance), and
        ``lowcount_q0.25_median_umis``.
    """
    original = np.asarray(original, dtype=np.float32)
    n = original.shape[0]
    k = min(k, n - 1)
    nb = compute_neighbours(original, k=k + 1)
    own = nb.indices[:, 1:]  # neighbours of the original cell, self excluded
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, 4096), rng.integers(0, n, 4096)
    keep = a != b
    typical = float(np.median(np.linalg.norm(original[a[keep]] - original[b[keep]], axis=1)))
    maj_own = _majority(np.asarray(labels), own) if labels is not None else None
    out: dict[str, float] = {}
    for i, q in enumerate(qs):
        thinned = binomial_thin(counts, q, seed=seed + 1 + i)
        emb = np.asarray(encode(thinned), dtype=np.float32)
        if emb.shape != original.shape:
            raise ValueError(f"encode returned shape {emb.shape}; expected {original.shape}")
        near = _nearest_original(emb, original, k + 1)
        # drop the original cell itself from its thinned copy's neighbour list, keep k
        mask = near != np.arange(n)[:, None]
        order = np.argsort(~mask, axis=1, kind="stable")[:, :k]
        near = np.take_along_axis(near, order, 1)
        shared = (near[:, :, None] == own[:, None, :]).any(2).sum(1) / k
        tag = f"lowcount_q{q:g}"
        out[f"{tag}_knn_preservation"] = float(shared.mean())
        out[f"{tag}_displacement"] = float(
            np.median(np.linalg.norm(emb - original, axis=1)) / typical
        )
        out[f"{tag}_median_umis"] = float(np.median(np.asarray(thinned.sum(1)).ravel()))
        if maj_own is not None:
            out[f"{tag}_label_majority"] = float(
                (_majority(np.asarray(labels), near) == maj_own).mean()
            )
    return out
