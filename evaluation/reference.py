"""The unintegrated reference embedding: PCA of log1p-normalised counts, cached per dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def dataset_fingerprint(
    counts: np.ndarray | sp.spmatrix, obs_names: np.ndarray | None = None
) -> str:
    """SHA-256 (first 16 hex digits) of the count matrix (and cell names): a stable dataset id."""
    h = hashlib.sha256()
    h.update(str(counts.shape).encode())
    if sp.issparse(counts):
        csr = sp.csr_matrix(counts)
        for arr in (csr.indptr, csr.indices, csr.data):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(counts).tobytes())
    if obs_names is not None:
        h.update("\x00".join(map(str, obs_names)).encode())
    return h.hexdigest()[:16]


def log1p_normalise(
    counts: np.ndarray | sp.spmatrix, target_sum: float = 1e4
) -> sp.csr_matrix | np.ndarray:
    """log1p of counts scaled to ``target_sum`` per cell (zero-count cells stay zero)."""
    totals = np.asarray(counts.sum(axis=1)).ravel().astype(np.float64)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    if sp.issparse(counts):
        out = sp.csr_matrix(sp.diags(scale) @ sp.csr_matrix(counts, dtype=np.float64))
        out.data = np.log1p(out.data)
        return out.astype(np.float32)
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale[:, None]).astype(np.float32)


#: Above this many cells × genes a sparse reference matrix is not densified: its PCA runs on
#: the sparse matrix with implicit centring (ARPACK on ``X - mean`` as a linear operator).
DENSE_PCA_MAX_ENTRIES = 2e8


def unintegrated_pca(
    counts: np.ndarray | sp.spmatrix,
    n_comps: int = 50,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    dense_max_entries: float | None = None,
) -> np.ndarray:
    """PCA (``n_comps``) of log1p-normalised counts, cached as
    ``pca_<fingerprint>_<n>_<seed>_centred.npy``.

    The reference for scib's PCR comparison; computed once per dataset (and cell subset).
    Always a centred PCA (as ``scanpy.tl.pca(zero_center=True)``): a sparse matrix with more
    than ``dense_max_entries`` entries is never densified; its genes are centred implicitly
    (scikit-learn's ARPACK PCA on sparse input), so the components are the same as the dense
    path's.

    Parameters
    ----------
    counts
        Raw counts, cells × genes (dense or sparse).
    n_comps
        Number of components (at most ``min(shape) - 1``).
    cache_dir
        Folder of the cache (``None``: no cache).
    seed
        Seed of ARPACK's start vector.
    dense_max_entries
        Cells × genes above which a sparse matrix stays sparse (default
        :data:`DENSE_PCA_MAX_ENTRIES`).

    Returns
    -------
    np.ndarray
        ``(n_cells, n_comps)`` float32 principal components.
    """
    n_comps = int(min(n_comps, min(counts.shape) - 1))
    if dense_max_entries is None:
        dense_max_entries = DENSE_PCA_MAX_ENTRIES
    path = None
    if cache_dir is not None:
        name = f"pca_{dataset_fingerprint(counts)}_{n_comps}_{seed}_centred.npy"
        path = Path(cache_dir) / name
        if path.is_file():
            return np.load(path, allow_pickle=False)
    from sklearn.decomposition import PCA

    X = log1p_normalise(counts)
    pca = PCA(n_comps, random_state=seed, svd_solver="arpack")
    if sp.issparse(X) and X.shape[0] * X.shape[1] > dense_max_entries:
        # implicit centring: never densified (float64: ARPACK on the operator converges tightly)
        pcs = pca.fit_transform(sp.csr_matrix(X, dtype=np.float64))
    else:
        pcs = pca.fit_transform(X.toarray() if sp.issparse(X) else X)
    pcs = pcs.astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, pcs, allow_pickle=False)
        tmp.replace(path)
    return pcs
