"""``python -m regvi.map``: map a query onto a saved / registered model, transfer labels, log the
run in MLflow; bad input is refused up front (exit 2, nothing written); the pyfunc maps new
libraries."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import regvi
from regvi.map import cli
from regvi.map.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A reference model (libraries 0, 1) saved to disk; reference and query (2, 3) h5ad."""
    d = tmp_path_factory.mktemp("map")
    adata = regvi.simulate(n_cells=800, n_genes=60, n_cell_types=4, n_libraries=4, seed=3)
    libs = sorted(adata.obs["library"].unique())
    ref = adata[adata.obs["library"].isin(libs[:2])].copy()
    query = adata[adata.obs["library"].isin(libs[2:])].copy()
    model = regvi.RegVI(ref, library_key="library", n_hidden=32, n_latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=30, progress_bar=False)
    model.save(d / "model")
    ref.write_h5ad(d / "ref.h5ad")
    query.write_h5ad(d / "query.h5ad")
    return {"dir": d, "model": d / "model", "ref": d / "ref.h5ad", "query": d / "query.h5ad"}


@pytest.fixture(autouse=True)
def _restore_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def _args(files, out, *extra):
    return [
        "--model",
        str(files["model"]),
        "--query",
        str(files["query"]),
        "--out",
        str(out),
        "--train-epochs",
        "3",
        "--no-progress",
        *extra,
    ]


def _run(c: MlflowClient, experiment: str = cli.DEFAULT_EXPERIMENT):
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_end_to_end_with_labels_and_mlflow_run(files, tmp_path, capsys):
    out, uri = tmp_path / "mapped.h5ad", f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = _args(files, out, "--reference", str(files["ref"]), "--query-labels-key", "cell_type")
    rc = main([*argv, "--tracking-uri", uri, "--save-model", str(tmp_path / "qmodel")])
    assert rc == 0, capsys.readouterr().err
    assert "mapped 386 cells" in capsys.readouterr().out
    query = ad.read_h5ad(files["query"])
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_regvi"].shape == (query.n_obs, 4)
    assert list(mapped.obs_names) == list(query.obs_names)
    assert list(mapped.var_names) == list(query.var_names)
    acc = mapped.obs["cell_type_transferred"].astype(str) == query.obs["cell_type"].astype(str)
    assert acc.mean() > 0.9
    assert mapped.obs["cell_type_confidence"].between(0, 1).all()
    assert not list(tmp_path.glob(".mapped*"))  # no temporary file left
    # the saved query model knows all four libraries and encodes like the mapping did
    qmodel = regvi.load(tmp_path / "qmodel")
    assert qmodel.registry.categories["library"] == ["lib_0", "lib_1", "lib_2", "lib_3"]
    np.testing.assert_allclose(
        qmodel.get_latent_representation(query), mapped.obsm["X_regvi"], rtol=1e-5, atol=1e-6
    )

    c = MlflowClient(tracking_uri=uri)
    run = _run(c)
    assert run.info.status == "FINISHED"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["model"] == str(files["model"])
    assert p["query"] == str(files["query"].resolve())
    assert p["n_query_cells"] == str(query.n_obs)
    assert json.loads(p["new_categories"]) == {"library": ["lib_2", "lib_3"]}
    assert p["fine_tune"] == "none" and p["train_epochs"] == "3"
    assert {"query_train_time_s", "query_elbo", "query_n_epochs"} <= set(m)
    assert np.isfinite(m["query_elbo"]) and m["query_n_epochs"] == 3
    assert m["accuracy"] > 0.9 and m["macro_f1"] > 0.9
    assert 0 <= m["fraction_unknown"] <= 0.1 and m["mean_confidence"] > 0.8
    assert tags[cli.TAG_MODEL_URI] == str(files["model"].resolve())
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert arts == {"plots/umap_reference_query.png", "plots/confusion.png"}


def test_registered_model_alias_links_the_run_and_the_pyfunc_maps_new_libraries(
    files, tmp_path, capsys
):
    from regvi.sweep.tracking import ensure_experiment, log_model_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(uri, "atlas", tmp_path / "artifacts")
    source = c.create_run(exp).info.run_id
    model_uri = log_model_dir(uri, source, files["model"])
    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(model_uri, "atlas", tags={"run_id": source})
    c.set_registered_model_alias("atlas", "champion", mv.version)
    mv2 = mlflow.register_model(model_uri, "atlas")  # a later version: the alias still wins
    assert mv2.version != mv.version
    mlflow.set_tracking_uri(None)

    out = tmp_path / "mapped.h5ad"
    argv = _args(files, out, "--tracking-uri", uri, "--experiment", "maps")
    argv[1] = "models:/atlas@champion"
    assert main(argv) == 0, capsys.readouterr().err
    mapped = ad.read_h5ad(out)
    assert "X_regvi" in mapped.obsm and "cell_type_transferred" not in mapped.obs  # no --reference
    run = _run(c, "maps")
    tags = run.data.tags
    assert tags[cli.TAG_MODEL_URI] == "models:/atlas@champion"
    assert tags[cli.TAG_MODEL_NAME] == "atlas"
    assert tags[cli.TAG_MODEL_VERSION] == str(mv.version)
    assert tags[cli.TAG_RUN_ID] == source
    assert {a.path for a in c.list_artifacts(run.info.run_id, "plots")} == {
        "plots/umap_reference_query.png"
    }
    # a models:/NAME/VERSION URI resolves the same way
    lineage = cli.model_lineage(f"models:/atlas/{mv2.version}", uri)
    assert lineage[cli.TAG_MODEL_VERSION] == str(mv2.version)
    assert lineage[cli.TAG_RUN_ID] == source

    # the pyfunc encodes a query of unseen libraries as load_query_data does (no training)
    query = ad.read_h5ad(files["query"])
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/atlas@champion")
    z = pyfunc.predict(query)
    expected = regvi.RegVI.load_query_data(query, regvi.load(files["model"]))
    np.testing.assert_array_equal(z, expected.get_latent_representation())
    # and the query training does not move that latent
    np.testing.assert_allclose(z, mapped.obsm["X_regvi"], rtol=1e-5, atol=1e-6)
    # known libraries still go through the model itself
    ref = ad.read_h5ad(files["ref"])
    np.testing.assert_array_equal(
        pyfunc.predict(ref), regvi.load(files["model"]).get_latent_representation(ref)
    )


def test_without_reference_or_mlflow_writes_only_the_latent(files, tmp_path, capsys):
    out = tmp_path / "mapped.h5ad"
    argv = _args(files, out, "--no-mlflow", "--train-epochs", "0")
    assert main(argv) == 0, capsys.readouterr().err
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_regvi"].shape[1] == 4
    assert not [c for c in mapped.obs.columns if c.endswith(("_transferred", "_confidence"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.h5ad"]  # no mlflow.db


def _bad_query(files, tmp_path, kind):
    query = ad.read_h5ad(files["query"])
    if kind == "genes":
        query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    else:
        del query.obs["library"]
    path = tmp_path / f"bad_{kind}.h5ad"
    query.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("query_missing", "--query: .*does not exist"),
        ("query_not_h5ad", "--query: .*not an .h5ad"),
        ("out_dir_missing", "--out: the output directory .*does not exist"),
        ("out_dir_not_writable", "--out: the output directory .*not writable"),
        ("out_exists", "--out: .*exists; pass --overwrite"),
        ("labels_key", "--labels-key: 'celltype' is not a column of the reference's obs"),
        ("query_labels_key", "--query-labels-key: 'truth' is not a column"),
        ("genes", "--query: .*does not fit the model: the query lacks 60 of the reference's"),
        ("covariate", "--query: .*does not fit the model: query obs lacks .*'library'"),
        ("fine_tune", "--fine-tune: .*unknown \\['decoder'\\]"),
        ("model_dir", "--model: .*not a model directory"),
        ("model_uri", "--model: cannot load 'models:/nope@champion'"),
        ("tracking_file", "--tracking-uri: .*refuses file stores"),
        ("threshold", "--threshold: expected a number in \\[0, 1\\]"),
    ],
)
def test_bad_input_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch, case, message):
    out = tmp_path / "mapped.h5ad"
    db = tmp_path / "mlflow.db"
    extra = ["--reference", str(files["ref"]), "--tracking-uri", f"sqlite:///{db}"]
    if case == "model_uri":
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # an empty store
    argv = _args(files, out, *extra)
    called = []
    monkeypatch.setattr(regvi.RegVI, "train", lambda *a, **k: called.append(1))

    def set_arg(name, value):
        argv[argv.index(name) + 1] = value

    if case == "query_missing":
        set_arg("--query", str(tmp_path / "nope.h5ad"))
    elif case == "query_not_h5ad":
        (tmp_path / "query.csv").write_text("a,b\n")
        set_arg("--query", str(tmp_path / "query.csv"))
    elif case == "out_dir_missing":
        out = tmp_path / "no" / "such" / "mapped.h5ad"
        set_arg("--out", str(out))
    elif case == "out_dir_not_writable":
        real = cli.os.access
        monkeypatch.setattr(
            cli.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode)
        )
    elif case == "out_exists":
        out.write_bytes(b"keep me")
    elif case == "labels_key":
        argv += ["--labels-key", "celltype"]
    elif case == "query_labels_key":
        argv += ["--query-labels-key", "truth"]
    elif case in ("genes", "covariate"):
        set_arg("--query", str(_bad_query(files, tmp_path, case)))
    elif case == "fine_tune":
        argv += ["--fine-tune", "conditioning,decoder"]
    elif case == "model_dir":
        set_arg("--model", str(tmp_path / "no_model"))
    elif case == "model_uri":
        set_arg("--model", "models:/nope@champion")
    elif case == "tracking_file":
        set_arg("--tracking-uri", f"file://{tmp_path}/mlruns")
    elif case == "threshold":
        argv += ["--threshold", "1.5"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # MLflow may log INFO lines before
    assert err.startswith("error: "), err
    assert re.search(message, err), err
    assert not called  # refused before training
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "out_exists":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_a_failed_write_leaves_no_output_and_marks_the_run_failed(files, tmp_path, monkeypatch):
    out, uri = tmp_path / "mapped.h5ad", f"sqlite:///{tmp_path / 'mlflow.db'}"

    def broken(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half an h5ad")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    assert main(_args(files, out, "--tracking-uri", uri, "--train-epochs", "1")) == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "mapped" in p.name] == []
    assert _run(MlflowClient(tracking_uri=uri)).info.status == "FAILED"
