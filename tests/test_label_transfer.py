"""Issue #16: kNN label transfer from a reference latent to query cells (regvi.map.labels)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import regvi
from regvi.map import confusion_plot, transfer_accuracy, transfer_labels, write_to_obs
from regvi.map import labels as labels_mod

KANG = Path(__file__).resolve().parents[2] / "shared/data/kang2018_muscat_ctrl.h5ad"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _clusters(centers, n, sd, rng):
    """``n`` cells around each centre with isotropic noise ``sd``; labels type0, type1, ..."""
    x = np.concatenate([c + sd * rng.normal(size=(n, len(c))) for c in centers])
    y = np.repeat([f"type{i}" for i in range(len(centers))], n)
    return x, y


@pytest.fixture
def separated():
    """Three well-separated clusters in 5-D: a reference and a query drawn from the same types."""
    rng = np.random.default_rng(0)
    centers = 10.0 * np.eye(5)[:3]
    ref, ref_y = _clusters(centers, 100, 0.5, rng)
    query, query_y = _clusters(centers, 30, 0.5, rng)
    return ref, ref_y, query, query_y


# --------------------------------------------------------------------------- behaviour
def test_separated_clusters_transfer_perfectly(separated):
    ref, ref_y, query, query_y = separated
    for weighting in ("distance", "uniform"):
        table = transfer_labels(ref, ref_y, query, weighting=weighting)
        assert list(table.columns) == ["label", "confidence", "uncertainty"]
        assert isinstance(table["label"].dtype, pd.CategoricalDtype)
        assert list(table["label"].cat.categories) == ["type0", "type1", "type2", "unknown"]
        assert table.index.equals(pd.RangeIndex(len(query)))
        assert (table["label"].astype(str).to_numpy() == query_y).all()
        np.testing.assert_allclose(table["confidence"], 1.0)
        np.testing.assert_allclose(table["uncertainty"], 1.0 - table["confidence"])
        acc = transfer_accuracy(query_y, table["label"])
        assert acc["accuracy"] == 1.0
        assert acc["macro_f1"] == 1.0
        assert acc["fraction_unknown"] == 0.0


def test_prefix_query_index_and_label_types(separated):
    ref, ref_y, query, _ = separated
    names = pd.Index([f"q{i}" for i in range(len(query))])
    as_series = pd.Series(ref_y, index=[f"r{i}" for i in range(len(ref))])
    cat = pd.Categorical(ref_y, categories=["type2", "type1", "type0", "never_seen"])
    tables = [
        transfer_labels(ref, labs, query, prefix="pred_", query_index=names)
        for labs in (ref_y, list(ref_y), as_series, cat, pd.Series(cat))
    ]
    for table in tables:
        assert list(table.columns) == ["pred_label", "pred_confidence", "pred_uncertainty"]
        assert table.index.equals(names)
        assert (table["pred_label"].astype(str) == tables[0]["pred_label"].astype(str)).all()
    # categorical reference labels keep their order; unused categories are dropped
    assert list(tables[3]["pred_label"].cat.categories) == ["type2", "type1", "type0", "unknown"]


def test_novel_query_cluster_is_mostly_unknown():
    """A query type absent from the reference, lying between reference types, is called unknown.

    The confidence is the neighbours' vote share: it flags cells whose neighbours disagree. A novel
    cluster that sits next to a single reference type is (confidently) given that type's label.
    """
    rng = np.random.default_rng(1)
    centers = 5.0 * np.eye(10)[:6]  # 6 reference types, pairwise equidistant
    ref, ref_y = _clusters(centers, 200, 0.5, rng)
    known, known_y = _clusters(centers, 20, 0.5, rng)
    novel = centers.mean(axis=0) + 0.1 * rng.normal(size=(100, 10))  # equidistant from all
    query = np.concatenate([known, novel])
    table = transfer_labels(ref, ref_y, query, n_neighbors=15, threshold=0.5)
    pred = table["label"].astype(str).to_numpy()
    is_novel = np.arange(len(query)) >= len(known)
    assert (pred[is_novel] == "unknown").mean() > 0.75  # measured 0.85
    assert (pred[~is_novel] == known_y).mean() == 1.0
    # threshold 0 never calls unknown; threshold 1 calls unknown unless all neighbours agree
    assert (transfer_labels(ref, ref_y, query, threshold=0.0)["label"] != "unknown").all()
    strict = transfer_labels(ref, ref_y, query, threshold=1.0)
    assert ((strict["label"] == "unknown") == (strict["confidence"] < 1.0)).all()


def test_distance_weighting_differs_from_uniform_where_it_must():
    # 1-D: the query at 0 sits on 5 close "A" cells; 10 "B" cells are far away. With 15
    # neighbours, uniform voting says B (10/15), inverse-distance voting says A.
    ref = np.concatenate([0.1 + 0.01 * np.arange(5), 5.0 + 0.01 * np.arange(10)])[:, None]
    ref_y = ["A"] * 5 + ["B"] * 10
    query = np.zeros((1, 1))
    uni = transfer_labels(ref, ref_y, query, n_neighbors=15, weighting="uniform")
    dist = transfer_labels(ref, ref_y, query, n_neighbors=15, weighting="distance")
    assert uni["label"].iloc[0] == "B"
    assert uni["confidence"].iloc[0] == pytest.approx(10 / 15)
    assert dist["label"].iloc[0] == "A"
    w_a = (1.0 / ref[:5, 0]).sum()
    w_b = (1.0 / ref[5:, 0]).sum()
    assert dist["confidence"].iloc[0] == pytest.approx(w_a / (w_a + w_b))
    # a query exactly on a reference cell: the zero-distance neighbour takes all the weight
    exact = transfer_labels(ref, ref_y, np.array([[5.0]]), n_neighbors=15, threshold=0.9)
    assert exact["label"].iloc[0] == "B"
    assert exact["confidence"].iloc[0] == 1.0


def test_missing_reference_labels_do_not_vote():
    # 10 unlabelled cells right at the query, 5 "B" cells far away: only B can vote
    ref = np.concatenate([np.zeros(10), 10.0 + np.arange(5)])[:, None]
    for missing in (np.nan, None, pd.NA):
        ref_y = pd.Series([missing] * 10 + ["B"] * 5, dtype=object)
        table = transfer_labels(ref, ref_y, np.zeros((3, 1)), n_neighbors=5)
        assert (table["label"] == "B").all()
        assert (table["confidence"] == 1.0).all()
        assert list(table["label"].cat.categories) == ["B", "unknown"]
    cat = pd.Categorical([np.nan] * 10 + ["B"] * 5)
    assert (transfer_labels(ref, cat, np.zeros((1, 1)), n_neighbors=5)["label"] == "B").all()
    # only the 5 labelled cells count towards n_neighbors
    with pytest.raises(ValueError, match="n_neighbors"):
        transfer_labels(ref, ref_y, np.zeros((1, 1)), n_neighbors=6)


def test_deterministic_and_chunk_independent(separated):
    ref, ref_y, query, _ = separated
    rng = np.random.default_rng(3)
    noisy = query + 4.0 * rng.normal(size=query.shape)  # ambiguous cells, ties included
    first = transfer_labels(ref, ref_y, noisy, n_neighbors=10)
    again = transfer_labels(ref, ref_y, noisy, n_neighbors=10)
    chunked = transfer_labels(ref, ref_y, noisy, n_neighbors=10, chunk_size=7)
    pd.testing.assert_frame_equal(first, again)
    pd.testing.assert_frame_equal(first, chunked)
    # float32 latents give the same calls
    f32 = transfer_labels(ref.astype(np.float32), ref_y, noisy.astype(np.float32), n_neighbors=10)
    assert (f32["label"] == first["label"]).mean() > 0.98


def test_exported_from_package():
    assert regvi.transfer_labels is transfer_labels


def test_module_imports_no_torch():
    """labels.py itself needs only numpy/pandas/sklearn/matplotlib (and no torch-heavy regvi)."""
    tree = ast.parse(Path(labels_mod.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    stdlib = {"__future__", "collections", "math", "numbers", "pathlib", "re", "typing"}
    assert roots - stdlib <= {"numpy", "pandas", "sklearn", "matplotlib"}


# --------------------------------------------------------------------------- bad input
def _good():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 3))
    return {
        "reference_latent": ref,
        "reference_labels": np.array(["a", "b"] * 10, dtype=object),
        "query_latent": rng.normal(size=(5, 3)),
    }


def _with(**changes):
    kwargs = _good()
    kwargs.update(changes)
    return kwargs


def _nan_at(x, value):
    x = x.copy()
    x[1, 2] = value
    return x


_G = _good()
BAD_INPUTS = {
    "dims mismatch": (_with(query_latent=np.zeros((5, 4))), "query_latent"),
    "labels too short": (_with(reference_labels=["a"] * 19), "reference_labels"),
    "labels too long": (_with(reference_labels=["a"] * 21), "reference_labels"),
    "labels 2-D": (_with(reference_labels=np.array([["a"] * 2] * 10)), "reference_labels"),
    "all labels missing": (_with(reference_labels=[np.nan] * 20), "reference_labels"),
    "n_neighbors 0": (_with(n_neighbors=0), "n_neighbors"),
    "n_neighbors > labelled": (_with(n_neighbors=21), "n_neighbors"),
    "n_neighbors > labelled (NaN)": (
        _with(reference_labels=["a", np.nan] * 10, n_neighbors=11),
        "n_neighbors",
    ),
    "n_neighbors float": (_with(n_neighbors=2.5), "n_neighbors"),
    "threshold < 0": (_with(threshold=-0.1), "threshold"),
    "threshold > 1": (_with(threshold=1.5), "threshold"),
    "threshold NaN": (_with(threshold=float("nan")), "threshold"),
    "NaN in reference": (
        _with(reference_latent=_nan_at(_G["reference_latent"], np.nan)),
        "reference_latent",
    ),
    "inf in reference": (
        _with(reference_latent=_nan_at(_G["reference_latent"], np.inf)),
        "reference_latent",
    ),
    "NaN in query": (_with(query_latent=_nan_at(_G["query_latent"], np.nan)), "query_latent"),
    "-inf in query": (_with(query_latent=_nan_at(_G["query_latent"], -np.inf)), "query_latent"),
    "empty reference": (
        _with(reference_latent=np.zeros((0, 3)), reference_labels=[]),
        "reference_latent",
    ),
    "empty query": (_with(query_latent=np.zeros((0, 3))), "query_latent"),
    "zero-width latent": (
        _with(reference_latent=np.zeros((20, 0)), query_latent=np.zeros((5, 0))),
        "reference_latent",
    ),
    "1-D reference": (_with(reference_latent=np.zeros(20)), "reference_latent"),
    "string latent": (_with(query_latent=np.full((5, 3), "x")), "query_latent"),
    "unknown weighting": (_with(weighting="gaussian"), "weighting"),
    "unknown_label clash": (_with(unknown_label="a"), "unknown_label"),
    "query_index length": (_with(query_index=["q"] * 4), "query_index"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_before_any_work(case, monkeypatch):
    kwargs, name = BAD_INPUTS[case]

    class NoSearch:
        def __init__(self, *args, **kwargs):
            raise AssertionError("kNN search started before the input was validated")

    monkeypatch.setattr(labels_mod, "NearestNeighbors", NoSearch)
    with pytest.raises(ValueError, match=name):
        transfer_labels(**kwargs)


def test_good_input_passes_validation():
    table = transfer_labels(**_with(n_neighbors=20, threshold=1.0))
    assert len(table) == 5


# --------------------------------------------------------------------------- write_to_obs
def test_write_to_obs_aligns_by_obs_names(separated):
    ref, ref_y, query, query_y = separated
    names = [f"cell{i}" for i in range(len(query))]
    table = transfer_labels(ref, ref_y, query, query_index=names, prefix="p_")
    perm = np.random.default_rng(0).permutation(len(query))
    adata = ad.AnnData(
        X=np.zeros((len(query), 2), dtype=np.float32),
        obs=pd.DataFrame({"truth": query_y[perm]}, index=np.asarray(names)[perm]),
    )
    write_to_obs(adata, table.iloc[::-1], key="ct", prefix="p_")  # row order does not matter
    assert isinstance(adata.obs["ct_transferred"].dtype, pd.CategoricalDtype)
    assert (adata.obs["ct_transferred"].astype(str) == adata.obs["truth"]).all()
    np.testing.assert_allclose(
        adata.obs["ct_confidence"].to_numpy(), table.loc[adata.obs_names, "p_confidence"]
    )
    assert "ct_uncertainty" not in adata.obs


def test_write_to_obs_rejects_mismatched_index(separated):
    ref, ref_y, query, _ = separated
    names = [f"cell{i}" for i in range(len(query))]
    adata = ad.AnnData(X=np.zeros((len(query), 2), dtype=np.float32), obs=pd.DataFrame(index=names))
    no_index = transfer_labels(ref, ref_y, query)
    with pytest.raises(ValueError, match="query_index"):  # hint for the default 0..n-1 index
        write_to_obs(adata, no_index)
    table = transfer_labels(ref, ref_y, query, query_index=names)
    with pytest.raises(ValueError, match="table: index does not match"):
        write_to_obs(adata, table.iloc[:-1])
    with pytest.raises(ValueError, match="table: index does not match"):
        write_to_obs(adata, table.rename(index={"cell0": "other"}))
    with pytest.raises(ValueError, match="table: index has duplicate"):
        write_to_obs(adata, table.rename(index={"cell0": "cell1"}))
    with pytest.raises(ValueError, match="table: expected columns"):
        write_to_obs(adata, table, prefix="p_")
    assert "cell_type_transferred" not in adata.obs  # nothing written on error
    write_to_obs(adata, table)
    assert "cell_type_transferred" in adata.obs


# --------------------------------------------------------------------------- evaluation
def test_transfer_accuracy_hand_computed():
    true = pd.Series(["A", "A", "B", "B", "C", np.nan])
    pred = pd.Series(["A", "B", "B", "unknown", "C", "A"])
    res = transfer_accuracy(true, pred)
    # 5 scored cells (the NaN truth is skipped): 3 right, 1 wrong call, 1 unknown
    assert res["n_cells"] == 5
    assert res["n_called"] == 4
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["accuracy_called"] == pytest.approx(3 / 4)
    assert res["fraction_unknown"] == pytest.approx(1 / 5)
    # F1: A (P=1, R=1/2) 2/3; B (P=1/2, R=1/2) 1/2; C 1; "unknown" is not a class
    assert res["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # no call at all: accuracy_called is NaN
    none_called = transfer_accuracy(["A", "B"], ["unknown", "unknown"])
    assert none_called["accuracy"] == 0.0
    assert math.isnan(none_called["accuracy_called"])
    assert none_called["fraction_unknown"] == 1.0
    # Series are aligned by index
    shuffled = pred.iloc[[5, 4, 3, 2, 1, 0]]
    assert transfer_accuracy(true, shuffled) == res
    with pytest.raises(ValueError, match="predicted"):
        transfer_accuracy(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="true_labels"):
        transfer_accuracy([np.nan, np.nan], ["A", "B"])


def test_confusion_plot_writes_png(tmp_path, separated):
    rng = np.random.default_rng(0)
    names = [f"type {i}" for i in range(20)]
    true = rng.choice(names, 2000)
    pred = true.copy()
    flip = rng.random(2000) < 0.2
    pred[flip] = rng.choice([*names, "unknown", "extra"], flip.sum())
    out = confusion_plot(pd.Categorical(true, categories=names), pred, tmp_path / "sub" / "cm.png")
    assert out == tmp_path / "sub" / "cm.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 500 and img.shape[1] > 500


# --------------------------------------------------------------------------- real data
@pytest.mark.skipif(not KANG.exists(), reason=f"{KANG} not present")
def test_kang_transfer_across_donors(tmp_path):
    """Kang 2018 ctrl PBMC (4 author cell types): PCA latent of reference donors, new donors mapped."""
    import scanpy as sc
    from sklearn.decomposition import PCA

    adata = ad.read_h5ad(KANG)
    donors = sorted(adata.obs["donor"].astype(str).unique())
    is_ref = adata.obs["donor"].astype(str).isin(donors[::2]).to_numpy()  # 3 ref, 2 query donors
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    ref, query = adata[is_ref].copy(), adata[~is_ref].copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=2000)
    hvg = ref.var["highly_variable"].to_numpy()
    pca = PCA(n_components=30, svd_solver="arpack", random_state=0)
    ref_latent = pca.fit_transform(ref.X[:, hvg].toarray())  # the query is projected, not refit
    query_latent = pca.transform(query.X[:, hvg].toarray())

    table = transfer_labels(
        ref_latent, ref.obs["cell_type"], query_latent, query_index=query.obs_names
    )
    write_to_obs(query, table)
    res = transfer_accuracy(query.obs["cell_type"], query.obs["cell_type_transferred"])
    # measured: macro-F1 0.991, accuracy 0.992, 0.07% unknown (2,913 query cells)
    assert res["macro_f1"] > 0.96
    assert res["accuracy"] > 0.96
    assert res["fraction_unknown"] < 0.02
    out = confusion_plot(
        query.obs["cell_type"], query.obs["cell_type_transferred"], tmp_path / "k.png"
    )
    assert out.read_bytes()[:8] == PNG_SIGNATURE
