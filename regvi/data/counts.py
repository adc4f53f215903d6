"""Reading and validating the count matrix of an AnnData (dense, CSR or CSC)."""

from __future__ import annotations

import warnings

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
    if sp.issparse(X):
        return sp.csr_matrix(X) if not isinstance(X, sp.csr_matrix) else X
    if hasattr(X, "to_memory"):  # backed / lazy arrays
        X = X.to_memory()
        return get_counts(AnnData(X=X)) if sp.issparse(X) else np.asarray(X)
    if isinstance(X, np.ndarray):
        return X
    raise TypeError(
        f"{where} has type {type(X).__name__}; expected a numpy array or scipy sparse matrix"
    )


def validate_counts(
    X: CountMatrix, where: str = "adata.X", allow_non_integer: bool = False
) -> dict[str, int]:
    """Check counts are finite, non-negative and integer-valued; report zero-count cells/genes.

    Parameters
    ----------
    X
        Count matrix (CSR or dense), cells × features.
    where
        Name of the matrix used in error messages.
    allow_non_integer
        Accept non-integer values (e.g. ambient-corrected or imputed counts).

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
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{where} has dtype {values.dtype}; expected numeric counts")
    if values.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        if n_bad:
            raise ValueError(f"{where} contains {n_bad} NaN/inf values; counts must be finite")
    n_neg = int(np.count_nonzero(values < 0))
    if n_neg:
        raise ValueError(
            f"{where} contains {n_neg} negative values (min {values.min()}); expected raw counts >= 0"
        )
    if values.dtype.kind == "f" and not allow_non_integer:
        n_frac = int(np.count_nonzero(values != np.round(values)))
        if n_frac:
            example = values[values != np.round(values)][0]
            raise ValueError(
                f"{where} contains {n_frac} non-integer values (e.g. {example:g}); regvi models raw "
                "counts. Pass the raw-count layer (layer=...) or allow_non_integer=True to proceed."
            )
    cell_totals = np.asarray(X.sum(axis=1)).ravel()
    gene_totals = np.asarray(X.sum(axis=0)).ravel()
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
