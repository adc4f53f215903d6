"""The dataset catalogue: fetch from a mirror (a real HTTP server on 127.0.0.1) or build from
sources, checksums, atomic writes, the CLI, and ``dataset:`` / ``${VAR}`` in sweep configs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from regvi.datasets import __main__ as cli
from regvi.datasets import catalog, immune_markers_path, recipes
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
    with pytest.raises(catalog.DatasetError, match=r"kang2018_muscat_ctrl.*--mirror.*R"):
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
