"""Build catalogued datasets from their downloaded public source files (see :mod:`.catalog`).

Each recipe takes the folder holding its :attr:`~regvi.datasets.catalog.Dataset.sources` and
returns dataset name → AnnData (raw integer counts, int32 CSR); the caller verifies the content
digests before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _int_csr(m) -> sp.csr_matrix:
    m = sp.csr_matrix(m)
    if not np.all(m.data == np.round(m.data)):
        raise ValueError("non-integer counts in the source matrix")
    m.data = m.data.astype(np.int32)
    m.eliminate_zeros()
    return m


def build_mop(src: Path) -> dict[str, ad.AnnData]:
    """Mouse MOp SNARE-seq2 (batch C1 of scMoMaT's ``MOp_5batches``): paired RNA and ATAC.

    Sources: ``GxC1.npz`` (genes × cells), ``RxC1.npz`` (regions × cells), ``GxR.npz`` (the
    gene–region links), ``meta_c1.csv``, ``genes.txt``, ``regions.txt``.
    """
    src = Path(src)
    meta = pd.read_csv(src / "meta_c1.csv", index_col=0)
    meta = meta.rename(
        columns={
            "Batch": "batch",
            "Barcode": "barcode",
            "Ident": "cell_type",
            "cluster (remapped)": "cell_type_coarse",
        }
    )
    for c in ("batch", "cell_type", "cell_type_coarse"):
        meta[c] = meta[c].astype("category")
    genes = (src / "genes.txt").read_text().split()
    regions = (src / "regions.txt").read_text().split()
    rna = ad.AnnData(
        X=_int_csr(sp.load_npz(src / "GxC1.npz").T),
        obs=meta.copy(),
        var=pd.DataFrame(index=pd.Index(genes, name="gene")),
    )
    atac_var = pd.DataFrame(index=pd.Index(regions, name="peak"))
    parts = atac_var.index.str.split("_", n=2, expand=True)
    atac_var["chrom"] = parts.get_level_values(0)
    atac_var["start"] = parts.get_level_values(1).astype(int)
    atac_var["end"] = parts.get_level_values(2).astype(int)
    atac = ad.AnnData(X=_int_csr(sp.load_npz(src / "RxC1.npz").T), obs=meta.copy(), var=atac_var)
    source = (
        "BICCN mouse primary motor cortex SNARE-seq2 (12 libraries 09A-09L), as preprocessed in "
        "scMoMaT (PeterZZQ/scMoMaT data/real/MOp_5batches, batch C1; MIT)"
    )
    rna.uns["source"] = atac.uns["source"] = source
    gxr = sp.load_npz(src / "GxR.npz").tocoo()
    atac.uns["gene_region_link"] = pd.DataFrame(
        {"gene": np.array(genes)[gxr.row], "peak": np.array(regions)[gxr.col]}
    )
    return {"mop_snareseq2_rna": rna, "mop_snareseq2_atac": atac}


RECIPES: dict[str, Callable[[Path], dict[str, ad.AnnData]]] = {"mop": build_mop}
