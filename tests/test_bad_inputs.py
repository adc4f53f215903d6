"""The bad-input table (docs/reliability.md, "Bad input and safe artifacts"): every malformed
input is refused before any work starts, with a message naming the problem, and nothing is
written.

Each case builds its input inside ``tmp_path`` and returns the action that must fail; the test
snapshots the folder, runs the action, checks the error type and message, then checks the folder
is byte-for-byte unchanged. A case's name is its row's "input" column (backticks dropped), and
``test_every_documented_case_is_tested`` fails when the list and the table drift apart.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

import regvi
from regvi.sweep.config import ConfigError, load_config


def _sim(n_cells: int = 120, seed: int = 0):
    a = regvi.simulate(n_cells=n_cells, n_genes=30, n_cell_types=2, n_libraries=2, seed=seed)
    del a.uns["truth"]
    return a


def _with_X(X):
    a = _sim()
    a.X = X
    return a


def _setup(a, **kw):
    return regvi.RegVI(a, **({"library_key": "library"} | kw), n_hidden=8, n_latent=2)


# ---------------------------------------------------------------- data
def negative_counts(tmp: Path) -> Callable[[], object]:
    X = _sim().X.toarray().astype(np.float32)
    X[0, 0] = -1
    a = _with_X(X)
    return lambda: _setup(a)


def nan_counts(tmp: Path) -> Callable[[], object]:
    X = _sim().X.toarray().astype(np.float32)
    X[3, 2] = np.nan
    a = _with_X(X)
    return lambda: _setup(a)


def non_integer_counts(tmp: Path) -> Callable[[], object]:
    a = _with_X(_sim().X.astype(np.float32) * 0.5)
    return lambda: _setup(a)


def empty_anndata(tmp: Path) -> Callable[[], object]:
    a = _sim()[:0].copy()
    return lambda: _setup(a)


def all_cells_zero(tmp: Path) -> Callable[[], object]:
    a = _with_X(sp.csr_matrix((120, 30), dtype=np.int32))
    return lambda: _setup(a)


def missing_obs_key(tmp: Path) -> Callable[[], object]:
    return lambda: _setup(_sim(), library_key="lane")


def nan_in_key(tmp: Path) -> Callable[[], object]:
    a = _sim()
    a.obs["library"] = a.obs["library"].astype(object)
    a.obs.iloc[5, a.obs.columns.get_loc("library")] = np.nan
    return lambda: _setup(a)


def library_in_two_datasets(tmp: Path) -> Callable[[], object]:
    a = _sim()
    a.obs["dataset"] = np.where(np.arange(a.n_obs) % 2, "study_a", "study_b")
    return lambda: _setup(a, dataset_key="dataset")


def library_key_with_explicit_key(tmp: Path) -> Callable[[], object]:
    return lambda: _setup(_sim(), dispersion_key="library")


def missing_layer(tmp: Path) -> Callable[[], object]:
    return lambda: _setup(_sim(), layer="counts")


def non_numeric_continuous(tmp: Path) -> Callable[[], object]:
    a = _sim()
    a.obs["pct_mito"] = "high"
    return lambda: _setup(a, continuous_covariate_keys="pct_mito")


def unknown_model_option(tmp: Path) -> Callable[[], object]:
    return lambda: regvi.RegVI(_sim(), library_key="library", n_hiden=64)


def unseen_category_at_inference(tmp: Path) -> Callable[[], object]:
    model = _setup(_sim())
    new = _sim(seed=1)
    new.obs["library"] = new.obs["library"].cat.rename_categories({"lib_0": "lib_9"})
    return lambda: model.get_latent_representation(new)


def unknown_inference_option(tmp: Path) -> Callable[[], object]:
    model = _setup(_sim())
    return lambda: model.get_normalized_expression(batchsize=64)


def gene_mismatch_at_load(tmp: Path) -> Callable[[], object]:
    model = _setup(_sim())
    model.save(tmp / "model")
    return lambda: regvi.load(tmp / "model", adata=_sim()[:, :20].copy())


def mudata_mismatched_cells(tmp: Path) -> Callable[[], object]:
    data = regvi.simulate_multiome(n_cells=60, n_genes=20, n_peaks=40, n_libraries=2)
    data["atac"] = data["atac"][:50].copy()
    return lambda: regvi.RegMultiVI(data, library_key="library")


def non_integer_peaks(tmp: Path) -> Callable[[], object]:
    data = regvi.simulate_multiome(n_cells=60, n_genes=20, n_peaks=40, n_libraries=2)
    data["atac"].X = data["atac"].X.astype(np.float32) * 0.3
    return lambda: regvi.RegMultiVI(data, library_key="library")


def bad_train_argument(tmp: Path) -> Callable[[], object]:
    model = _setup(_sim())
    return lambda: model.train(max_epochs=0)


# ---------------------------------------------------------------- configs
def _config(tmp: Path, **over) -> Path:
    cfg = {
        "name": "bad",
        "data": {"path": "bundled:kang_pbmc_small", "library_key": "condition"},
        "search": {"n_hidden": {"type": "categorical", "values": [16, 32]}},
        "storage": {"path": str(tmp / "runs")},
    }
    cfg.update(over)
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def config_unknown_key(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, trainig={"max_epochs": 3})
    return lambda: load_config(path)


def config_wrong_type(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, training={"max_epochs": "ten"})
    return lambda: load_config(path)


def config_inverted_range(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, search={"lr": {"type": "loguniform", "low": 1e-2, "high": 1e-4}})
    return lambda: load_config(path)


def config_empty_choice(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, search={"n_latent": {"type": "categorical", "values": []}})
    return lambda: load_config(path)


def config_impossible_gpus(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, resources={"gpus_per_worker": 1.5})
    return lambda: load_config(path)


def config_name_escapes_output(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, name="../../etc")
    return lambda: load_config(path)


def config_unsafe_yaml(tmp: Path) -> Callable[[], object]:
    path = tmp / "sweep.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch PWNED']\n")
    return lambda: load_config(path)


def config_missing_data_file(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, data={"path": "atlas.h5ad", "library_key": "sample"})
    return lambda: load_config(path)


def config_misspelt_objective(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, objective={"metric": "scib_totl"})
    return lambda: load_config(path)


def config_objective_switched_off(tmp: Path) -> Callable[[], object]:
    path = _config(tmp, objective={"metric": "lowcount_q0.5_displacement", "mode": "max"})
    return lambda: load_config(path)


def config_asha_without_validation(tmp: Path) -> Callable[[], object]:
    path = _config(
        tmp,
        training={"validation_fraction": 0.0},
        objective={"metric": "training_wall_s", "mode": "min"},  # a final-report metric
    )
    return lambda: load_config(path)


def _atlas_config(tmp: Path, **data) -> Path:
    _sim().write_h5ad(tmp / "atlas.h5ad")
    return _config(tmp, data={"path": "atlas.h5ad", "library_key": "library", **data})


def dry_run_misspelt_library_key(tmp: Path) -> Callable[[], object]:
    from regvi.sweep.data_check import check_data_files

    cfg = load_config(_atlas_config(tmp, library_key="lane"))
    return lambda: check_data_files(cfg)


def dry_run_missing_layer(tmp: Path) -> Callable[[], object]:
    from regvi.sweep.data_check import check_data_files

    cfg = load_config(_atlas_config(tmp, layer="counts"))
    return lambda: check_data_files(cfg)


def sweep_misspelt_labels_key(tmp: Path) -> Callable[[], object]:
    from regvi.sweep.runner import run_sweep

    cfg = load_config(_atlas_config(tmp, labels_key="celltype"))
    return lambda: run_sweep(cfg)


# ---------------------------------------------------------------- files
def unwritable_output_folder(tmp: Path) -> Callable[[], object]:
    from regvi.sweep.runner import run_sweep

    (tmp / "runs").write_text("a file where the output folder should go")
    cfg = load_config(_config(tmp, storage={"path": str(tmp / "runs" / "sub")}))
    return lambda: run_sweep(cfg)


def truncated_h5ad(tmp: Path) -> Callable[[], object]:
    from regvi.sweep.runner import check_data

    path = tmp / "atlas.h5ad"
    _sim().write_h5ad(path)
    path.write_bytes(path.read_bytes()[:2000])
    cfg = load_config(_config(tmp, data={"path": "atlas.h5ad", "library_key": "library"}))
    return lambda: check_data(cfg)


def model_dir_missing_weights(tmp: Path) -> Callable[[], object]:
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps({"format": "regvi"}))
    return lambda: regvi.load(tmp / "model")


def model_dir_corrupt_weights(tmp: Path) -> Callable[[], object]:
    _setup(_sim()).save(tmp / "model")
    (tmp / "model" / "model.safetensors").write_bytes(b"\x00" * 64)
    return lambda: regvi.load(tmp / "model")


def model_dir_corrupt_config(tmp: Path) -> Callable[[], object]:
    _setup(_sim()).save(tmp / "model")
    (tmp / "model" / "config.json").write_text("{not json")
    return lambda: regvi.load(tmp / "model")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path("PWNED"),))


def model_dir_pickle_payload(tmp: Path) -> Callable[[], object]:
    """A pickle planted as the weights file is refused; the payload never runs."""
    _setup(_sim()).save(tmp / "model")
    (tmp / "model" / "model.safetensors").write_bytes(pickle.dumps(_Payload()))
    return lambda: regvi.load(tmp / "model")


def model_dir_newer_format(tmp: Path) -> Callable[[], object]:
    _setup(_sim()).save(tmp / "model")
    meta = json.loads((tmp / "model" / "config.json").read_text())
    meta["format_version"] = 99
    (tmp / "model" / "config.json").write_text(json.dumps(meta))
    return lambda: regvi.load(tmp / "model")


def save_over_existing_dir(tmp: Path) -> Callable[[], object]:
    (tmp / "model").mkdir()
    (tmp / "model" / "keep.txt").write_text("mine")
    model = _setup(_sim())
    return lambda: model.save(tmp / "model")


@dataclass
class Case:
    name: str
    setup: Callable[[Path], Callable[[], object]]
    error: type[BaseException]
    match: str


CASES = [
    Case("negative counts", negative_counts, ValueError, r"adata.X contains 1 negative values"),
    Case("NaN counts", nan_counts, ValueError, r"adata.X contains 1 NaN/inf values"),
    Case(
        "non-integer counts",
        non_integer_counts,
        ValueError,
        r"adata.X contains \d+ non-integer values \(e.g.",
    ),
    Case("empty AnnData", empty_anndata, ValueError, r"shape \(0, 30\); expected at least one"),
    Case("every cell has zero counts", all_cells_zero, ValueError, r"all 120 cells have zero"),
    Case("missing obs key", missing_obs_key, KeyError, r"no column 'lane' \(for library"),
    Case("NaN in a covariate key", nan_in_key, ValueError, r"obs\['library'\] has 1 missing"),
    Case(
        "a library in two datasets",
        library_in_two_datasets,
        ValueError,
        r"every 'library' level must belong to exactly one dataset",
    ),
    Case(
        "library_key plus an explicit purpose key",
        library_key_with_explicit_key,
        ValueError,
        r"do not also give dispersion_key",
    ),
    Case("missing layer", missing_layer, KeyError, r"layer='counts' is not in adata.layers"),
    Case(
        "non-numeric continuous covariate",
        non_numeric_continuous,
        TypeError,
        r"continuous covariate 'pct_mito' has dtype",
    ),
    Case("unknown model option", unknown_model_option, TypeError, r"unknown RegVI argument"),
    Case(
        "unseen category at inference",
        unseen_category_at_inference,
        ValueError,
        r"categories not seen at setup: \['lib_9'\]",
    ),
    Case(
        "unknown inference option",
        unknown_inference_option,
        TypeError,
        r"unknown option\(s\) \['batchsize'\]; expected \['batch_size'",
    ),
    Case("gene mismatch at load", gene_mismatch_at_load, ValueError, r"20 features but the model"),
    Case(
        "MuData with mismatched cells",
        mudata_mismatched_cells,
        ValueError,
        r"'atac' \(50 cells\) and 'rna' \(60 cells\) have different obs_names",
    ),
    Case("non-integer ATAC peaks", non_integer_peaks, ValueError, r"modality 'atac' X contains"),
    Case("max_epochs=0", bad_train_argument, ValueError, r"max_epochs=0; expected a positive"),
    Case("config: unknown key", config_unknown_key, ConfigError, r"unknown key\(s\) \['trainig'\]"),
    Case(
        "config: wrong type",
        config_wrong_type,
        ConfigError,
        r"training.max_epochs: expected a number, got 'ten'",
    ),
    Case(
        "config: inverted range",
        config_inverted_range,
        ConfigError,
        r"search.lr: empty or inverted range",
    ),
    Case(
        "config: empty choice list",
        config_empty_choice,
        ConfigError,
        r"search.n_latent.values: expected a non-empty list",
    ),
    Case(
        "config: impossible GPU request",
        config_impossible_gpus,
        ConfigError,
        r"resources.gpus_per_worker: 1.5",
    ),
    Case(
        "config: name escaping the output folder",
        config_name_escapes_output,
        ConfigError,
        r"name: '../../etc'; expected letters",
    ),
    Case(
        "config: YAML with a Python object tag",
        config_unsafe_yaml,
        ConfigError,
        r"not valid YAML",
    ),
    Case(
        "config: missing data file",
        config_missing_data_file,
        ConfigError,
        r"data.path: file .*atlas.h5ad does not exist",
    ),
    Case(
        "config: misspelt objective",
        config_misspelt_objective,
        ConfigError,
        r"objective\.metric: 'scib_totl' is not a metric the trials report; closest: 'scib_total'",
    ),
    Case(
        "config: objective of an evaluation switched off",
        config_objective_switched_off,
        ConfigError,
        r"'lowcount_q0\.5_displacement' is not reported .* needs evaluation\.lowcount: true",
    ),
    Case(
        "config: ASHA without validation",
        config_asha_without_validation,
        ConfigError,
        r"scheduler: ASHA prunes on .*'validation_elbo'.* training\.validation_fraction > 0",
    ),
    Case(
        "dry-run: misspelt library_key",
        dry_run_misspelt_library_key,
        ConfigError,
        r"data\.library_key: 'lane' is not an obs column of .*atlas\.h5ad",
    ),
    Case(
        "dry-run: missing layer",
        dry_run_missing_layer,
        ConfigError,
        r"data\.layer: 'counts' is not a layer of .*atlas\.h5ad; available layers: \[\]",
    ),
    Case(
        "sweep: misspelt labels_key",
        sweep_misspelt_labels_key,
        ConfigError,
        r"data\.labels_key: 'celltype' is not an obs column of .*atlas\.h5ad",
    ),
    Case(
        "unwritable output folder",
        unwritable_output_folder,
        ValueError,
        r"storage.path: cannot write the sweep folder .*runs/sub/bad",
    ),
    Case("truncated h5ad", truncated_h5ad, ValueError, r"data: cannot read .*atlas.h5ad"),
    Case(
        "model folder without weights",
        model_dir_missing_weights,
        FileNotFoundError,
        r"model.safetensors is missing",
    ),
    Case(
        "corrupt safetensors",
        model_dir_corrupt_weights,
        ValueError,
        r"is not a readable safetensors file",
    ),
    Case("corrupt config.json", model_dir_corrupt_config, ValueError, r"is not valid JSON"),
    Case(
        "a pickle planted as the weights",
        model_dir_pickle_payload,
        ValueError,
        r"is not a readable safetensors file",
    ),
    Case(
        "model from a newer regvi",
        model_dir_newer_format,
        ValueError,
        r"written by a newer regvi \(format 99\)",
    ),
    Case("save over an existing folder", save_over_existing_dir, FileExistsError, r"exists; pass"),
]


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_and_nothing_is_written(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative writes (a payload, mlflow.db, regvi_runs) land here
    action = case.setup(tmp_path)  # builds the bad input
    before = _listing(tmp_path)
    with pytest.raises(case.error, match=case.match):
        action()
    assert _listing(tmp_path) == before  # nothing written, nothing changed, no temp files
    assert not (tmp_path / "PWNED").exists()  # no planted payload ran


RELIABILITY = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def _documented_cases() -> dict[str, list[str]]:
    """{input: [quoted message excerpts]} from the bad-input table in docs/reliability.md."""
    section = RELIABILITY.read_text().split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("input", "---"):
            continue
        name = cells[0].replace("`", "")
        assert name not in rows, f"row {name!r} appears twice in {RELIABILITY.name}"
        rows[name] = re.findall(r"`([^`]*)`", "|".join(cells[1:]))
    return rows


def test_every_documented_case_is_tested():
    """Each row of the documented table is a case of the parametrised test above, by name, and
    the documented message matches what that case expects."""
    documented = _documented_cases()
    assert len(documented) >= 20, f"bad-input table in {RELIABILITY} not found or cut short"
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names), "duplicate case names (pytest would rename the ids)"
    assert not set(documented) - set(names), (
        f"documented but untested: {set(documented) - set(names)}"
    )
    assert not set(names) - set(documented), (
        f"tested but not documented: {set(names) - set(documented)}"
    )
    # the cases are collected as test ids under those names, and nothing skips them
    marks = test_bad_input_is_refused_and_nothing_is_written.pytestmark
    (param,) = [m for m in marks if m.name == "parametrize"]
    assert param.args[1] is CASES and param.kwargs["ids"] == names
    assert not [m.name for m in marks if m.name in ("skip", "skipif", "xfail")]
    for case in CASES:
        excerpts = documented[case.name]
        assert any(re.search(case.match, e) for e in excerpts), (case.name, case.match, excerpts)
