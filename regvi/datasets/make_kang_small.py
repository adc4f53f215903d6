"""Build the bundled Kang PBMC subset from the full file.

Usage::

    python -m regvi.datasets.make_kang_small ../shared/data/kang2018_ifnb_pbmc.h5ad

Selects 2,000 highly variable genes (scanpy ``seurat`` flavour on log-normalised counts, per
``condition``) and 4,000 cells sampled evenly over ``condition`` × ``cell_type`` strata
(seeded), and writes raw counts (int32 CSR, gzip) next to this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from regvi.datasets import KANG_SMALL


def build(
    source: Path, out: Path, n_cells: int = 4000, n_genes: int = 2000, seed: int = 0
) -> ad.AnnData:
    """Subset ``source`` to ``n_cells`` × ``n_genes`` and write it to ``out``."""
    full = ad.read_h5ad(source)
    norm = full.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_genes, flavor="seurat", batch_key="condition")
    genes = norm.var_names[norm.var["highly_variable"].to_numpy()]
    rng = np.random.default_rng(seed)
    strata = full.obs["condition"].astype(str) + "|" + full.obs["cell_type"].astype(str)
    groups = {s: np.flatnonzero(strata.to_numpy() == s) for s in sorted(strata.unique())}
    # proportional allocation, at least 20 cells per stratum where available
    sizes = {s: len(ix) for s, ix in groups.items()}
    total = sum(sizes.values())
    take = {s: min(n, max(20, round(n_cells * n / total))) for s, n in sizes.items()}
    chosen = np.sort(
        np.concatenate([rng.choice(groups[s], take[s], replace=False) for s in groups])
    )
    small = full[chosen, genes].copy()
    small.X = sp.csr_matrix(small.X, dtype=np.int32)
    keep = ["condition", "donor", "sample", "cell_type"]
    small.obs = small.obs[keep].copy()
    for k in keep:
        small.obs[k] = small.obs[k].astype(str).astype("category")
    small.var = small.var.iloc[:, :0].copy()
    small.uns = {"source": f"{source.name}: {len(chosen)} cells x {len(genes)} HVGs (seed {seed})"}
    small.write_h5ad(out, compression="gzip")
    return small


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", type=Path, help="path to kang2018_ifnb_pbmc.h5ad")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name(KANG_SMALL))
    args = p.parse_args()
    small = build(args.source, args.out)
    print(f"wrote {args.out}: {small.n_obs} cells x {small.n_vars} genes")


if __name__ == "__main__":
    main()
