"""evaluation/: shared kNN, subsample, reference PCA, scib wrapper, low-count robustness, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import regvi
from evaluation.__main__ import main as cli
from evaluation.knn import compute_neighbours
from evaluation.reference import dataset_fingerprint, unintegrated_pca
from evaluation.robustness import binomial_thin, low_count_robustness
from evaluation.scib import compare_runs
from evaluation.subsample import stratified_subsample


@pytest.fixture(scope="module")
def small():
    a = regvi.simulate(n_cells=500, n_genes=80, n_cell_types=4, n_libraries=3, seed=4)
    a.obsm["X_pca"] = unintegrated_pca(a.X, n_comps=10)
    return a


def test_exact_knn_matches_brute_force():
    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    nb = compute_neighbours(X, k=10, method="exact")
    d = np.linalg.norm(X[:, None] - X[None], axis=2)
    expected = np.argsort(d, axis=1, kind="stable")[:, :10]
    assert (nb.indices[:, 0] == np.arange(300)).all()
    np.testing.assert_allclose(nb.distances, np.take_along_axis(d, expected, 1), atol=1e-4)
    assert nb.subset(5).indices.shape == (300, 5)
    sc = nb.to_scib(5)
    assert sc.indices.shape == (300, 5)
    conn = nb.connectivities(10)
    assert abs(conn - conn.T).max() < 1e-6 and conn.diagonal().max() == 0


@pytest.mark.parametrize(("n", "dim", "k"), [(400, 5, 15), (1500, 10, 50), (800, 3, 90)])
def test_numpy_fuzzy_connectivities_equal_umaps(n, dim, k):
    from umap.umap_ import fuzzy_simplicial_set

    X = np.random.default_rng(k).normal(size=(n, dim)).astype(np.float32)
    X[10:25] = X[10]  # duplicates: zero distances beyond self
    nb = compute_neighbours(X, k=k)
    ours = nb.connectivities(k)
    ref = fuzzy_simplicial_set(
        sp.coo_matrix((n, 1)),
        n_neighbors=k,
        random_state=None,
        metric=None,
        knn_indices=nb.indices,
        knn_dists=nb.distances,
        set_op_mix_ratio=1.0,
        local_connectivity=1.0,
    )[0].tocsr()
    ref.setdiag(0)
    ref.eliminate_zeros()
    assert ours.nnz == ref.nnz
    assert abs(ours - ref).max() < 1e-6  # float32 rounding only
    # scib-metrics gets the same graph (precomputed, not umap's numba code)
    sc = nb.to_scib(k)
    assert abs(sc.knn_graph_connectivities - ref).max() < 1e-6
    # and so do the subsets its Benchmarker takes for the 15/50-neighbour metrics
    k2 = max(2, k // 3)
    sub = nb.to_scib(k).subset_neighbors(k2)
    assert type(sub) is type(sc)
    ref2 = fuzzy_simplicial_set(
        sp.coo_matrix((n, 1)),
        n_neighbors=k2,
        random_state=None,
        metric=None,
        knn_indices=nb.indices[:, :k2],
        knn_dists=nb.distances[:, :k2],
        set_op_mix_ratio=1.0,
        local_connectivity=1.0,
    )[0].tocsr()
    ref2.setdiag(0)
    ref2.eliminate_zeros()
    assert abs(sub.knn_graph_connectivities - ref2).max() < 1e-6


def test_exact_diffusion_neighbours_match_pynndescent_on_small_labels(small):
    """kBET's diffusion-map neighbours by exact search give the same kBET as pynndescent."""
    from scib_metrics.metrics import kbet_per_label
    from scib_metrics.utils import _diffusion_nn

    from evaluation.scib import _exact_diffusion_neighbours

    labels = small.obs["cell_type"].to_numpy()
    batches = small.obs["library"].to_numpy()
    sc = compute_neighbours(small.obsm["X_pca"], k=50).to_scib(50)
    original = _diffusion_nn.nearest_neighbors
    with _exact_diffusion_neighbours():
        assert _diffusion_nn.nearest_neighbors is not original
        exact = kbet_per_label(sc, batches, labels)
    assert _diffusion_nn.nearest_neighbors is original  # restored
    approx = kbet_per_label(sc, batches, labels)
    assert exact == pytest.approx(approx, abs=0.02)


def test_knn_handles_duplicates_and_bad_input():
    X = np.zeros((20, 3), dtype=np.float32)  # all duplicates
    nb = compute_neighbours(X, k=5)
    assert (nb.indices[:, 0] == np.arange(20)).all()
    with pytest.raises(ValueError, match="NaN"):
        compute_neighbours(np.full((5, 2), np.nan))


def test_stratified_subsample_is_fixed_and_proportional(small):
    idx = stratified_subsample(small.obs, ["cell_type", "library"], n=200, seed=0)
    assert len(idx) == 200 and np.array_equal(idx, np.sort(idx))
    assert np.array_equal(idx, stratified_subsample(small.obs, ["cell_type", "library"], 200, 0))
    full = small.obs.groupby(["cell_type", "library"], observed=True).size() / small.n_obs
    sub = small.obs.iloc[idx].groupby(["cell_type", "library"], observed=True).size() / 200
    assert (full - sub).abs().max() < 0.01
    assert len(stratified_subsample(small.obs, ["cell_type"], None)) == small.n_obs
    with pytest.raises(KeyError, match="nope"):
        stratified_subsample(small.obs, ["nope"], 10)


def test_reference_pca_cached(small, tmp_path):
    a = unintegrated_pca(small.X, n_comps=10, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and dataset_fingerprint(small.X) in files[0].name
    b = unintegrated_pca(small.X, n_comps=10, cache_dir=tmp_path)
    assert np.array_equal(a, b)
    assert dataset_fingerprint(small.X) != dataset_fingerprint(small.X[:-1])


def test_binomial_thinning():
    X = sp.csr_matrix(np.random.default_rng(0).poisson(20, size=(200, 50)))
    T = binomial_thin(X, 0.25, seed=1)
    assert (T.toarray() <= X.toarray()).all()
    assert T.sum() / X.sum() == pytest.approx(0.25, rel=0.03)
    with pytest.raises(ValueError, match="q=0"):
        binomial_thin(X, 0)


def test_low_count_robustness_bounds(small):
    emb = small.obsm["X_pca"]
    labels = small.obs["cell_type"].to_numpy()
    perfect = low_count_robustness(lambda X: emb, small.X, emb, labels, qs=(0.5,))
    assert perfect["lowcount_q0.5_knn_preservation"] == 1.0
    assert perfect["lowcount_q0.5_displacement"] == 0.0
    assert perfect["lowcount_q0.5_label_majority"] == 1.0
    rng = np.random.default_rng(0)
    noise = low_count_robustness(
        lambda X: rng.normal(size=emb.shape), small.X, emb, labels, qs=(0.5,)
    )
    assert noise["lowcount_q0.5_knn_preservation"] < 0.2
    assert noise["lowcount_q0.5_displacement"] > 0.5


def test_compare_runs_scaling():
    runs = {
        "a": {"scib_silhouette_label": 0.5, "scib_bras": 0.2},
        "b": {"scib_silhouette_label": 0.7, "scib_bras": 0.1},
    }
    raw = compare_runs(runs, min_max_scale=False)
    assert raw.loc["a", "total"] == pytest.approx(0.6 * 0.5 + 0.4 * 0.2)
    scaled = compare_runs(runs, min_max_scale=True)
    assert scaled.loc["b", "silhouette_label"] == 1.0 and scaled.loc["b", "bras"] == 0.0
    assert scaled.attrs["scaling"] == "min-max across runs"


@pytest.mark.slow
def test_scib_metrics_real_and_unscaled(small):
    from evaluation.scib import scib_metrics

    labels = small.obs["cell_type"].to_numpy()
    onehot = pd.get_dummies(labels).to_numpy(float)
    good = onehot * 5 + np.random.default_rng(0).normal(0, 0.3, onehot.shape)
    res = scib_metrics(good, labels, small.obs["library"].to_numpy(), small.obsm["X_pca"])
    assert 0.0 <= res["scib_total"] <= 1.0
    assert res["scib_total"] == pytest.approx(0.6 * res["scib_bio"] + 0.4 * res["scib_batch"])
    assert res["scib_silhouette_label"] > 0.7


def test_cli_bad_inputs(tmp_path, small, capsys):
    assert (
        cli([str(tmp_path / "missing.h5ad"), "--embedding", "X", "--library-key", "library"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "trunc.h5ad").write_bytes(b"\x89HDF\r\n")
    assert cli([str(tmp_path / "trunc.h5ad"), "--embedding", "X", "--library-key", "library"]) == 2
    assert "cannot read" in capsys.readouterr().err
    small.write_h5ad(tmp_path / "d.h5ad")
    assert cli([str(tmp_path / "d.h5ad"), "--embedding", "X_nope", "--library-key", "library"]) == 2
    assert "X_nope" in capsys.readouterr().err
    assert cli([str(tmp_path / "d.h5ad"), "--embedding", "X_pca", "--library-key", "lane"]) == 2
    assert "lane" in capsys.readouterr().err
    assert not (tmp_path / "evaluation_results").exists()


def test_cli_scores_embeddings(tmp_path, small):
    small.write_h5ad(tmp_path / "d.h5ad")
    out = tmp_path / "out"
    rc = cli(
        [
            str(tmp_path / "d.h5ad"),
            "--embedding",
            "X_pca",
            "--library-key",
            "library",
            "--label-key",
            "cell_type",
            "--no-scib",
            "--no-umap",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    m = json.loads((out / "X_pca" / "metrics.json").read_text())["metrics"]
    assert m["eval_n_cells"] == 500
    assert any(k.startswith("nc_") for k in m)
    assert (out / "X_pca" / "per_cell.csv").is_file()
    assert (out / "X_pca" / "neighbourhood_correlation.png").is_file()


def test_evaluate_with_low_count_robustness_of_a_model(trained, tmp_path):
    from evaluation.evaluate import evaluate, write_outputs

    adata = trained.adata.copy()
    adata.obsm["X_regvi"] = trained.get_latent_representation(adata)

    def encode(X, idx):
        thinned = adata[idx].copy()
        thinned.X = X
        return trained.get_latent_representation(thinned)

    ev = evaluate(
        adata, "X_regvi", "library", "cell_type", scib=False, encode=encode, n_subsample=200
    )
    m = ev.metrics
    for q in ("0.5", "0.25", "0.1"):
        assert 0 <= m[f"lowcount_q{q}_knn_preservation"] <= 1
        assert m[f"lowcount_q{q}_displacement"] > 0
    # thinner cells move further from their deep originals
    assert m["lowcount_q0.1_displacement"] > m["lowcount_q0.5_displacement"]
    assert m["lowcount_q0.1_median_umis"] < m["lowcount_q0.5_median_umis"]
    paths = write_outputs(ev, adata.obs, tmp_path / "out", ["cell_type", "library"], umap=False)
    assert paths["metrics_json"].is_file() and paths["per_cell"].is_file()


@pytest.mark.integration
def test_kmeans_starts_are_scib_metrics_own_fits():
    """``kmeans_nmi_ari`` at seed 0 is exactly scib-metrics' ``nmi_ari_cluster_labels_kmeans``
    (the Benchmarker's single start), and every start gives the clusters of one
    ``KMeans(seed=s)`` fit (which runs all 300 Lloyd iterations; ours stop at the fixed point)."""
    from scib_metrics import nmi_ari_cluster_labels_kmeans
    from scib_metrics.utils import KMeans
    from sklearn.metrics import adjusted_rand_score

    from evaluation.scib import _kmeans_labels, kmeans_nmi_ari

    emb, labels, _, _ = _unequal_types()
    theirs = nmi_ari_cluster_labels_kmeans(emb.copy(), labels)
    before = emb.copy()
    batched = kmeans_nmi_ari(emb, labels, range(4))
    np.testing.assert_array_equal(emb, before)  # the caller's embedding is left as it was
    assert batched[0] == (theirs["nmi"], theirs["ari"])
    assert kmeans_nmi_ari(emb, labels, 0) == [batched[0]]
    for seed in (1, 3):
        one = KMeans(4, seed=seed).fit(emb.copy()).labels_
        assert batched[seed][1] == adjusted_rand_score(labels, np.asarray(one))
    # and the cluster labels themselves, on a harder case (many clusters, 20 dimensions)
    rng = np.random.default_rng(1)
    many = rng.normal(0, 1, (600, 20)).astype(np.float32)
    many[:, :3] += 2.0 * rng.integers(0, 3, (600, 3))
    for seed in (0, 2):
        theirs = np.asarray(KMeans(9, seed=seed).fit(many.copy()).labels_)
        np.testing.assert_array_equal(_kmeans_labels(many, 9, seed), theirs)


def _unequal_types(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Four unequal types (52 / 30 / 12 / 6 %), the big one made of two sub-clusters: one
    KMeans start splits it, another finds the types, as on Kang PBMC's CD4 T cells."""
    rng = np.random.default_rng(seed)
    sizes = [260, 150, 60, 30]
    centres = np.array([[0, 0], [6, 0], [0, 6], [6, 6]], dtype=float)
    parts, labels = [], []
    for t, (n, c) in enumerate(zip(sizes, centres, strict=True)):
        x = rng.normal(0, 0.6, (n, 2)) + c
        if t == 0:
            x[: n // 2, 0] -= 1.6  # two sub-clusters inside the big type
            x[n // 2 :, 0] += 1.6
        parts.append(x)
        labels += [f"t{t}"] * n
    emb = np.vstack(parts).astype(np.float32)
    batch = np.array(["a", "b"] * (len(labels) // 2))
    reference = emb + rng.normal(0, 0.1, emb.shape).astype(np.float32)
    return emb, np.array(labels), batch, reference


@pytest.mark.slow
def test_stable_scib_aggregates_average_the_kmeans_starts():
    """``scib_total_stable`` = Total with KMeans NMI / ARI averaged over starts 0..n-1."""
    from evaluation.scib import kmeans_nmi_ari, scib_metrics

    emb, labels, batch, reference = _unequal_types()
    res = scib_metrics(emb, labels, batch, reference, kmeans_starts=6)
    starts = kmeans_nmi_ari(emb, labels, range(6))
    assert starts[0] == (
        res["scib_nmi_ari_cluster_labels_kmeans_nmi"],
        res["scib_nmi_ari_cluster_labels_kmeans_ari"],
    )
    assert res["scib_kmeans_nmi_mean"] == pytest.approx(np.mean([s[0] for s in starts]))
    assert res["scib_kmeans_ari_mean"] == pytest.approx(np.mean([s[1] for s in starts]))
    assert len({round(s[1], 6) for s in starts}) > 1  # the starts really differ here
    bio = [
        res["scib_isolated_labels"],
        res["scib_kmeans_nmi_mean"],
        res["scib_kmeans_ari_mean"],
        res["scib_silhouette_label"],
        res["scib_clisi_knn"],
    ]
    assert res["scib_bio_stable"] == pytest.approx(np.mean(bio))
    assert res["scib_total_stable"] == pytest.approx(
        0.6 * res["scib_bio_stable"] + 0.4 * res["scib_batch"]
    )
    one = scib_metrics(emb, labels, batch, reference, kmeans_starts=1)
    assert one["scib_total_stable"] == pytest.approx(one["scib_total"])
    assert one["scib_total"] == pytest.approx(
        res["scib_total"]
    )  # the Benchmarker part is unchanged
    # not scib metrics of their own in the comparison table
    table = compare_runs({"r": res}, min_max_scale=False)
    assert not set(table.columns) & {"kmeans_nmi_mean", "bio_stable", "total_stable"}
    assert table.loc["r", "total"] == pytest.approx(res["scib_total"])


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "10"])
def test_bad_kmeans_starts_refused_before_work(small, bad):
    from evaluation.evaluate import evaluate

    with pytest.raises((TypeError, ValueError), match="kmeans_starts"):
        evaluate(small, "X_pca", "library", "cell_type", kmeans_starts=bad, neighbourhood=False)


def test_cli_refuses_kmeans_starts_below_one(tmp_path, small, capsys):
    small.write_h5ad(tmp_path / "d.h5ad")
    args = [str(tmp_path / "d.h5ad"), "--embedding", "X_pca", "--library-key", "library"]
    assert cli([*args, "--kmeans-starts", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--kmeans-starts 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
