"""Neighbourhood-correlation metrics (spec §2): masks, correlations, baselines, headline numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import regvi
from evaluation.evaluate import check_inputs, evaluate
from evaluation.knn import compute_neighbours
from evaluation.markers import (
    data_driven_markers,
    load_marker_csv,
    marker_indices,
    present_marker_genes,
)
from evaluation.nc_baselines import (
    ISOLATION_TOLERANCE,
    degree_matched_random_graph,
    expected_isolation,
    histogram_overlap,
    isolation_norm,
    isolation_ratio,
)
from evaluation.nc_correlation import neighbour_mean_correlation, rowwise_pearson
from evaluation.nc_masks import cell_groups, edge_list, edge_masks, mask_populations
from evaluation.nc_summary import (
    FAILURE_MODES,
    composite_scores,
    failure_modes,
    weighted_nanmean,
)
from evaluation.neighbourhood import HEADLINE_KEYS, neighbourhood_metrics
from evaluation.plots import category_labels
from regvi.datasets import immune_markers_path

CURATED = immune_markers_path()  # the bundled curated list


@pytest.fixture(scope="module")
def sim_graph():
    """600 simulated cells, a good embedding (one-hot type + noise) and its kNN connectivities."""
    adata = regvi.simulate(
        n_cells=600, n_genes=100, n_cell_types=4, n_libraries=3, n_technologies=2, seed=0
    )
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    emb = 4.0 * np.eye(4)[codes] + rng.normal(size=(adata.n_obs, 4))
    conn = compute_neighbours(emb, k=51).connectivities(50)
    library = adata.obs["library"].astype(str).to_numpy()
    dataset = np.where(np.isin(library, ["lib_0", "lib_1"]), "ds_a", "ds_b")
    tech = adata.obs["technology"].astype(object).to_numpy()
    tech[::17] = None  # some missing technical values
    return adata, conn, library, dataset, {"technology": tech}


def _tiny():
    """5 cells × 4 markers (+1 non-marker gene), 2 libraries, a hand-built weighted graph."""
    counts = np.array(
        [
            [5, 1, 0, 2, 2],
            [4, 2, 1, 1, 0],
            [0, 3, 6, 1, 5],
            [1, 0, 5, 2, 1],
            [3, 3, 1, 0, 4],
        ],
        dtype=float,
    )
    W = np.zeros((5, 5))
    for i, j, w in [(0, 1, 0.9), (0, 2, 0.2), (0, 4, 0.5), (1, 3, 0.4), (2, 3, 1.0), (3, 4, 0.3)]:
        W[i, j] = W[j, i] = w
    library = np.array(["a", "a", "b", "b", "b"])
    return counts, sp.csr_matrix(W), np.arange(4), library


def test_masks_partition_the_graph(sim_graph):
    adata, conn, library, dataset, technical = sim_graph
    edges = edge_list(conn)
    groups = cell_groups(library, dataset, technical)
    pops = mask_populations(groups)
    m = edge_masks(groups, edges, list(pops))
    assert not (m["same_library"] & m["between_libraries"]).any()
    assert (m["same_library"] | m["between_libraries"]).all()
    assert not (m["cross_library"] & m["cross_dataset"]).any()
    assert np.array_equal(m["cross_library"] | m["cross_dataset"], m["between_libraries"])
    tech = technical["technology"]
    touches_missing = pd.isna(tech[edges.rows]) | pd.isna(tech[edges.cols])
    assert not (m["within_technology"] & m["between_technology"]).any()
    assert np.array_equal(m["within_technology"] | m["between_technology"], ~touches_missing)
    assert np.array_equal(m["cross_technical"], m["between_technology"])
    # the per-cell counts add up the same way
    res = neighbourhood_metrics(
        adata.X, conn, np.arange(100), library, dataset, technical, n_random_repeats=0
    )
    pc = res.per_cell
    assert np.array_equal(pc["n_same_library"] + pc["n_between_libraries"], pc["n_neighbours"])
    assert np.array_equal(pc["n_cross_library"] + pc["n_cross_dataset"], pc["n_between_libraries"])


def test_mask_sums_match_direct_computation(sim_graph):
    """Masks derived as parent − sibling give the same corr_avg as a direct sparse product."""
    adata, conn, library, dataset, technical = sim_graph
    res = neighbourhood_metrics(
        adata.X, conn, np.arange(100), library, dataset, technical, n_random_repeats=0
    )
    edges = edge_list(conn)
    groups = cell_groups(library, dataset, technical)
    profiles = np.asarray(adata.X.todense(), float)
    profiles = profiles / profiles.sum(1, keepdims=True)
    for mask, em in edge_masks(groups, edges, list(res.masks)).items():
        direct = neighbour_mean_correlation(
            profiles, edges.rows[em], edges.cols[em], edges.weights[em]
        )
        np.testing.assert_allclose(res.per_cell[f"corr_avg_{mask}"], direct, atol=1e-10)


def test_per_cell_correlations_equal_corrcoef():
    counts, conn, markers, library = _tiny()
    res = neighbourhood_metrics(counts, conn, markers, library, n_random_repeats=0)
    prof = counts / counts.sum(1, keepdims=True)  # normalised over ALL genes, then subset
    prof = prof[:, markers]
    W = conn.toarray()
    same = library[:, None] == library[None, :]
    for mask, keep in [("same_library", same), ("between_libraries", ~same)]:
        Wm = np.where(keep, W, 0.0)
        for i in range(5):
            nb = np.flatnonzero(Wm[i])
            row = res.per_cell.iloc[i]
            assert row[f"n_{mask}"] == nb.size
            if nb.size == 0:
                assert np.isnan(row[f"corr_avg_{mask}"]) and np.isnan(row[f"r_mean_{mask}"])
                continue
            mean_profile = (Wm[i, nb, None] * prof[nb]).sum(0) / Wm[i, nb].sum()
            expected = np.corrcoef(prof[i], mean_profile)[0, 1]
            assert row[f"corr_avg_{mask}"] == pytest.approx(expected, abs=1e-12)
            r = np.array([np.corrcoef(prof[i], prof[j])[0, 1] for j in nb])
            assert row[f"r_mean_{mask}"] == pytest.approx(r.mean(), abs=1e-12)
            assert row[f"r_median_{mask}"] == pytest.approx(np.median(r), abs=1e-12)
            assert row[f"r_std_{mask}"] == pytest.approx(r.std(), abs=1e-12)
            weighted = np.average(r, weights=Wm[i, nb])
            assert row[f"r_weighted_{mask}"] == pytest.approx(weighted, abs=1e-12)
            assert row[f"frac_{mask}"] == pytest.approx(nb.size / np.count_nonzero(W[i]))
    # sparse counts give the same table
    res_sp = neighbourhood_metrics(
        sp.csr_matrix(counts), conn, markers, library, n_random_repeats=0
    )
    pd.testing.assert_frame_equal(res.per_cell, res_sp.per_cell)


def test_constant_profiles_give_nan():
    counts, conn, markers, library = _tiny()
    counts[2, :4] = 0.0  # no marker counts: constant (zero) profile
    counts[1, :4] = 2.0  # all markers equal
    res = neighbourhood_metrics(counts, conn, markers, library, n_random_repeats=0)
    pc = res.per_cell
    for cell in (1, 2):
        for col in ("corr_avg", "r_mean", "r_median", "r_weighted", "r_std"):
            for mask in ("same_library", "between_libraries"):
                assert np.isnan(pc.loc[cell, f"{col}_{mask}"])
    prof = counts[:, markers] / counts.sum(1, keepdims=True)
    # cell 3's same-library neighbours are 2 (constant, skipped) and 4
    assert pc.loc[3, "n_same_library"] == 2
    r34 = np.corrcoef(prof[3], prof[4])[0, 1]
    assert pc.loc[3, "r_mean_same_library"] == pytest.approx(r34, abs=1e-12)
    assert pc.loc[3, "r_std_same_library"] == 0.0
    # its only other-library neighbour (1) is constant, and so is cell 0's only same-library one
    assert np.isnan(pc.loc[3, "corr_avg_between_libraries"])
    assert np.isnan(pc.loc[0, "corr_avg_same_library"])
    # a constant neighbour in the weighted mean does not make it constant
    assert np.isfinite(pc.loc[0, "corr_avg_between_libraries"])
    # no longer a silent NaN: labelled, flagged per cell and counted
    assert (pc["failure_mode_library"][[1, 2]] == "no_marker_signal").all()
    assert pc["no_marker_signal"].tolist() == [False, True, True, False, False]
    assert res.headline["frac_no_marker_signal"] == pytest.approx(2 / 5)
    assert res.headline["frac_no_marker_signal_library"] == pytest.approx(2 / 5)
    x = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
    y = np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0], [1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    assert np.isnan(rowwise_pearson(x, y)).all()


def test_missing_levels_are_omitted(sim_graph):
    adata, conn, library, _, _ = sim_graph
    res = neighbourhood_metrics(adata.X, conn, np.arange(100), library, n_random_repeats=0)
    assert res.masks == ("same_library", "between_libraries")
    assert not any("cross_dataset" in c for c in res.per_cell.columns)
    assert set(HEADLINE_KEYS) <= set(res.headline)
    assert np.isnan(res.headline["H7_median_corr_cross_dataset"])
    assert np.isnan(res.headline["composite_ds"])
    # without a dataset key the library level uses between_libraries
    assert res.headline["H3_median_corr_cross_library"] == pytest.approx(
        res.headline["median_corr_avg_between_libraries"]
    )
    assert np.isfinite(res.headline["composite_total"])
    assert "failure_mode_library" in res.per_cell and "failure_mode_dataset" not in res.per_cell
    assert set(res.summaries) == {"library"}

    one = np.full(adata.n_obs, "only")
    single_tech = {"tech": np.full(adata.n_obs, "t0")}
    res1 = neighbourhood_metrics(
        adata.X, conn, np.arange(100), one, one, single_tech, n_random_repeats=1
    )
    assert res1.masks == ("same_library", "within_tech")
    h = res1.headline
    assert np.isfinite(h["H1_median_corr_same_library"])
    for key in (
        "H3_median_corr_cross_library",
        "H5_isolation_norm_cross_library",
        "H14_median_corr_cross_technical",
        "composite_batch",
        "random_H3_median_corr_cross_library",
    ):
        assert np.isnan(h[key])
    assert h["composite_total"] == pytest.approx(h["H1_median_corr_same_library"])
    assert not any(c.startswith("failure_mode_") for c in res1.per_cell.columns)


def test_random_graph_baseline_scores_lower(sim_graph):
    adata, conn, library, dataset, technical = sim_graph
    res = neighbourhood_metrics(
        adata.X, conn, np.arange(100), library, dataset, technical, n_random_repeats=2
    )
    h = res.headline
    for key in (
        "H1_median_corr_same_library",
        "H3_median_corr_cross_library",
        "H7_median_corr_cross_dataset",
        "composite_total",
    ):
        assert h[key] > h[f"random_{key}"] + 0.2, key
    assert h["frac_ideal_library"] > 0.8
    rand = degree_matched_random_graph(conn, seed=3)
    assert np.array_equal(np.diff(rand.indptr), np.diff(conn.indptr))
    rows = np.repeat(np.arange(conn.shape[0]), np.diff(conn.indptr))

    def row_sorted(data):
        return data[np.lexsort((data, rows))]

    conn_data = sp.csr_matrix(conn, dtype=np.float64).data
    assert np.array_equal(row_sorted(rand.data), row_sorted(conn_data))  # same weights per row
    assert rand.diagonal().sum() == 0
    coo = rand.tocoo()
    assert len(set(zip(coo.row, coo.col, strict=True))) == rand.nnz  # no repeated targets
    assert np.array_equal(rand.toarray(), degree_matched_random_graph(conn, seed=3).toarray())


def test_isolation_expectation_by_hand():
    # 5 cells; cell 0's population has 2 of the 4 other cells, p = 0.5, with 3 neighbours
    assert expected_isolation(np.array([2.0]), 5, np.array([3]))[0] == pytest.approx(0.125)
    assert expected_isolation(np.array([0.0, 4.0]), 5, np.array([2, 2])).tolist() == [1.0, 0.0]
    counts, conn, markers, library = _tiny()
    res = neighbourhood_metrics(counts, conn, markers, library, n_random_repeats=0)
    pc = res.per_cell
    # between_libraries: library a (2 cells) sees 3 others, library b sees 2; p = pop / 4
    p = np.array([3, 3, 2, 2, 2]) / 4
    k = np.count_nonzero(conn.toarray(), axis=1)
    np.testing.assert_allclose(pc["expected_isolated_between_libraries"], (1 - p) ** k)
    observed, _, norm = isolation_norm(pc["n_between_libraries"].to_numpy(), ((1 - p) ** k), p * 4)
    assert observed == pytest.approx(np.mean(pc["n_between_libraries"] == 0))
    assert norm == pytest.approx(observed / (np.mean((1 - p) ** k) + ISOLATION_TOLERANCE))
    assert res.headline["H5_isolation_norm_cross_library"] == pytest.approx(norm)
    assert np.isnan(isolation_norm(np.zeros(3), np.ones(3), np.zeros(3))[2])


def test_composite_renormalises_over_nan_components():
    h = {
        "H1_median_corr_same_library": 0.8,
        "H3_median_corr_cross_library": 0.6,
        "H5_isolation_norm_cross_library": 2.5,  # clipped to 2 → term −1
        "H7_median_corr_cross_dataset": np.nan,
        "H9_isolation_norm_cross_dataset": np.nan,
        "H11_overlap_cross_library": np.nan,
        "H12_overlap_cross_dataset": np.nan,
    }
    c = composite_scores(h)
    lib = (0.4 * 0.6 + 0.3 * -1.0) / 0.7
    assert c["composite_lib"] == pytest.approx(lib)
    assert np.isnan(c["composite_ds"])
    assert c["composite_batch"] == pytest.approx(lib)
    assert c["composite_total"] == pytest.approx(0.6 * 0.8 + 0.4 * lib)
    full = dict(
        h,
        **{
            "H7_median_corr_cross_dataset": 0.5,
            "H9_isolation_norm_cross_dataset": 0.5,
            "H11_overlap_cross_library": 0.9,
            "H12_overlap_cross_dataset": 0.7,
        },
    )
    c = composite_scores(full)
    assert c["composite_ds"] == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3 * 0.7)
    assert c["composite_batch"] == pytest.approx((c["composite_lib"] + c["composite_ds"]) / 2)
    assert np.isnan(weighted_nanmean([np.nan, np.nan], [1, 1]))
    assert np.isnan(composite_scores({})["composite_total"])


def test_histogram_overlap():
    x = np.linspace(-0.99, 0.99, 200)
    assert histogram_overlap(x, x) == pytest.approx(1.0)
    assert histogram_overlap(x[x < -0.1], x[x > 0.1]) == pytest.approx(0.0)
    assert np.isnan(histogram_overlap(x, np.array([np.nan])))


def test_failure_modes_rules():
    within = np.array([0.9, 0.9, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9])
    n_within = np.array([5, 5, 5, 5, 5, 5, 0, 5])
    cross = np.array([np.nan, 0.8, 0.35, 0.1, 0.9, 0.8, 0.7, np.nan])
    n_cross = np.array([0, 5, 5, 5, 5, 5, 5, 5])
    pop = np.array([10, 10, 10, 10, 10, 0, 10, 10])
    ok = np.ones(8, bool)
    modes = failure_modes(within, n_within, cross, n_cross, pop, ok, chance=0.2)
    assert [None if pd.isna(m) else m for m in modes] == [
        "orphan",
        "ideal",
        "merged",
        "false_merge",
        "noisy",
        None,
        "ideal",
        "false_merge",
    ]
    ok[[0, 1, 5]] = False  # constant marker profiles
    modes = failure_modes(within, n_within, cross, n_cross, pop, ok, chance=0.2)
    assert modes[0] == "orphan"  # judged from the graph alone
    assert modes[1] == "no_marker_signal"  # was a silent NaN
    assert pd.isna(modes[5])  # no cross population: the level does not apply


def test_summaries(sim_graph):
    adata, conn, library, dataset, technical = sim_graph
    res = neighbourhood_metrics(
        adata.X, conn, np.arange(100), library, dataset, technical, n_random_repeats=0
    )
    assert set(res.summaries) == {"library", "dataset", "technology"}
    lib = res.summaries["library"]
    assert lib["n_cells"].sum() == adata.n_obs and {"dataset", "library"} <= set(lib.columns)
    assert res.summaries["technology"]["n_cells"].sum() == pd.notna(technical["technology"]).sum()
    frac_cols = [c for c in lib.columns if c.startswith("frac_") and c.endswith("_dataset")]
    np.testing.assert_allclose(lib[frac_cols].sum(1), 1.0)
    # cells of a library alone in its dataset have no cross_library population
    alone = lib["library"] == "lib_2"
    assert lib.loc[alone, "isolated_cross_library"].isna().all()


def test_load_marker_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "gene,cell_type,lineage,category\nCD3E,T,L,x\nMS4A1,B,L,x\nCD3E,NK,L,x\nXYZ,?,?,?\nLYZ,M,M,x\n"
    )
    assert load_marker_csv(path, ["LYZ", "CD3E", "MS4A1", "GAPDH"]) == ["CD3E", "MS4A1", "LYZ"]
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,celltype\nCD3E,T\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*cell_type"):
        load_marker_csv(bad, ["CD3E"])
    if not CURATED.is_file():
        pytest.skip(f"{CURATED} not present")
    table = pd.read_csv(CURATED)
    var_names = [*table["gene"].iloc[::2], "NOT_A_GENE"]
    genes = load_marker_csv(CURATED, var_names)
    assert genes and len(genes) == len(set(genes)) and set(genes) <= set(var_names)
    assert genes == [g for g in dict.fromkeys(table["gene"]) if g in set(var_names)]
    assert marker_indices(genes, var_names).tolist() == [var_names.index(g) for g in genes]


def test_data_driven_markers():
    # gene 3 is not a marker candidate but enters the per-cell totals (normalised over ALL genes)
    counts = np.array(
        [[80, 0, 10, 9910], [90, 0, 10, 9900], [0, 50, 10, 9940], [0, 70, 10, 9920]], float
    )
    names = ["g0", "g1", "g2", "g3"]
    labels = ["x", "x", "y", "y"]
    assert data_driven_markers(counts, names, labels, top_n=1) == ["g0", "g1"]
    # g2 is expressed equally: specificity 0.5 per cluster, so it passes min_specificity=0.1
    assert data_driven_markers(counts, names, labels, top_n=3) == ["g0", "g2", "g3", "g1"]
    strict = data_driven_markers(counts, names, labels, top_n=3, min_specificity=0.6)
    assert strict == ["g0", "g1"]
    # min_mean is on the counts-per-10k scale: g1's cluster mean is 60 per 10k
    assert "g1" not in data_driven_markers(counts, names, labels, top_n=3, min_mean=61)
    adata = regvi.simulate(n_cells=300, n_genes=60, n_cell_types=3, n_libraries=2, seed=1)
    genes = data_driven_markers(adata.X, adata.var_names, adata.obs["cell_type"], top_n=5)
    assert 5 <= len(genes) <= 15 and len(set(genes)) == len(genes)


def _cut_cross_edges(conn, library: np.ndarray, cells: np.ndarray) -> sp.csr_matrix:
    """``conn`` without the edges (both directions) joining ``cells`` to other libraries."""
    coo = sp.coo_matrix(conn)
    touch = np.isin(coo.row, cells) | np.isin(coo.col, cells)
    keep = ~(touch & (library[coo.row] != library[coo.col]))
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=conn.shape)


def test_isolation_ratio_floors_the_expected_fraction():
    """Eq. ISO: ``o / (e + τ)``; 0 when nobody is isolated, ``o / e`` where ``e ≫ τ``."""
    assert isolation_ratio(0.0, 1e-15) == 0.0
    assert isolation_ratio(0.0005, 1e-15) == pytest.approx(0.0005 / ISOLATION_TOLERANCE)
    assert isolation_ratio(0.4, 0.4) == pytest.approx(0.4 / 0.41)
    with pytest.raises(ValueError, match="tolerance"):
        isolation_ratio(0.1, 0.1, tolerance=0.0)
    # 1 isolated cell of 2000 whose expected isolation is ~1e-15: was 0.0005 / 1e-15 = 5e11
    n_in_mask = np.full(2000, 30)
    n_in_mask[0] = 0
    observed, expected, norm = isolation_norm(n_in_mask, np.full(2000, 1e-15), np.full(2000, 999))
    assert (observed, expected) == (pytest.approx(0.0005), pytest.approx(1e-15))
    assert norm == pytest.approx(0.05)
    # a population nobody can be isolated from (p = 1, e = 0) is no longer NaN
    assert isolation_norm(np.array([3, 0]), np.zeros(2), np.ones(2))[2] == pytest.approx(50.0)


def test_one_isolated_cell_moves_the_composite_a_little():
    """Issue #13: with ``e ≈ 1e-15`` one isolated cell flipped the isolation term from +1 to −1
    (``nc_composite_total`` −0.24 at 2000 cells); now it moves by ``≤ 0.4 · 0.3 / (n τ)``, while a
    massively isolated library still drives the composite down."""
    n = 2000
    adata = regvi.simulate(n_cells=n, n_genes=100, n_cell_types=4, n_libraries=2, seed=0)
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    emb = 4.0 * np.eye(4)[codes] + np.random.default_rng(0).normal(size=(n, 4))
    conn = sp.csr_matrix(compute_neighbours(emb, k=51).connectivities(50))
    library = adata.obs["library"].astype(str).to_numpy()

    def headline(graph) -> dict[str, float]:
        res = neighbourhood_metrics(adata.X, graph, np.arange(100), library, n_random_repeats=0)
        return res.headline

    base = headline(conn)
    one = headline(_cut_cross_edges(conn, library, np.array([0])))
    many = headline(_cut_cross_edges(conn, library, np.flatnonzero(library == "lib_0")[: n // 6]))
    assert base["isolated_between_libraries"] == 0.0
    assert one["isolated_between_libraries"] == pytest.approx(1 / n)
    assert one["expected_isolated_between_libraries"] < 1e-10  # common population, k ≈ 50
    assert one["H5_isolation_norm_cross_library"] == pytest.approx(1 / n / ISOLATION_TOLERANCE)
    step = base["composite_total"] - one["composite_total"]
    assert 0 < step < 0.01  # was 0.24
    assert step <= 0.4 * 0.3 / (n * ISOLATION_TOLERANCE) + 1e-3  # + the tiny H3 / H11 change
    # a sixth of the cells isolated: the term hits its −1 floor, the composite drops as before
    assert many["H5_isolation_norm_cross_library"] >= 2
    assert base["composite_total"] - many["composite_total"] > 0.2
    for h in (base, one, many):
        term = 1 - np.clip(h["H5_isolation_norm_cross_library"], 0, 2)
        assert -1 <= term <= 1


def test_cells_without_marker_counts_are_a_labelled_failure_mode(sim_graph):
    """Issue #13: cells with no marker counts were a silent NaN mode ("nan" in the UMAP legend)
    left out of every ``frac_<mode>_<level>``; now they are ``no_marker_signal`` and counted."""
    adata, conn, library, dataset, technical = sim_graph
    counts = np.asarray(adata.X.todense() if sp.issparse(adata.X) else adata.X, dtype=float)
    markers = np.arange(20)
    silent = np.arange(0, adata.n_obs, 10)  # 60 of 600 cells
    counts[silent[:, None], markers] = 0.0
    res = neighbourhood_metrics(
        counts, conn, markers, library, dataset, technical, n_random_repeats=0
    )
    pc, h = res.per_cell, res.headline
    flagged = np.flatnonzero(pc["no_marker_signal"].to_numpy())
    assert set(silent) <= set(flagged)
    share = flagged.size / adata.n_obs
    assert h["frac_no_marker_signal"] == pytest.approx(share)
    for level in ("library", "dataset"):
        modes = pc[f"failure_mode_{level}"]
        judged = modes.notna()
        no_signal = (modes == "no_marker_signal") | (modes == "orphan")
        assert no_signal[pc["no_marker_signal"] & judged].all()
        assert h[f"frac_no_marker_signal_{level}"] == pytest.approx(
            np.mean(modes[judged] == "no_marker_signal")
        )
        assert h[f"frac_no_marker_signal_{level}"] > 0.05
        fracs = [h[f"frac_{m}_{level}"] for m in FAILURE_MODES]
        assert sum(fracs) == pytest.approx(1.0)  # the no-signal cells are in the denominator
    lib = res.summaries["library"]
    per_lib = pd.Series(pc["no_marker_signal"].to_numpy()).groupby(library).mean()
    np.testing.assert_allclose(lib.set_index("library")["frac_no_marker_signal"], per_lib)
    # plots: a missing mode (level not applicable) is "n/a", never "nan"
    labels = category_labels(pd.Series(pd.Categorical(["ideal", None], categories=FAILURE_MODES)))
    assert list(labels.astype(str)) == ["ideal", "n/a"]


@pytest.fixture(scope="module")
def small_adata():
    adata = regvi.simulate(n_cells=300, n_genes=60, n_cell_types=3, n_libraries=2, seed=1)
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    rng = np.random.default_rng(1)
    adata.obsm["X_emb"] = (4.0 * np.eye(3)[codes] + rng.normal(size=(adata.n_obs, 3))).astype(
        np.float32
    )
    return adata


def test_evaluate_refuses_fewer_than_two_markers(small_adata, tmp_path):
    """Issue #13: fewer than 2 markers in the data silently skipped every nc_* metric."""
    a = small_adata
    args = dict(embedding_key="X_emb", library_key="library", scib=False)
    few = ["gene_1", "CD3E", "MS4A1"]
    with pytest.raises(ValueError, match=r"marker list .*: 1 of 3 marker genes.*\['gene_1'\]"):
        evaluate(a, markers=few, **args)
    # refused by the input check itself, i.e. before any work
    with pytest.raises(ValueError, match="1 of 3"):
        check_inputs(a, "X_emb", "library", None, None, [], few)
    if CURATED.is_file():  # gene symbols vs the data's names: the message shows both
        n_curated = len(dict.fromkeys(pd.read_csv(CURATED)["gene"].dropna().str.strip()))
        with pytest.raises(ValueError, match=rf"marker file {CURATED}: 0 of {n_curated} .*gene_0"):
            evaluate(a, markers=CURATED, **args)
    csv = tmp_path / "one.csv"
    csv.write_text("gene,cell_type,lineage,category\ngene_3,T,L,x\nNOPE,B,L,x\n")
    with pytest.raises(ValueError, match=r"one\.csv: 1 of 2 .*NOPE"):
        evaluate(a, markers=str(csv), **args)
    with pytest.raises(ValueError, match="needs label_key"):
        check_inputs(a, "X_emb", "library", None, None, [], "data")
    # not asked for: no error, no nc_* metrics
    ev = evaluate(a, markers=few, neighbourhood=False, **args)
    assert not any(k.startswith("nc_") for k in ev.metrics)
    # enough markers: the metrics and the no-marker-signal share are there
    ok = evaluate(a, markers=["gene_1", "gene_2", "NOPE", "gene_5"], **args)
    assert ok.metrics["eval_n_markers"] == 3.0
    assert np.isfinite(ok.metrics["nc_composite_total"])
    assert 0 <= ok.metrics["nc_frac_no_marker_signal"] <= 1
    assert present_marker_genes(["gene_1", "gene_2", "NOPE"], a.var_names) == ["gene_1", "gene_2"]


def test_evaluate_refuses_an_empty_data_driven_marker_set(small_adata):
    """Data-driven markers (``markers=None`` with labels, or ``"data"``) that come up short raise
    too: here every cell has the same counts, so no gene is specific to any of 12 labels."""
    a = small_adata[:240].copy()
    a.X = sp.csr_matrix(np.tile(np.arange(1, 61, dtype=np.float32), (a.n_obs, 1)))
    a.obs["flat"] = pd.Categorical([f"c{i % 12}" for i in range(a.n_obs)])
    for markers in (None, "data"):
        with pytest.raises(ValueError, match=r"data-driven markers from label_key 'flat'.*: 0 "):
            evaluate(
                a,
                "X_emb",
                "library",
                label_key="flat",
                markers=markers,
                scib=False,
                n_subsample=None,
            )
