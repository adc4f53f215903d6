"""Small real datasets shipped with regvi (no runtime download)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import anndata as ad

KANG_SMALL = "kang2018_pbmc_small.h5ad"
IMMUNE_MARKERS = "immune_marker_genes.csv"


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


def immune_markers_path() -> Path:
    """The bundled curated immune / haematopoietic marker list (192 genes; columns ``gene,
    cell_type, lineage, category``), for the neighbourhood metrics on human immune data.

    From the public regularizedvi repository (``vitkl/regularizedvi``,
    ``docs/notebooks/known_marker_genes.csv``, MIT licence, © 2026 Vitalii Kleshchevnikov).
    Sweep configs name it ``evaluation.markers: bundled:immune_markers``.
    """
    return Path(__file__).resolve().parent / IMMUNE_MARKERS
