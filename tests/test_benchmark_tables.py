"""benchmarks/_common.py: the text-table column specs every benchmark prints its tables with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common


def test_columns_written_as_a_text_table_render_like_tuples():
    spec = _common.parse_columns(
        """
        median s/epoch: regvi  21.2f  regvi_median_epoch_s
        batch                  >5     batch_size
        """
    )
    assert spec == [
        ("median s/epoch: regvi", "21.2f", "regvi_median_epoch_s"),
        ("batch", ">5", "batch_size"),
    ]
    rows = [{"regvi_median_epoch_s": 1.5, "batch_size": 128}, {"batch_size": 1024}]
    lines = _common.render_table(rows, spec).splitlines()
    assert lines[0] == "median s/epoch: regvi batch"
    assert lines[2].split() == ["1.50", "128"]
    assert lines[3].split() == ["-", "1024"]  # a missing value prints as '-'


def test_a_column_line_without_three_fields_names_the_line():
    with pytest.raises(ValueError, match=r"column 'ratio 6.2f': expected 'title  format  key'"):
        _common.parse_columns("ratio 6.2f")


@pytest.mark.integration
def test_stable_totals_of_benchmarker_rows():
    """``add_stable_totals`` swaps the row's single-start KMeans NMI / ARI for their mean over
    starts; with one start the stable Total is the Benchmarker's Total."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c"]), [120, 60, 20])
    z = rng.normal(0, 1, (200, 3)).astype(np.float32) + 3 * (labels[:, None] == ["a", "b", "c"])
    from evaluation.scib import kmeans_nmi_ari

    nmi0, ari0 = kmeans_nmi_ari(z, labels, 0)[0]
    bio = {"Isolated labels": 0.5, "KMeans NMI": nmi0, "KMeans ARI": ari0}
    bio |= {"Silhouette label": 0.6, "cLISI": 0.9}
    row = {**bio, "Bio conservation": float(np.mean(list(bio.values())))}
    row |= {"Batch correction": 0.4}
    row["Total"] = 0.6 * row["Bio conservation"] + 0.4 * 0.4
    one, many = {"z": dict(row)}, {"z": dict(row)}
    _common.add_stable_totals(one, {"z": z}, labels, starts=1)
    assert one["z"]["Total (stable)"] == pytest.approx(row["Total"])
    _common.add_stable_totals(many, {"z": z, "other": z}, labels, starts=4)
    starts = kmeans_nmi_ari(z, labels, range(4))
    assert many["z"]["KMeans ARI (mean)"] == pytest.approx(np.mean([s[1] for s in starts]))
    stable_bio = np.mean(
        [0.5, many["z"]["KMeans NMI (mean)"], many["z"]["KMeans ARI (mean)"], 0.6, 0.9]
    )
    assert many["z"]["Total (stable)"] == pytest.approx(0.6 * stable_bio + 0.4 * 0.4)
    assert "other" not in many  # only rows the Benchmarker scored


@pytest.mark.integration
def test_sweep_results_read_trials_from_mlflow_best_stable_total_first(tmp_path):
    """bench_quality ``--sweep``: only the sweep's trial runs that finished scib are kept, with
    their params and scib metrics, ordered by the start-averaged Total the sweeps optimise."""
    import mlflow
    from bench_quality import sweep_results

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("q", artifact_location=(tmp_path / "art").as_uri())
    rows = [
        ({"regvi.trial_id": "a"}, {"scib_total": 0.80, "scib_total_stable": 0.70}, "10"),
        ({"regvi.trial_id": "b"}, {"scib_total": 0.75, "scib_total_stable": 0.74}, "30"),
        ({"regvi.trial_id": "c"}, {"epoch": 3.0}, "20"),  # failed before scib
        ({}, {"scib_total": 0.99, "scib_total_stable": 0.99}, "20"),  # not a trial (the summary)
    ]
    for tags, metrics, n_latent in rows:
        run = client.create_run(exp, tags=tags)
        client.log_param(run.info.run_id, "n_latent", n_latent)
        for k, v in metrics.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id)
    out = sweep_results(uri, "q")
    assert out["n_trials"] == 2
    assert [t["params"]["n_latent"] for t in out["trials"]] == ["30", "10"]
    assert out["trials"][0]["scib_total_stable"] == 0.74
    with pytest.raises(SystemExit, match="no MLflow experiment 'missing'"):
        sweep_results(uri, "missing")


def test_bench_quality_merges_one_dataset_and_keeps_what_others_wrote(tmp_path):
    """Two scoring processes (one per dataset) write the same JSON: each keeps the other's
    dataset, its own replaces only its dataset, and no temporary file is left behind."""
    from bench_quality import merge_into

    out = tmp_path / "bench_quality.json"
    a = {"machine": "m", "datasets": {"mop": {"summary": {"regvi": 1}}}}
    b = {"machine": "m", "datasets": {"kang_ctrl": {"summary": {"regvi": 2}}, "mop": {"old": 0}}}
    merge_into(out, a, "mop")
    merged = merge_into(out, b, "kang_ctrl")  # b's stale copy of mop must not win
    assert merged["datasets"] == {
        "mop": {"summary": {"regvi": 1}},
        "kang_ctrl": {"summary": {"regvi": 2}},
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench_quality.json",
        "bench_quality.json.lock",
    ]


def test_bench_quality_summary_keeps_times_without_the_cache():
    """Training time and epochs come from the records the JSON keeps; a method without any
    record keeps what the JSON's summary held (a lost cache loses nothing), unless its seeds
    changed."""
    from bench_quality import summarise

    row = {"Total": 0.7, "Bio conservation": 0.7, "Batch correction": 0.7}
    scores = {"regvi_s0": row, "regvi_s1": row, "harmony_s0": row}
    records = {"harmony_s0": {"train_s": 2.0, "epochs": None}}
    previous = {
        "regvi": {"n_seeds": 2, "train_s_mean": 100.0, "epochs_mean": 50.0},
        "harmony": {"n_seeds": 1, "train_s_mean": 9.0, "epochs_mean": None},
    }
    s = summarise("no_such_dataset", scores, records, previous=previous)
    assert (s["regvi"]["train_s_mean"], s["regvi"]["epochs_mean"]) == (100.0, 50.0)
    assert s["harmony"]["train_s_mean"] == 2.0  # its own record wins over the old summary
    # one seed retrained (with a record) does not stand for the three: the old means stay
    one = {**records, "regvi_s0": {"train_s": 7.0, "epochs": 3}}
    assert summarise("no_such_dataset", scores, one, previous)["regvi"]["train_s_mean"] == 100.0
    previous["regvi"]["n_seeds"] = 3  # another set of seeds: the old means do not apply
    assert summarise("no_such_dataset", scores, records, previous)["regvi"]["train_s_mean"] is None
