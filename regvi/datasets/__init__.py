"""Small real datasets shipped with regvi (no runtime download)."""

from __future__ import annotations

from importlib import resources

import anndata as ad

KANG_SMALL = "kang2018_pbmc_small.h5ad"


def kang_pbmc_small() -> ad.AnnData:
    """Kang et al. 2018 PBMC (IFN-β stimulated vs control), a stratified subset bundled with regvi.

    4,000 cells (balanced over ``condition`` × ``cell_type``) × 2,000 highly variable genes,
    raw integer counts in ``X`` (CSR). obs: ``condition`` (ctrl/stim, the library key),
    ``donor``, ``sample``, ``cell_type`` (13 types, partly kNN-transferred labels; see the
    data README). Built by ``python -m regvi.datasets.make_kang_small`` from
    ``kang2018_ifnb_pbmc.h5ad`` (GEO GSE96583).
    """
    with resources.as_file(resources.files(__package__) / KANG_SMALL) as path:
        return ad.read_h5ad(path)
