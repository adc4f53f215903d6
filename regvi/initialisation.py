"""Data-dependent initialisation (docs/model.md#data-dependent-initialisation): library,
ambient and feature statistics of the training cells, set on a module before training.

Used by :class:`regvi.base.BaseModel` and by reference mapping (:mod:`regvi.map.grow`), which
initialises a query's new categories the way training does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from regvi.data.counts import iter_row_blocks, row_totals
from regvi.module import RegVIModule


def _depth_normalised_stats(
    X: np.ndarray | sp.csr_matrix, log_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell relative size factor exp(log total − offset) and the depth-normalised matrix.

    Row-wise, so it applies to a row block of the counts just as to the whole matrix.
    """
    totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    size = np.exp(np.log(np.maximum(totals, 1.0)) - log_offset)
    inv = 1.0 / size
    Xn = sp.diags(inv) @ X if sp.issparse(X) else X * inv[:, None]
    return size, Xn


def _group_sums(Xn: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of rows of ``Xn`` per group, dense ``(n_groups, G)``."""
    n = Xn.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    sums = onehot @ Xn
    return sums.toarray() if sp.issparse(sums) else np.asarray(sums)


def _group_means(Xn: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of rows of ``Xn`` per group, ``(n_groups, G)``."""
    counts = np.bincount(codes, minlength=n_groups)
    return _group_sums(Xn, codes, n_groups) / np.maximum(counts, 1)[:, None]


class _GroupMeans:
    """Per-group column means accumulated over row blocks (chunk by chunk)."""

    def __init__(self, codes: np.ndarray, n_groups: int, n_cols: int):
        self.codes, self.n_groups = np.asarray(codes), n_groups
        self.sums = np.zeros((n_groups, n_cols))
        self.counts = np.bincount(self.codes, minlength=n_groups)

    def add_rows(self, codes: np.ndarray, block: Any) -> None:
        """Add the rows of ``block`` whose groups are ``codes``."""
        self.sums += _group_sums(block, codes, self.n_groups)

    def result(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)[:, None]


def _library_stats(
    log_lib: np.ndarray, codes: np.ndarray, use: np.ndarray, fallback: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group mean, variance and cell count of the log library over the cells in ``use``.

    A group without cells in ``use`` (e.g. all its cells went to validation) takes its stats
    from the cells in ``fallback`` (every cell with counts); a group without any cells takes the
    mean of the other groups' means and variance 1.
    """
    means, variances = np.full(n_groups, np.nan), np.ones(n_groups)
    codes = np.asarray(codes, dtype=np.int64)
    n = np.bincount(codes[use], minlength=n_groups)[:n_groups]
    found = np.zeros(n_groups, dtype=bool)
    for mask in (use, fallback):  # one pass per mask over all groups (bincount, no group loop)
        c, v = codes[mask], log_lib[mask]
        cnt = np.bincount(c, minlength=n_groups)[:n_groups]
        mean = np.bincount(c, weights=v, minlength=n_groups)[:n_groups] / np.maximum(cnt, 1)
        dev2 = np.bincount(c, weights=(v - mean[c]) ** 2, minlength=n_groups)[:n_groups]
        take = ~found & (cnt > 0)
        means[take] = mean[take]
        variances[take] = np.where(cnt[take] > 1, dev2[take] / np.maximum(cnt[take], 1), 1.0)
        found |= take
    if np.isnan(means).all():
        means[:] = 0.0
    means[np.isnan(means)] = np.nanmean(means)
    return means, variances, n


def _set_library_prior(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    use: np.ndarray,
    chunk_nnz: int | None,
) -> np.ndarray:
    """Set the library-size prior from the log library sizes of the ``use`` cells with
    counts; return the mask of cells with counts."""
    totals = row_totals(X, chunk_nnz)
    nonzero = totals > 0
    log_lib = np.log(np.maximum(totals, 1.0))
    lib_codes = cov["library_size"][:, 0]
    n_lib = module.config.n_library_groups
    means, variances, n_per_group = _library_stats(
        log_lib, lib_codes, use & nonzero, nonzero, n_lib
    )
    module.set_library_prior(
        torch.tensor(means, dtype=torch.float32),
        torch.tensor(variances, dtype=torch.float32),
        torch.tensor(n_per_group),
    )
    return nonzero


def _feature_stats(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    use: np.ndarray,
    dispersion_from_data: bool,
    chunk_nnz: int | None,
) -> tuple[np.ndarray, list[torch.Tensor] | None, torch.Tensor | None] | None:
    """Mean depth-normalised expression, ambient group means (with ambient) and
    method-of-moments theta (``dispersion_from_data``) over the ``use`` cells, accumulated
    over row chunks; ``None`` when no cell is used."""
    n_all = X.shape[0]
    offset = float(module.library_log_offset)
    n_cells, n_genes = int(use.sum()), X.shape[1]
    if n_cells == 0:
        return None
    col_sum = np.zeros(n_genes)
    ambient: list[tuple[np.ndarray, _GroupMeans]] = []
    if module.config.use_ambient:
        for k, n in enumerate(module.config.n_ambient_per_key):
            codes = cov["ambient"][use, k]
            ambient.append((cov["ambient"][:, k], _GroupMeans(codes, n, n_genes)))
    disp: tuple[np.ndarray, _GroupMeans, _GroupMeans] | None = None
    if dispersion_from_data:
        n_disp = module.log_theta_mean.shape[0]
        codes = cov["dispersion"][:, 0] if n_disp > 1 else np.zeros(n_all, dtype=np.int64)
        disp = (
            codes,
            _GroupMeans(codes[use], n_disp, n_genes),
            _GroupMeans(codes[use], n_disp, n_genes),
        )
    for start, stop, block in iter_row_blocks(X, chunk_nnz):
        keep = use[start:stop]
        if not keep.any():
            continue
        block = block if keep.all() else block[keep]
        _, Xn = _depth_normalised_stats(block, offset)
        col_sum += np.asarray(Xn.sum(axis=0)).ravel()
        for all_codes, acc in ambient:
            acc.add_rows(all_codes[start:stop][keep], Xn)
        if disp is not None:
            all_codes, disp_mean, disp_sq = disp
            sub = all_codes[start:stop][keep]
            disp_mean.add_rows(sub, Xn)
            disp_sq.add_rows(sub, Xn.multiply(Xn) if sp.issparse(Xn) else Xn**2)
        del Xn
    mean_expr = col_sum / n_cells
    ambient_means = None
    if module.config.use_ambient:
        ambient_means = [torch.tensor(acc.result(), dtype=torch.float32) for _, acc in ambient]
    theta = None
    if disp is not None:
        m = disp[1].result()
        v = disp[2].result() - m**2
        excess = np.maximum(v - m, 1e-8)
        # 90% of the excess variance is biological (explained by z), 10% technical
        theta = torch.tensor(m**2 / (0.1 * excess), dtype=torch.float32)
    return mean_expr, ambient_means, theta


def initialise_from_data(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    data_init: bool,
    dispersion_init: str,
    chunk_nnz: int | None = None,
    cells: np.ndarray | None = None,
) -> None:
    """Library prior (always) and data-dependent init of one modality's module
    (docs/model.md#data-dependent-initialisation).

    Every statistic is accumulated over row chunks of ``X`` (``chunk_nnz`` stored values per
    chunk, default :data:`regvi.data.counts.CHUNK_NNZ`), so a large or memory-mapped matrix
    needs no full-size temporaries; a matrix below one chunk is processed in one piece.

    Parameters
    ----------
    module
        The module to initialise in place.
    X
        Counts of the modality, cells × features.
    cov
        Encoded covariates (codes as seen by this modality).
    data_init
        Decoder bias and ambient from the data.
    dispersion_init
        ``"data"``: method-of-moments theta.
    chunk_nnz
        Stored values per row chunk.
    cells
        Boolean mask of the cells the statistics are taken from (``train()`` passes the
        training cells, so nothing is learnt from validation cells); default all. Cells without
        counts (a modality missing in a cell) never count.
    """
    n_all = X.shape[0]
    use = np.ones(n_all, dtype=bool) if cells is None else np.asarray(cells, dtype=bool)
    if use.shape != (n_all,):
        raise ValueError(f"cells mask has shape {use.shape}; expected ({n_all},)")
    nonzero = _set_library_prior(module, X, cov, use, chunk_nnz)
    if not (data_init or dispersion_init == "data"):
        return
    stats = _feature_stats(module, X, cov, use & nonzero, dispersion_init == "data", chunk_nnz)
    if stats is None:  # no cell with counts to learn from
        return
    mean_expr, ambient_means, theta = stats
    if data_init:
        module.data_init(torch.tensor(mean_expr, dtype=torch.float32), ambient_means, theta)
    elif theta is not None:
        module.data_init(None, None, theta)  # dispersion only; keep default init
