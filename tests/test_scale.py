"""Large-data path: memory-mapped CSR, chunked setup passes, sorted minibatch slicing."""

from __future__ import annotations

import json
import os

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import regvi
from regvi.data import counts as counts_mod
from regvi.data.counts import get_counts, row_chunks, validate_counts
from regvi.data.loader import CountBatches, log_factorial_rows
from regvi.data.mmap import (
    csr_nbytes,
    h5ad_to_mmap,
    is_mmap_backed,
    open_mmap_anndata,
    open_mmap_csr,
    read_mmap_meta,
    write_mmap_csr,
)
from regvi.initialisation import initialise_from_data
from regvi.module import RegVIModule
from regvi.simulate import simulate, simulate_to_mmap

torch.set_num_threads(1)

SIM = {"n_cells": 5000, "n_genes": 100, "depth_range": (200.0, 800.0), "seed": 4}


@pytest.fixture(scope="module")
def big():
    return simulate(**SIM)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many row chunks in every setup pass."""
    monkeypatch.setattr(counts_mod, "CHUNK_NNZ", 3000)


def _no_pickle(path) -> None:
    for name in os.listdir(path):
        assert not name.endswith((".pkl", ".pickle")), name
        if name.endswith(".npy"):
            arr = np.load(os.path.join(path, name), mmap_mode="r", allow_pickle=False)
            assert arr.dtype != object
        if name.endswith(".npz"):
            with np.load(os.path.join(path, name), allow_pickle=False) as z:
                for k in z.files:
                    assert z[k].dtype != object


def test_mmap_round_trip_matrix_and_chunks(tmp_path, big):
    X = big.X
    write_mmap_csr(tmp_path / "whole", X, chunk_rows=777)
    chunks = (
        X[s : s + 1000].toarray() if s % 2000 else X[s : s + 1000] for s in range(0, 5000, 1000)
    )
    write_mmap_csr(tmp_path / "chunks", chunks, n_cols=X.shape[1])
    for d in ("whole", "chunks"):
        Y = open_mmap_csr(tmp_path / d)
        assert isinstance(Y, sp.csr_matrix) and is_mmap_backed(Y)
        assert Y.shape == X.shape and Y.dtype == X.dtype and Y.nnz == X.nnz
        assert np.array_equal(Y.indptr, X.indptr) and np.array_equal(Y.indices, X.indices)
        assert np.array_equal(Y.data, X.data)
        assert not Y.data.flags.writeable
        idx = np.array([4999, 3, 17, 3])
        assert (Y[idx].toarray() == X[idx].toarray()).all()
        meta = read_mmap_meta(tmp_path / d)
        assert meta["shape"] == [5000, 100] and meta["nnz"] == X.nnz
        assert csr_nbytes(tmp_path / d) == sum(
            os.path.getsize(tmp_path / d / f"{n}.npy") for n in ("data", "indices", "indptr")
        )
        assert sorted(os.listdir(tmp_path / d)) == [
            "data.npy",
            "indices.npy",
            "indptr.npy",
            "meta.json",
        ]
        _no_pickle(tmp_path / d)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_mmap_csr(tmp_path / "whole", X)
    adata = anndata.AnnData(X=open_mmap_csr(tmp_path / "whole"), obs=big.obs, var=big.var)
    assert is_mmap_backed(adata.X) and is_mmap_backed(get_counts(adata))


def test_write_checks_columns_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="columns"):
        write_mmap_csr(tmp_path / "a", iter([np.ones((2, 3)), np.ones((2, 4))]), n_cols=3)
    with pytest.raises(TypeError, match="same_kind"):
        write_mmap_csr(tmp_path / "b", iter([np.ones((2, 3), np.int32), np.full((1, 3), 0.5)]))
    assert not (tmp_path / "a" / "meta.json").exists()
    write_mmap_csr(tmp_path / "c", iter([]), n_cols=5)
    assert open_mmap_csr(tmp_path / "c").shape == (0, 5)
    with pytest.raises(FileNotFoundError, match=r"meta\.json"):
        open_mmap_csr(tmp_path / "nothing")


def test_chunked_setup_passes_match_whole_matrix(big, monkeypatch):
    X = big.X
    model = regvi.RegVI(big, library_key="library", dispersion_init="data")
    cov = model._covariates
    torch.manual_seed(0)
    ref = RegVIModule(model.config)
    initialise_from_data(ref, X, cov, True, "data")
    lf_ref, summary_ref = log_factorial_rows(X), validate_counts(X)
    monkeypatch.setattr(counts_mod, "CHUNK_NNZ", 3000)
    assert len(row_chunks(X)) > 10
    torch.manual_seed(0)
    chunked = RegVIModule(model.config)
    initialise_from_data(chunked, X, cov, True, "data")
    for (k, a), b in zip(ref.state_dict().items(), chunked.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    assert np.array_equal(log_factorial_rows(X), lf_ref)
    assert validate_counts(X) == summary_ref
    dense = X[:700].toarray()
    assert np.array_equal(log_factorial_rows(dense), log_factorial_rows(X[:700]))


@pytest.mark.parametrize(
    ("value", "match"),
    [(-2.0, "1 negative values"), (np.nan, "1 NaN/inf"), (np.inf, "1 NaN/inf"), (0.5, "non-int")],
)
@pytest.mark.parametrize("dense", [False, True])
def test_chunked_validation_errors(tmp_path, big, small_chunks, value, match, dense):
    X = big.X[:1000].astype(np.float32)
    X.data[-1] = value  # in the last chunk
    if dense:
        M = X.toarray()
    else:
        write_mmap_csr(tmp_path / "m", X)
        M = open_mmap_csr(tmp_path / "m")
    with pytest.raises(ValueError, match=match) as err:
        validate_counts(M, "adata.layers['raw']")
    assert "adata.layers['raw']" in str(err.value)
    if value == -2.0:
        assert "min -2.0" in str(err.value)
    if value == 0.5:
        assert "e.g. 0.5" in str(err.value)
        assert validate_counts(M, allow_non_integer=True)["n_zero_cells"] == 0


def test_chunked_validation_counts_all_chunks(big, small_chunks):
    X = big.X[:1000].astype(np.float32)
    X.data[[0, len(X.data) // 2, -1]] = [-1.0, -5.0, -3.0]
    with pytest.raises(ValueError, match=r"3 negative values \(min -5.0\)"):
        validate_counts(X)
    X = big.X[:1000].copy()
    X.data[:] = 0
    X.eliminate_zeros()
    with pytest.raises(ValueError, match="all 1000 cells have zero"):
        validate_counts(X)


def test_sorted_slicing_keeps_requested_order(tmp_path, big):
    write_mmap_csr(tmp_path / "m", big.X)
    cov = {"continuous": np.zeros((big.n_obs, 0), np.float32)}
    data = CountBatches(open_mmap_csr(tmp_path / "m"), cov)
    idx = np.random.default_rng(0).permutation(big.n_obs)[:300]
    idx[5] = idx[9]  # a duplicate (sharded padding)
    batch = data[idx]
    assert np.array_equal(batch["x"].numpy(), big.X[idx].toarray().astype(np.float32))
    assert np.array_equal(batch["index"].numpy(), idx)
    ref = CountBatches(big.X, cov)[idx]
    assert torch.equal(batch["log_x_factorial"], ref["log_x_factorial"])


def test_training_on_mmap_matches_in_memory(tmp_path, big, small_chunks):
    write_mmap_csr(tmp_path / "m", big.X)
    mm = anndata.AnnData(X=open_mmap_csr(tmp_path / "m"), obs=big.obs.copy(), var=big.var.copy())
    kw = {"max_epochs": 2, "batch_size": 256, "progress_bar": False, "seed": 3}
    models = []
    for adata in (big, mm):
        torch.manual_seed(0)
        model = regvi.RegVI(adata, library_key="library", n_latent=4, n_hidden=32)
        model.train(**kw)
        models.append(model)
    ref, new = models
    assert is_mmap_backed(new._X)
    cols = [c for c in ref.history.columns if c != "epoch_time_s"]
    np.testing.assert_allclose(
        new.history[cols].to_numpy(float), ref.history[cols].to_numpy(float), rtol=1e-5
    )
    z_ref, z_new = ref.get_latent_representation(), new.get_latent_representation()
    np.testing.assert_allclose(z_new, z_ref, rtol=1e-5, atol=1e-6)
    # requested order is kept (streamed in sorted-slice batches)
    perm = np.random.default_rng(1).permutation(big.n_obs)[:2500]
    z_perm = new.get_latent_representation(indices=perm, batch_size=333)
    np.testing.assert_allclose(z_perm, z_new[perm], rtol=1e-5, atol=1e-6)


def test_simulate_to_mmap_one_chunk_equals_simulate(tmp_path):
    kw = {"n_cells": 600, "n_genes": 40, "n_technologies": 2, "seed": 7}
    ref = simulate(**kw)
    adata = simulate_to_mmap(tmp_path / "s", chunk_cells=600, **kw)
    assert is_mmap_backed(adata.X) and adata.X.dtype == np.int32
    assert (adata.X != ref.X).nnz == 0
    assert adata.obs.equals(ref.obs) and list(adata.var_names) == list(ref.var_names)
    for k, v in ref.uns["truth"].items():
        assert np.array_equal(adata.uns["truth"][k], v), k
    again = open_mmap_anndata(tmp_path / "s")
    assert again.obs.equals(ref.obs) and list(again.var_names) == list(ref.var_names)
    assert (again.X != ref.X).nnz == 0
    for k, v in ref.uns["truth"].items():
        assert np.array_equal(again.uns["truth"][k], v), k
    assert sorted(os.listdir(tmp_path / "s")) == [
        "data.npy",
        "indices.npy",
        "indptr.npy",
        "meta.json",
        "obs.csv",
        "truth.npz",
        "var.csv",
    ]
    _no_pickle(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["shape"] == [600, 40] and meta["dtype"] == "<i4"


def test_simulate_to_mmap_chunked(tmp_path):
    kw = {"n_cells": 2500, "n_genes": 50, "seed": 2}
    adata = simulate_to_mmap(tmp_path / "s", chunk_cells=700, **kw)
    ref = simulate(**kw)
    assert adata.shape == (2500, 50) and is_mmap_backed(adata.X)
    assert set(adata.obs.columns) == {"cell_type", "library"}
    assert adata.obs["library"].nunique() == 4 and adata.obs["cell_type"].nunique() == 5
    for k in ("type_profiles", "ambient_profiles", "ambient_fraction", "library_depth", "theta"):
        assert np.array_equal(adata.uns["truth"][k], ref.uns["truth"][k]), k
    # the same model: similar depth and sparsity, different draws
    assert (adata.X != ref.X).nnz > 0
    depth, depth_ref = adata.X.sum(1).mean(), ref.X.sum(1).mean()
    assert abs(depth - depth_ref) / depth_ref < 0.05
    assert abs(adata.X.nnz - ref.X.nnz) / ref.X.nnz < 0.05
    validate_counts(adata.X)
    regvi.RegVI(adata, library_key="library")  # sets up on the memmap
    with pytest.raises(FileExistsError):
        simulate_to_mmap(tmp_path / "s", chunk_cells=700, **kw)


def test_h5ad_to_mmap_and_backed_error(tmp_path, big):
    sub = big[:1200].copy()
    sub.layers["raw"] = sub.X.copy()
    sub.X = sub.X.toarray().astype(np.float32)
    del sub.uns["truth"]
    sub.write_h5ad(tmp_path / "a.h5ad")
    backed = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    sparse = anndata.AnnData(X=sub.layers["raw"], obs=sub.obs, var=sub.var)
    sparse.write_h5ad(tmp_path / "b.h5ad")
    backed_sparse = anndata.read_h5ad(tmp_path / "b.h5ad", backed="r")
    for b in (backed, backed_sparse):
        with pytest.raises(TypeError, match="h5ad_to_mmap"):
            get_counts(b)
        with pytest.raises(TypeError, match="h5ad_to_mmap"):
            regvi.RegVI(b, library_key="library")
    for name, layer in (("a.h5ad", None), ("a.h5ad", "raw"), ("b.h5ad", None)):
        out = tmp_path / f"{name}-{layer}"
        adata = h5ad_to_mmap(tmp_path / name, out, layer=layer, chunk_rows=250)
        assert is_mmap_backed(adata.X)
        assert (adata.X != sub.layers["raw"]).nnz == 0
        assert adata.obs.equals(sub.obs) and list(adata.var_names) == list(sub.var_names)
        _no_pickle(out)
    assert open_mmap_csr(tmp_path / "a.h5ad-None").dtype == np.float32
    with pytest.raises(KeyError, match="nope"):
        h5ad_to_mmap(tmp_path / "a.h5ad", tmp_path / "x", layer="nope")
