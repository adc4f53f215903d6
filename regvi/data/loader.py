"""Fast minibatches from a (sparse) count matrix.

The matrix stays sparse in memory; a whole minibatch of CSR rows is sliced at once and densified
per batch. One ``__getitem__`` call returns a full batch (the sampler yields index arrays), so
there is no per-cell tensor construction and no collate step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from torch.utils.data import DataLoader, Dataset, Sampler

from regvi.data.counts import iter_row_blocks, row_totals


class CountBatches(Dataset):
    """Batched view of counts plus encoded covariates.

    Parameters
    ----------
    X
        Counts, CSR or dense, cells × features.
    covariates
        Purpose → array with one row per cell (codes or continuous values), from
        :meth:`regvi.data.CovariateRegistry.encode`.
    """

    def __init__(self, X: np.ndarray | sp.csr_matrix, covariates: Mapping[str, np.ndarray]):
        self.X = X
        self.sparse = sp.issparse(X)
        self.covariates = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in covariates.items()
        }
        # sum_g lgamma(x_ng + 1), the likelihood's data constant, over non-zeros only
        self.covariates["log_x_factorial"] = torch.from_numpy(log_factorial_rows(X))

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitem__(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Return the batch of rows ``idx`` (an integer array), counts densified as float32.

        Sparse rows are sliced in increasing row order (sequential pages of a memory-mapped
        matrix) and put back in the order of ``idx``: row ``i`` of ``x`` is cell ``idx[i]``.
        """
        idx = np.asarray(idx)
        tidx = torch.from_numpy(idx)
        if self.sparse:
            x, flat, values = _sorted_rows(self.X, idx)
            batch = {
                "x": torch.from_numpy(x),
                "index": tidx,
                # stored entries of x (flat row-major positions, values): the likelihood's
                # non-zero terms, without a torch.nonzero pass over the dense batch
                "x_nonzero": torch.from_numpy(flat),
                "x_values": torch.from_numpy(values),
            }
        else:
            batch = {
                "x": torch.from_numpy(np.asarray(self.X[idx], dtype=np.float32)),
                "index": tidx,
            }
        for k, v in self.covariates.items():
            batch[k] = v[tidx]
        return batch


class MultiCountBatches(Dataset):
    """Batched view of several count modalities of the same cells plus shared covariates.

    Each batch holds the shared covariates and ``batch["modalities"][m]`` with ``x`` (dense
    float32), ``log_x_factorial`` and ``observed`` (cells with any count in ``m``).

    Parameters
    ----------
    Xs
        Modality → counts (CSR or dense), all with the same cells in the same order.
    covariates
        Purpose → array with one row per cell, shared by all modalities.
    """

    def __init__(
        self,
        Xs: Mapping[str, np.ndarray | sp.csr_matrix],
        covariates: Mapping[str, np.ndarray],
    ):
        self.parts = {m: CountBatches(X, {}) for m, X in Xs.items()}
        n = {m: len(p) for m, p in self.parts.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"modalities have different numbers of cells: {n}")
        self.n_cells = next(iter(n.values()))
        self.covariates = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in covariates.items()
        }
        self.observed = {m: torch.from_numpy(row_totals(X) > 0) for m, X in Xs.items()}
        #: where the index tensor is put (the parts' device after :func:`regvi.data.to_device`)
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return self.n_cells

    def __getitem__(self, idx: np.ndarray) -> dict:
        idx = np.asarray(idx)
        tidx = torch.from_numpy(idx)
        if self.device.type != "cpu":
            tidx = tidx.to(self.device, non_blocking=True)
        batch: dict = {"index": tidx, "modalities": {}}
        for k, v in self.covariates.items():
            batch[k] = v[tidx]
        for m, part in self.parts.items():
            sub = part[idx]
            batch["modalities"][m] = {
                "x": sub["x"],
                "log_x_factorial": sub["log_x_factorial"],
                "observed": self.observed[m][tidx],
            }
            for k in ("x_nonzero", "x_values"):
                if k in sub:
                    batch["modalities"][m][k] = sub[k]
        return batch


def _sorted_rows(X: sp.csr_matrix, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense float32 rows ``X[idx]`` (in the order of ``idx``), sliced in sorted row order.

    Also returns the stored entries of the result: flat positions ``i · n_cols + j`` (int64)
    and their values (float32).
    """
    n_cols = X.shape[1]
    if len(idx) < 2 or bool(np.all(idx[1:] >= idx[:-1])):
        order = None
        sub = X[idx]
    else:
        order = np.argsort(idx, kind="stable")
        sub = X[idx[order]]
    rows = sub.toarray()
    dest = np.repeat(np.arange(len(idx), dtype=np.int64), np.diff(sub.indptr))
    if order is None:
        x = rows.astype(np.float32, copy=False)
    else:
        x = np.empty(rows.shape, dtype=np.float32)
        x[order] = rows
        dest = order[dest]
    flat = dest * n_cols + sub.indices.astype(np.int64, copy=False)
    return x, flat, np.asarray(sub.data, dtype=np.float32)


def log_factorial_rows(X: np.ndarray | sp.csr_matrix, chunk_nnz: int | None = None) -> np.ndarray:
    """Per-row sum of lgamma(x + 1) (float32), over stored non-zeros for CSR, in row chunks."""
    out = np.empty(X.shape[0], dtype=np.float32)
    for start, stop, block in iter_row_blocks(X, chunk_nnz):
        out[start:stop] = _log_factorial_block(block)
    return out


def _log_factorial_block(X: np.ndarray | sp.csr_matrix) -> np.ndarray:
    if sp.issparse(X):
        # same sparsity pattern, lgamma(x + 1) as values; a CSR row sum (np.add.at is slow)
        lf = sp.csr_matrix((gammaln(X.data.astype(np.float64) + 1.0), X.indices, X.indptr), X.shape)
        return np.asarray(lf.sum(axis=1)).ravel().astype(np.float32)
    return gammaln(np.asarray(X, dtype=np.float64) + 1.0).sum(1).astype(np.float32)


class BatchIndexSampler(Sampler[np.ndarray]):
    """Yields index arrays of one minibatch each; seeded shuffle that changes every epoch.

    Parameters
    ----------
    indices
        Cell indices to iterate over.
    batch_size
        Cells per minibatch.
    shuffle
        Shuffle every epoch with ``seed + epoch``.
    seed
        Base seed.
    num_replicas, rank
        Shard for data-parallel training: every replica sees the same number of batches.
    """

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to derive this epoch's shuffle."""
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        idx = self.indices
        if self.shuffle:
            rng = np.random.default_rng((self.seed, self.epoch))
            idx = idx[rng.permutation(len(idx))]
        if self.num_replicas > 1:
            per = int(np.ceil(len(idx) / self.num_replicas))
            pad = per * self.num_replicas - len(idx)
            if pad:
                idx = np.concatenate([idx, idx[:pad]])
            idx = idx[self.rank :: self.num_replicas]
        return idx

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]
        self.epoch += 1 if self.shuffle else 0

    def __len__(self) -> int:
        n = int(np.ceil(len(self.indices) / self.num_replicas))
        return int(np.ceil(n / self.batch_size))


def make_loader(
    data: CountBatches | MultiCountBatches,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose every item is a full minibatch (``batch_size=None``).

    ``pin_memory`` puts host batches in page-locked memory, so the copy to a GPU is
    asynchronous (Lightning moves batches with ``non_blocking=True``); not for batches that
    are already on the device (:mod:`regvi.data.device`).
    """
    sampler = BatchIndexSampler(indices, batch_size, shuffle, seed, num_replicas, rank)
    return DataLoader(data, sampler=sampler, batch_size=None, num_workers=0, pin_memory=pin_memory)


def train_validation_split(
    n_cells: int,
    validation_fraction: float = 0.1,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split, optionally stratified (e.g. by label × library).

    Within each stratum ``round(fraction × size)`` cells go to validation, keeping at least one
    training cell per stratum. Returns sorted index arrays.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction}; expected 0 <= f < 1")
    rng = np.random.default_rng(seed)
    if validation_fraction == 0.0:
        return np.arange(n_cells), np.zeros(0, dtype=np.int64)
    if strata is None:
        perm = rng.permutation(n_cells)
        n_val = round(validation_fraction * n_cells)
        n_val = min(max(n_val, 1), n_cells - 1)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    strata = np.asarray(strata)
    _, inverse = np.unique(strata, return_inverse=True)
    val_parts = []
    for s in range(inverse.max() + 1):
        members = np.flatnonzero(inverse == s)
        members = members[rng.permutation(len(members))]
        n_val = min(round(validation_fraction * len(members)), len(members) - 1)
        val_parts.append(members[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(n_cells, dtype=bool)
    train_mask[val] = False
    return np.flatnonzero(train_mask), val
