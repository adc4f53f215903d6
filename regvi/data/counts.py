"""Reading and validating the count matrix of an AnnData (dense, CSR or CSC)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

CountMatrix = np.ndarray | sp.csr_matrix


def get_counts(adata: AnnData, layer: str | None = None) -> CountMatrix:
    """Return the counts of ``adata`` (``X`` or ``layers[layer]``) as CSR or a dense array.

    CSC input is converted to CSR once (row slicing per minibatch needs CSR); sparse arrays
    (``csr_array``) are converted to ``csr_matrix`` without copying the data.

    Raises
    ------
    KeyError
        If ``layer`` is not in ``adata.layers``.
    TypeError
        If the matrix is neither dense nor a scipy sparse matrix (e.g. backed without a file).
    """
    if layer is None:
        X = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            raise KeyError(
                f"layer={layer!r} is not in adata.layers; available layers: {sorted(adata.layers)}"
            )
        X = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if X is None:
        raise ValueError(f"{where} is empty (None); regvi needs a count matrix")
    if getattr(adata, "isbacked", False) and not (sp.issparse(X) or isinstance(X, np.ndarray)):
        raise TypeError(
            f"{where} is backed by {adata.filename} (read_h5ad(..., backed='r')), which cannot be "
            "sliced by rows per minibatch without reading the whole file each time. Convert it "
            "once to a memory-mapped CSR with regvi.data.mmap.h5ad_to_mmap(h5ad_path, out_dir) "
            "(reads row chunks; returns an AnnData whose X is memory-mapped), or load it with "
            "adata.to_memory()"
        )
    if sp.issparse(X):
        return sp.csr_matrix(X) if not isinstance(X, sp.csr_matrix) else X
    if hasattr(X, "to_memory"):  # lazy arrays
        X = X.to_memory()
        return get_counts(AnnData(X=X)) if sp.issparse(X) else np.asarray(X)
    if isinstance(X, np.ndarray):
        return X
    raise TypeError(
        f"{where} has type {type(X).__name__}; expected a numpy array or scipy sparse matrix"
    )


#: Target number of stored values per row chunk in setup passes over the counts (validation,
#: library sizes, data-dependent init, log-factorials): ~2M values, i.e. tens of MiB of
#: temporaries, whatever the matrix size. Matrices below it are processed in one piece.
CHUNK_NNZ = 1 << 21


def row_chunks(X: CountMatrix, chunk_nnz: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``chunk_nnz`` stored values each (CSR or dense)."""
    n_rows = X.shape[0]
    target = CHUNK_NNZ if chunk_nnz is None else int(chunk_nnz)
    stored = X.nnz if sp.issparse(X) else n_rows * X.shape[1]
    if stored <= target or n_rows <= 1:
        return [(0, n_rows)]
    rows = max(1, int(target // max(1.0, stored / n_rows)))
    return [(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]


def iter_row_blocks(
    X: CountMatrix, chunk_nnz: int | None = None
) -> Iterator[tuple[int, int, CountMatrix]]:
    """Yield ``(start, stop, X[start:stop])`` over row chunks; one chunk is ``X`` itself.

    Blocks of a CSR matrix are in-memory CSR copies of those rows (a memory-mapped matrix is
    paged in one chunk at a time); blocks of a dense array are views.
    """
    bounds = row_chunks(X, chunk_nnz)
    if len(bounds) == 1:
        yield 0, X.shape[0], X
        return
    for start, stop in bounds:
        yield start, stop, X[start:stop]


def row_totals(X: CountMatrix, chunk_nnz: int | None = None) -> np.ndarray:
    """Per-row sums as float64, computed chunk by chunk (same values as ``X.sum(axis=1)``)."""
    out = np.empty(X.shape[0], dtype=np.float64)
    for start, stop, block in iter_row_blocks(X, chunk_nnz):
        out[start:stop] = np.asarray(block.sum(axis=1)).ravel()
    return out


def _value_chunks(X: CountMatrix, chunk_nnz: int | None) -> Iterator[np.ndarray]:
    """The stored values of ``X`` in flat chunks (CSR ``data`` slices; dense row blocks)."""
    target = CHUNK_NNZ if chunk_nnz is None else int(chunk_nnz)
    if sp.issparse(X):
        n = len(X.data)
        for s in range(0, max(n, 1), target):
            yield X.data[s : s + target]
    else:
        for _, _, block in iter_row_blocks(X, chunk_nnz):
            yield np.asarray(block).ravel()


def validate_counts(
    X: CountMatrix,
    where: str = "adata.X",
    allow_non_integer: bool = False,
    chunk_nnz: int | None = None,
) -> dict[str, int]:
    """Check counts are finite, non-negative and integer-valued; report zero-count cells/genes.

    Works chunk by chunk (``chunk_nnz`` stored values at a time, default :data:`CHUNK_NNZ`),
    so a memory-mapped matrix is checked without full-size temporaries.

    Parameters
    ----------
    X
        Count matrix (CSR or dense), cells × features.
    where
        Name of the matrix used in error messages.
    allow_non_integer
        Accept non-integer values (e.g. ambient-corrected or imputed counts).
    chunk_nnz
        Values per chunk.

    Returns
    -------
    dict
        ``{"n_zero_cells": ..., "n_zero_genes": ...}``.

    Raises
    ------
    ValueError
        On empty input, NaN/inf, negative or (unless allowed) non-integer values.
    """
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        raise ValueError(f"{where} has shape {X.shape}; expected at least one cell and one feature")
    dtype = X.dtype if sp.issparse(X) else np.asarray(X[:0]).dtype
    if dtype.kind not in "biuf":
        raise ValueError(f"{where} has dtype {dtype}; expected numeric counts")
    is_float = dtype.kind == "f"
    n_bad = n_neg = n_frac = 0
    min_value = None
    example = None
    for values in _value_chunks(X, chunk_nnz):
        if is_float:
            n_bad += int(np.count_nonzero(~np.isfinite(values)))
        neg = values < 0
        k = int(np.count_nonzero(neg))
        if k:
            n_neg += k
            low = values[neg].min()
            min_value = low if min_value is None else min(min_value, low)
        if is_float and not allow_non_integer:
            frac = values != np.round(values)
            k = int(np.count_nonzero(frac))
            if k:
                n_frac += k
                if example is None:
                    example = values[frac][0]
    if n_bad:
        raise ValueError(f"{where} contains {n_bad} NaN/inf values; counts must be finite")
    if n_neg:
        raise ValueError(
            f"{where} contains {n_neg} negative values (min {min_value}); expected raw counts >= 0"
        )
    if n_frac:
        raise ValueError(
            f"{where} contains {n_frac} non-integer values (e.g. {example:g}); regvi models raw "
            "counts. Pass the raw-count layer (layer=...) or allow_non_integer=True to proceed."
        )
    cell_totals = np.empty(n_cells, dtype=np.float64)
    gene_totals = np.zeros(n_genes, dtype=np.float64)
    for start, stop, block in iter_row_blocks(X, chunk_nnz):
        cell_totals[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        gene_totals += np.asarray(block.sum(axis=0)).ravel()
    n_zero_cells = int(np.count_nonzero(cell_totals == 0))
    n_zero_genes = int(np.count_nonzero(gene_totals == 0))
    if n_zero_cells == n_cells:
        raise ValueError(f"{where}: all {n_cells} cells have zero total counts")
    if n_zero_cells:
        warnings.warn(
            f"{where}: {n_zero_cells} of {n_cells} cells have zero total counts; they are kept but "
            "carry no information (consider filtering them)",
            UserWarning,
            stacklevel=3,
        )
    if n_zero_genes:
        warnings.warn(
            f"{where}: {n_zero_genes} of {n_genes} features have zero counts in every cell",
            UserWarning,
            stacklevel=3,
        )
    return {"n_zero_cells": n_zero_cells, "n_zero_genes": n_zero_genes}
