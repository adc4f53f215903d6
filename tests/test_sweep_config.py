"""Sweep config validation: every bad key/value is refused with a message naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from regvi.sweep.config import ConfigError, load_config, parse_config, redact_uri
from regvi.sweep.space import DefineByRun, grid

REPO = Path(__file__).resolve().parents[1]


def _base(**over):
    cfg = {
        "name": "t",
        "data": {
            "path": "bundled:kang_pbmc_small",
            "library_key": "condition",
            "labels_key": "cell_type",
        },
        "training": {"max_epochs": 3},
        "search": {
            "n_hidden": {"type": "categorical", "values": [16, 32]},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        },
    }
    cfg.update(over)
    return cfg


SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))


def _load_shipped(path: Path):
    """load_config(path); shipped configs name catalogued datasets (``dataset:<name>``), which the
    ``dataset_cache`` fixture fetched from a local HTTP mirror of ../shared/data."""
    return load_config(path)


def test_sweeps_are_shipped():
    assert "quickstart.yaml" in [p.name for p in SHIPPED]  # bundled data: parses everywhere
    assert len(SHIPPED) >= 2, SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweep_parses(path, dataset_cache):
    cfg = _load_shipped(path)
    assert cfg.params, path


def test_relative_data_path_resolves_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.h5ad").write_bytes(b"")
    raw = _base(data={"path": "d.h5ad", "library_key": "x"})
    (tmp_path / "sub" / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "sub" / "c.yaml")
    assert cfg.data["path"] == str((tmp_path / "sub" / "d.h5ad").resolve())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda c: c.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
        (lambda c: c["data"].pop("path"), r"data\.path: missing"),
        (lambda c: c["data"].update(path="missing.h5ad"), "does not exist"),
        (lambda c: c["data"].update(path="bundled:nope"), "unknown bundled"),
        (lambda c: c["data"].pop("library_key"), "needs library_key"),
        (lambda c: c["data"].update(libary_key="x"), "libary_key"),
        (lambda c: c["search"].update(n_hiden={"type": "int", "low": 1, "high": 2}), "n_hiden"),
        (lambda c: c["search"]["lr"].update(low=1e-2, high=1e-4), "empty or inverted range"),
        (lambda c: c["search"]["lr"].update(low=0), "log scale needs low > 0"),
        (lambda c: c["search"]["n_hidden"].update(values=[]), "non-empty list"),
        (lambda c: c["search"]["n_hidden"].update(type="choice"), r"search\.n_hidden\.type"),
        (lambda c: c["search"].update(n_latent={"type": "int", "low": 1.5, "high": 4}), "integer"),
        (lambda c: c["training"].update(max_epochs="ten"), r"training\.max_epochs"),
        (lambda c: c["training"].update(max_epochs=-1), "positive"),
        (lambda c: c["training"].update(compile="yes"), r"training\.compile: 'yes'; expected true"),
        (lambda c: c["training"].update(early_stopping=1), r"training\.early_stopping: 1"),
        (lambda c: c.update(resources={"workers": 0}), r"resources\.workers"),
        (lambda c: c.update(resources={"gpus_per_worker": 1.5}), "gpus_per_worker"),
        (
            lambda c: c.update(objective={"metric": "validation_elbo", "mode": "lowest"}),
            "objective.mode",
        ),
        (lambda c: c.update(search_algorithm={"name": "hyperopt"}), "hyperopt"),
        (lambda c: c.update(search_algorithm={"name": "grid"}), "grid needs categorical"),
        (lambda c: c.update(scheduler={"name": "pbt"}), "scheduler.name"),
        (lambda c: c.update(budget={"trials": 0}), r"budget\.trials"),
        (lambda c: c.update(name="bad name/../x"), "name"),
        (lambda c: c["search"]["lr"].update(when={"nope": 1}), "not a searched parameter"),
        (lambda c: c["training"].update(lr=0.1), r"search\.lr: also fixed"),
        (lambda c: c.update(mlflow={"uri": "x"}), r"mlflow: unknown key"),
        (lambda c: c.update(evaluation={"markers": "no_such.csv"}), "markers"),
        (lambda c: c.update(evaluation={"umap": "yes"}), r"evaluation\.umap: 'yes'; expected true"),
        (lambda c: c.update(model=[1, 2]), "model: expected a mapping"),
    ],
)
def test_bad_configs(mutate, match):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        parse_config(raw, REPO / "sweeps" / "x.yaml")


def test_empty_and_invalid_yaml(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty config"):
        load_config(tmp_path / "e.yaml")
    (tmp_path / "b.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "p.yaml").write_text("!!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "p.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_targets_and_conditional_space():
    raw = _base()
    raw["search"]["regularise_background"] = {"type": "categorical", "values": [False, True]}
    raw["search"]["ambient_prior_beta"] = {
        "type": "loguniform",
        "low": 10,
        "high": 1000,
        "when": {"regularise_background": True},
    }
    cfg = parse_config(raw, REPO / "sweeps" / "x.yaml")
    targets = {p.name: p.target for p in cfg.params}
    assert targets == {
        "n_hidden": "model",
        "lr": "training",
        "regularise_background": "model",
        "ambient_prior_beta": "model",
    }
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(cfg.params)
    seen = []
    for _ in range(20):
        t = study.ask()
        space(t)
        seen.append(t.params)
        study.tell(t, 0.0)
    for params in seen:
        assert ("params/ambient_prior_beta" in params) == params["params/regularise_background"]


def test_grid_expands_conditionals():
    raw = _base(
        search={
            "n_hidden": {"type": "categorical", "values": [16, 32]},
            "regularise_background": {"type": "categorical", "values": [False, True]},
            "ambient_prior_beta": {
                "type": "categorical",
                "values": [10, 100],
                "when": {"regularise_background": True},
            },
        },
        search_algorithm={"name": "grid"},
    )
    points = grid(parse_config(raw, REPO / "sweeps" / "x.yaml"))
    assert len(points) == 2 * (1 + 2)


def test_credentials_are_redacted_in_resolved_config():
    uri = "https://bob:s3cret@mlflow.example.org/?token=abc&x=1"
    cfg = parse_config(_base(mlflow={"tracking_uri": uri}))
    assert cfg.tracking_uri == uri  # used to connect
    shown = str(cfg.resolved())
    assert "s3cret" not in shown and "abc" not in shown and "bob" not in shown
    assert redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert redact_uri("postgresql://u:p@db/x") == "postgresql://***@db/x"


def _multimodal(tmp_path, **over):
    for m in ("atac", "rna"):
        (tmp_path / f"{m}.h5ad").write_bytes(b"")
    cfg = _base(
        data={
            "modalities": {"atac": "atac.h5ad", "rna": "rna.h5ad"},
            "library_key": "batch",
            "labels_key": "cell_type",
        },
        search={"n_latent.rna": {"type": "categorical", "values": [5, 10]}},
    )
    cfg.update(over)
    return cfg


def test_multimodal_config(tmp_path):
    cfg = parse_config(
        _multimodal(tmp_path, model={"n_hidden": {"atac": 64}, "lr_multipliers": {"atac": 2}}),
        tmp_path / "c.yaml",
    )
    assert cfg.multimodal and set(cfg.data_path()) == {"atac", "rna"}
    assert cfg.data_path()["rna"] == str((tmp_path / "rna.h5ad").resolve())
    (p,) = cfg.params
    assert (p.name, p.modality, p.target) == ("n_latent.rna", "rna", "model")
    from dataclasses import replace

    from regvi.sweep.settings import TrialSettings

    settings = replace(TrialSettings.from_config(cfg, tmp_path), model={"n_latent": 8})
    assert settings.model_params == ("n_latent.rna",)
    assert settings.model_arguments({"n_latent.rna": 5}) == {"n_latent": {"atac": 8, "rna": 5}}


def test_multimodal_latent_mode_fixed_or_searched(tmp_path):
    """RegMultiVI's latent_mode (concat blocks / product of experts) is a model option of
    multimodal sweeps: fixed under model, or searched."""
    from regvi.sweep.settings import TrialSettings

    fixed = parse_config(_multimodal(tmp_path, model={"latent_mode": "poe"}), tmp_path / "c.yaml")
    assert fixed.model["latent_mode"] == "poe"
    searched = parse_config(
        _multimodal(
            tmp_path,
            search={"latent_mode": {"type": "categorical", "values": ["concat", "poe"]}},
        ),
        tmp_path / "c.yaml",
    )
    (p,) = searched.params
    assert (p.name, p.modality, p.target) == ("latent_mode", None, "model")
    settings = TrialSettings.from_config(searched, tmp_path)
    assert settings.model_arguments({"latent_mode": "poe"})["latent_mode"] == "poe"
    with pytest.raises(ConfigError, match=r"model.latent_mode: latent_mode='mix'"):
        parse_config(_multimodal(tmp_path, model={"latent_mode": "mix"}), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"search.latent_mode.values\[1\]"):
        parse_config(
            _multimodal(
                tmp_path,
                search={"latent_mode": {"type": "categorical", "values": ["poe", "sum"]}},
            ),
            tmp_path / "c.yaml",
        )
    with pytest.raises(ConfigError, match="'latent_mode'"):  # single-modal: no such option
        parse_config(_base(model={"latent_mode": "poe"}))
    # product-of-experts trials have no latent blocks, so no attribution metrics
    with pytest.raises(ConfigError, match="latent_mode 'concat' in every trial"):
        parse_config(
            _multimodal(
                tmp_path,
                objective={"metric": "attribution_log2_ratio_median", "mode": "max"},
                search={"latent_mode": {"type": "categorical", "values": ["concat", "poe"]}},
            ),
            tmp_path / "c.yaml",
        )
    ok = _multimodal(tmp_path, objective={"metric": "attribution_log2_ratio_median", "mode": "max"})
    assert parse_config(ok, tmp_path / "c.yaml").objective_metrics == [
        "attribution_log2_ratio_median"
    ]


def test_multimodal_modality_dropout_fixed_or_searched(tmp_path):
    """RegMultiVI's modality_dropout is a model option of multimodal sweeps, checked at parse."""
    from regvi.sweep.settings import TrialSettings

    fixed = parse_config(
        _multimodal(tmp_path, model={"modality_dropout": 0.3}), tmp_path / "c.yaml"
    )
    assert fixed.model["modality_dropout"] == 0.3
    searched = parse_config(
        _multimodal(
            tmp_path, search={"modality_dropout": {"type": "uniform", "low": 0.0, "high": 0.6}}
        ),
        tmp_path / "c.yaml",
    )
    (p,) = searched.params
    assert (p.name, p.modality, p.target) == ("modality_dropout", None, "model")
    settings = TrialSettings.from_config(searched, tmp_path)
    assert settings.model_arguments({"modality_dropout": 0.2})["modality_dropout"] == 0.2
    with pytest.raises(ConfigError, match=r"model.modality_dropout: modality_dropout=1.5"):
        parse_config(_multimodal(tmp_path, model={"modality_dropout": 1.5}), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="'modality_dropout'"):  # single-modal: no such option
        parse_config(_base(model={"modality_dropout": 0.3}))


def test_multimodal_kl_multipliers_fixed_or_searched(tmp_path):
    """kl_multipliers: a fixed modality → factor map or searched per modality
    (``kl_multipliers.atac``), positive, and refused where a trial may run ``poe``."""
    from regvi.sweep.settings import TrialSettings

    fixed = parse_config(
        _multimodal(tmp_path, model={"kl_multipliers": {"atac": 0.5}}), tmp_path / "c.yaml"
    )
    assert fixed.model["kl_multipliers"] == {"atac": 0.5}
    searched = parse_config(
        _multimodal(
            tmp_path,
            search={"kl_multipliers.atac": {"type": "loguniform", "low": 0.1, "high": 1.0}},
        ),
        tmp_path / "c.yaml",
    )
    (p,) = searched.params
    assert (p.name, p.modality, p.target) == ("kl_multipliers.atac", "atac", "model")
    settings = TrialSettings.from_config(searched, tmp_path)
    assert settings.model_arguments({"kl_multipliers.atac": 0.2})["kl_multipliers"] == {"atac": 0.2}
    bad = [
        ({"model": {"kl_multipliers": {"atac": 0}}}, r"kl_multipliers\['atac'\]=0; expected a pos"),
        ({"model": {"kl_multipliers": {"protein": 0.5}}}, r"unknown modalities \['protein'\]"),
        (
            {"search": {"kl_multipliers.atac": {"type": "categorical", "values": [0.5, -1]}}},
            r"search.kl_multipliers.atac.values\[1\]: kl_multipliers=-1; expected a positive",
        ),
        (
            {"model": {"kl_multipliers": {"atac": 0.5}, "latent_mode": "poe"}},
            "needs latent_mode 'concat' in every trial",
        ),
        (
            {
                "model": {"kl_multipliers": {"atac": 0.5}},
                "search": {"latent_mode": {"type": "categorical", "values": ["concat", "poe"]}},
            },
            "needs latent_mode 'concat' in every trial",
        ),
    ]
    for over, match in bad:
        with pytest.raises(ConfigError, match=match):
            parse_config(_multimodal(tmp_path, **over), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="'kl_multipliers'"):  # single-modal: no such option
        parse_config(_base(model={"kl_multipliers": {"atac": 0.5}}))


@pytest.mark.parametrize(
    "over, match",
    [
        (
            {"search": {"n_latent.protein": {"type": "int", "low": 2, "high": 5}}},
            "modality 'protein'",
        ),
        (
            {"model": {"n_hidden": {"protein": 3}}},
            r"model.n_hidden: unknown modalities \['protein'\]",
        ),
        (
            {"search": {"disabled_covariates.rna": {"type": "categorical", "values": [[]]}}},
            "cannot be set per modality",
        ),
    ],
)
def test_bad_multimodal_configs(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(_multimodal(tmp_path, **over), tmp_path / "c.yaml")


def test_bad_multimodal_data_sections(tmp_path):
    base = _multimodal(tmp_path)
    cases = [
        ({**base["data"], "path": "x.h5ad"}, "either path"),
        ({**base["data"], "modalities": {"rna": "rna.h5ad"}}, "needs 2\\+ modalities"),
        (
            {**base["data"], "modalities": {"rna": "rna.h5ad", "atac": "nope.h5ad"}},
            "data.modalities.atac: file .* does not exist",
        ),
        ({**base["data"], "counts_modality": "protein"}, "counts_modality: 'protein'"),
    ]
    for data, match in cases:
        with pytest.raises(ConfigError, match=match):
            parse_config({**base, "data": data}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"per-modality mapping needs data\.modalities"):
        parse_config(_base(model={"n_latent": {"rna": 3}}))


# ------------------------------------------------ metric names (issue #13)
def _cli(argv, capsys) -> tuple[int, str, str]:
    from regvi.sweep.__main__ import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_misspelt_objective_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match=r"objective\.metric: 'scib_totl' is not a metric") as e:
        parse_config(_base(objective={"metric": "scib_totl"}), REPO / "sweeps" / "x.yaml")
    assert "closest: 'scib_total'" in str(e.value)
    with pytest.raises(ConfigError, match=r"objective\.metric\[1\]: 'scib_bach'.*'scib_batch'"):
        parse_config(_base(objective={"metric": ["scib_bio", "scib_bach"]}))
    with pytest.raises(ConfigError, match=r"closest: 'validation_elbo'"):
        parse_config(_base(objective={"metric": "validaton_elbo"}))
    with pytest.raises(ConfigError, match=r"objective\.metric: \[3\]; expected a metric name"):
        parse_config(_base(objective={"metric": [3]}))


def _merged(raw: dict, over: dict) -> dict:
    out = dict(raw)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


_NO_LABELS = {"data": {"labels_key": None}}


@pytest.mark.parametrize(
    ("metric", "needs", "off", "on"),
    [
        ("scib_total", "evaluation.scib: true", {"evaluation": {"scib": False}}, {}),
        ("scib_kbet_per_label", "data.labels_key", _NO_LABELS, {}),
        (
            "nc_composite_total",
            "evaluation.neighbourhood: true",
            {"evaluation": {"neighbourhood": False}},
            {},
        ),
        ("nc_composite_total", "evaluation.markers", _NO_LABELS, {}),
        (
            "nc_H7_median_corr_cross_dataset",
            "data.dataset_key",
            {},
            {"data": {"dataset_key": "donor"}},
        ),
        (
            "nc_median_corr_avg_between_condition",
            "data.technical_covariate_keys",
            {},
            {"data": {"technical_covariate_keys": ["condition"]}},
        ),
        (
            "lowcount_q0.25_displacement",
            "evaluation.lowcount: true",
            {},
            {"evaluation": {"lowcount": True}},
        ),
        (
            "validation_elbo",
            "training.validation_fraction > 0",
            {"training": {"validation_fraction": 0.0}, "scheduler": {"name": "fifo"}},
            {},
        ),
        ("train_reconstruction_rna", "data.modalities", {}, None),
        ("attribution_median_atac", "data.modalities", {}, None),
    ],
)
def test_metric_of_a_switched_off_evaluation_is_refused_naming_the_switch(
    tmp_path, metric, needs, off, on
):
    raw = _base(objective={"metric": metric})
    pattern = rf"objective\.metric: '{re.escape(metric)}' is not reported .*needs .*"
    with pytest.raises(ConfigError, match=pattern + re.escape(needs)):
        parse_config(_merged(raw, off), REPO / "sweeps" / "x.yaml")
    # with the switch on, the same objective is accepted
    if on is None:
        cfg = parse_config(_multimodal(tmp_path, objective={"metric": metric}), tmp_path / "c.yaml")
    else:
        cfg = parse_config(_merged(raw, on), REPO / "sweeps" / "x.yaml")
    assert cfg.objective_metrics == [metric]


def test_a_searched_validation_fraction_that_may_be_zero_disables_validation_metrics():
    raw = _base(objective={"metric": "scib_total"}, scheduler={"name": "fifo"})
    raw["search"]["validation_fraction"] = {"type": "categorical", "values": [0.0, 0.1]}
    parse_config(raw)  # a final objective: fine
    raw["objective"] = {"metric": "validation_elbo"}
    with pytest.raises(ConfigError, match=r"search\.validation_fraction may be 0"):
        parse_config(raw)


def test_asha_needs_a_per_epoch_metric_the_trials_report():
    off = {"training": {"max_epochs": 3, "validation_fraction": 0.0}}
    with pytest.raises(ConfigError, match=r"scheduler: ASHA prunes on .*'validation_elbo'"):
        parse_config(_base(**off, objective={"metric": "scib_total"}))
    # FIFO, or ASHA on a per-epoch objective the trials do report, are fine
    parse_config(_base(**off, objective={"metric": "scib_total"}, scheduler={"name": "fifo"}))
    cfg = parse_config(_base(**off, objective={"metric": "train_elbo"}))
    from regvi.sweep.runner import asha_metric, final_only_objective

    assert asha_metric(cfg) == ("train_elbo", "min") and not final_only_objective(cfg)
    cfg = parse_config(_base(objective={"metric": "training_wall_s", "mode": "min"}))
    assert final_only_objective(cfg)  # a final-report metric, whatever its prefix


def test_list_metrics_works_even_when_the_objective_is_misspelt(tmp_path, capsys):
    raw = _base(objective={"metric": "scib_totl"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    rc, out, err = _cli([tmp_path / "c.yaml", "--list-metrics"], capsys)
    assert rc == 0, err
    assert "scib_total" in out and "low-count robustness [final report]: off" in out


def _h5ad(tmp_path: Path, name: str = "atlas.h5ad", **change) -> Path:
    import regvi

    a = regvi.simulate(n_cells=120, n_genes=30, n_cell_types=2, n_libraries=2, seed=0)
    del a.uns["truth"]
    for key, value in change.items():
        setattr(a, key, value) if key == "X" else a.obs.__setitem__(key, value)
    a.write_h5ad(tmp_path / name)
    return tmp_path / name


def _sim_config(tmp_path: Path, **over) -> Path:
    raw = {
        "name": "sim",
        "data": {"path": "atlas.h5ad", "library_key": "library", "labels_key": "cell_type"},
        "search": {"n_hidden": {"type": "categorical", "values": [16, 32]}},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(raw.get(k), dict) else v
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "c.yaml"


def test_dry_run_refuses_a_misspelt_objective(tmp_path, capsys):
    _h5ad(tmp_path)
    cfg = _sim_config(tmp_path, objective={"metric": "scib_totl"})
    rc, _, err = _cli([cfg, "--dry-run"], capsys)
    assert rc == 2
    assert "objective.metric: 'scib_totl'" in err and "'scib_total'" in err
    assert not (tmp_path / "runs").exists()


def test_dry_run_refuses_a_misspelt_library_key_naming_key_and_file(tmp_path, capsys):
    path = _h5ad(tmp_path)
    rc, out, err = _cli([_sim_config(tmp_path), "--dry-run"], capsys)
    assert rc == 0, err
    assert f"{path}: 120 cells x 30 features, counts in X" in out
    rc, _, err = _cli([_sim_config(tmp_path, data={"library_key": "librar"}), "--dry-run"], capsys)
    assert rc == 2
    assert f"data.library_key: 'librar' is not an obs column of {path}" in err
    assert "closest: ['library']" in err
    assert not (tmp_path / "runs").exists()


def _non_integer(tmp_path):
    import regvi

    a = regvi.simulate(n_cells=120, n_genes=30, n_cell_types=2, n_libraries=2, seed=0)
    return {"X": a.X.astype("float32") * 0.5}


@pytest.mark.parametrize(
    ("change", "over", "match"),
    [
        ({}, {"data": {"labels_key": "celltype"}}, r"data\.labels_key: 'celltype' is not an obs"),
        ({}, {"data": {"layer": "counts"}}, r"data\.layer: 'counts' is not a layer of .*atlas"),
        (
            {},
            {"data": {"technical_covariate_keys": ["library", "lane"]}},
            r"data\.technical_covariate_keys: 'lane'",
        ),
        (_non_integer, {}, r"non-integer values \(e\.g\. .*set data\.layer to the counts layer"),
        (
            {"library": ["a", None] * 60},
            {},
            r"data \(.*atlas\.h5ad\): obs\['library'\] has 60 missing",
        ),
        (
            {"donor": ["d0", "d1"] * 60},
            {"data": {"dataset_key": "donor"}},
            r"every 'library' level must belong to exactly one dataset",
        ),
        (
            {},
            {"data": {"library_key": "library", "dispersion_key": "library"}},
            r"do not also give dispersion_key",
        ),
        (
            {},
            {"evaluation": {"markers": ["GENE_A", "GENE_B"]}},
            r"evaluation\.markers: 0 of the genes in the list are in the var_names of .*atlas",
        ),
    ],
)
def test_dry_run_data_checks(tmp_path, capsys, change, over, match):
    from regvi.sweep.data_check import check_data_files

    _h5ad(tmp_path, **(change(tmp_path) if callable(change) else change))
    cfg = load_config(_sim_config(tmp_path, **over))
    with pytest.raises(ConfigError, match=match):
        check_data_files(cfg)
    rc, _, err = _cli([tmp_path / "c.yaml", "--dry-run"], capsys)
    assert rc == 2 and f"error: data check ({tmp_path / 'c.yaml'}): " in err


def test_dry_run_checks_each_modality_file(tmp_path):
    import regvi
    from regvi.sweep.data_check import check_data_files

    data = regvi.simulate_multiome(n_cells=60, n_genes=20, n_peaks=40, n_libraries=2, seed=0)
    raw = _multimodal(tmp_path)  # empty placeholder files, replaced by real ones below

    def check(mods=data, **data_over):
        for m, a in mods.items():
            a.write_h5ad(tmp_path / f"{m}.h5ad")
        cfg = parse_config({**raw, "data": {**raw["data"], **data_over}}, tmp_path / "c.yaml")
        return check_data_files(cfg)

    found = check(library_key="library")
    assert [f.modality for f in found.files] == ["atac", "rna"] and found.levels["library"] == 2
    with pytest.raises(ConfigError, match=r"data\.library_key: 'batch' is not an obs column of "):
        check()  # _multimodal's library_key: in neither file
    with pytest.raises(ConfigError, match=r"data\.layer: 'peaks' is not a layer of .*atac\.h5ad"):
        check(library_key="library", layer={"atac": "peaks"})
    with pytest.raises(ConfigError, match=r"'atac' \(50 cells\) and 'rna' \(60 cells\)"):
        check({"atac": data["atac"][:50].copy(), "rna": data["rna"]}, library_key="library")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_sweep_passes_dry_run(path, capsys, dataset_cache):
    _load_shipped(path)
    rc, out, err = _cli([path, "--dry-run"], capsys)
    assert rc == 0, (path, err)
    assert "cells x" in out, path


# ------------------------------- the name lists against the real training and evaluation
def _names_config(tmp_path: Path, **over) -> object:
    (tmp_path / "d.h5ad").write_bytes(b"")
    raw = _base(data={"path": "d.h5ad", "library_key": "library", "labels_key": "cell_type"})
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(raw.get(k), dict) else v
    return parse_config(raw, tmp_path / "c.yaml")


def test_epoch_and_attribution_names_match_real_training(tmp_path):
    import math

    import numpy as np

    import regvi
    from regvi.sweep.metric_names import attribution_metric_names, reported_metrics

    a = regvi.simulate(n_cells=120, n_genes=20, n_cell_types=2, n_libraries=2, seed=0)
    model = regvi.RegVI(a, library_key="library", n_hidden=8, n_latent=2)
    model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    cfg = _names_config(tmp_path)
    assert set(model.history.columns) == set(reported_metrics(cfg, per_epoch=True))

    data = regvi.simulate_multiome(n_cells=80, n_genes=20, n_peaks=40, n_libraries=2, seed=0)
    mm = regvi.RegMultiVI(data, library_key="library", n_hidden=8, n_latent=2)
    mm.train(max_epochs=1, early_stopping=False, progress_bar=False)
    mcfg = parse_config(_multimodal(tmp_path), tmp_path / "c.yaml")
    assert set(mm.history.columns) == set(reported_metrics(mcfg, per_epoch=True))
    summary = mm.get_modality_attribution(indices=np.arange(40), batch_size=64).summary()
    produced = {k for k, v in summary.items() if math.isfinite(v)}
    assert produced == set(attribution_metric_names(["rna", "atac"]))
    # training without validation reports no validation_* metric
    no_val = regvi.RegVI(a, library_key="library", n_hidden=8, n_latent=2)
    no_val.train(max_epochs=1, validation_fraction=0, early_stopping=False, progress_bar=False)
    cfg = _names_config(
        tmp_path, training={"validation_fraction": 0.0}, objective={"metric": "train_elbo"}
    )
    assert set(no_val.history.columns) == set(reported_metrics(cfg, per_epoch=True))


def test_trial_bookkeeping_names_are_the_trials():
    import inspect

    from regvi.sweep import trial_eval, worker
    from regvi.sweep.metric_names import EVAL_BOOKKEEPING, TRIAL_BOOKKEEPING

    stamps = dict.fromkeys(("enter", "imports", "data", "model", "trained"), 0.0)
    setup = set(worker._setup_seconds(stamps, 0.0))
    assert setup <= set(TRIAL_BOOKKEEPING)
    source = inspect.getsource(worker.train_worker) + inspect.getsource(trial_eval.evaluate_trial)
    for name in set(TRIAL_BOOKKEEPING) - setup:
        assert f'"{name}"' in source, name
    for name in ("eval_seconds_total", "eval_in_pool", "eval_warm"):
        assert name in EVAL_BOOKKEEPING and f'"{name}"' in source


#: names only the trial adds around the evaluation (not from evaluation.evaluate)
_TRIAL_ONLY = {"eval_seconds_total", "eval_in_pool", "eval_warm"}


def _final_names(cfg) -> set[str]:
    from regvi.sweep.metric_names import TRIAL_BOOKKEEPING, reported_metrics

    names = set(reported_metrics(cfg, per_epoch=False)) - set(TRIAL_BOOKKEEPING) - _TRIAL_ONLY
    return {n for n in names if not n.startswith("attribution_")}


@pytest.mark.slow
def test_evaluation_names_match_a_real_evaluation(tmp_path):
    """Every switch on (labels, scib, dataset and technical keys, low-count), then a minimal
    evaluation: the finite metrics produced are exactly the predicted names."""
    import numpy as np

    import regvi
    from evaluation.evaluate import evaluate
    from evaluation.reference import unintegrated_pca

    a = regvi.simulate(
        n_cells=400, n_genes=60, n_cell_types=3, n_libraries=4, n_technologies=2, seed=3
    )
    a.obs["dataset"] = np.where(a.obs["library"].isin(["lib_0", "lib_1"]), "d0", "d1")
    a.obsm["X_pca"] = unintegrated_pca(a.X, n_comps=8)
    rng = np.random.default_rng(0)

    def encode(X, idx):
        return a.obsm["X_pca"][idx] + rng.normal(0, 0.1, (len(idx), 8))

    ev = evaluate(
        a,
        "X_pca",
        "library",
        "cell_type",
        dataset_key="dataset",
        technical_keys=["technology"],
        n_subsample=None,
        encode=encode,
    )
    produced = {k for k, v in ev.metrics.items() if np.isfinite(v)}
    cfg = _names_config(
        tmp_path,
        data={"dataset_key": "dataset", "technical_covariate_keys": ["technology"]},
        evaluation={"scib": True, "neighbourhood": True, "lowcount": True},
    )
    expected = _final_names(cfg)
    assert produced == expected, (sorted(produced - expected), sorted(expected - produced))

    genes = [str(g) for g in a.var_names[:12]]
    ev = evaluate(a, "X_pca", "library", markers=genes, scib=False, n_subsample=None)
    produced = {k for k, v in ev.metrics.items() if np.isfinite(v)}
    cfg = _names_config(
        tmp_path,
        data={"path": "d.h5ad", "library_key": "library"},
        evaluation={"scib": False, "markers": genes},
        objective={"metric": "validation_elbo"},
    )
    expected = _final_names(cfg)
    assert produced == expected, (sorted(produced - expected), sorted(expected - produced))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"model": {"use_ambient": "False"}}, r"model\.use_ambient: .*expected True or False"),
        ({"model": {"n_latent": "128"}}, r"model\.n_latent: .*expected an integer"),
        ({"training": {"lr": "1e-3"}}, r"training\.lr: .*YAML reads 1e-3 as a string"),
        ({"training": {"validation_fraction": 1.5}}, r"training\.validation_fraction"),
        (
            {"search": {"library_residual": {"type": "categorical", "values": [True, "False"]}}},
            r"search\.library_residual\.values\[1\]: .*expected True or False",
        ),
    ],
)
def test_model_and_training_values_are_type_checked_before_ray(extra, message):
    from regvi.sweep.config import ConfigError, parse_config

    base = {"data": {"path": "bundled:kang_pbmc_small", "library_key": "sample"}}
    with pytest.raises(ConfigError, match=message):
        parse_config({**base, **extra}, Path("x.yaml"))


# ------------------------------------------------------------- searched covariate purposes
def test_covariate_purposes_are_searchable_as_categorical_obs_keys():
    from regvi.sweep.config import decode_data_value

    raw = _base()
    raw["search"]["nn_conditioning_covariate_keys"] = {
        "type": "categorical",
        "values": [None, "condition", ["condition", "cell_type"]],
    }
    raw["search"]["feature_scaling_covariate_keys"] = {
        "type": "categorical",
        "values": [[], "condition"],
    }
    cfg = parse_config(raw, REPO / "sweeps" / "x.yaml")
    params = {p.name: p for p in cfg.params}
    assert params["nn_conditioning_covariate_keys"].target == "data"
    values = params["nn_conditioning_covariate_keys"].values
    # Optuna / Tune / MLflow hold primitives: lists travel as JSON text and decode back
    assert values == [None, "condition", '["condition", "cell_type"]']
    assert [decode_data_value(v) for v in values] == [
        None,
        "condition",
        ["condition", "cell_type"],
    ]
    assert decode_data_value(params["feature_scaling_covariate_keys"].values[0]) == []
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(cfg.params)
    seen = set()
    for _ in range(30):
        t = study.ask()
        space(t)
        seen.add(t.params["params/nn_conditioning_covariate_keys"])
        study.tell(t, 0.0)
    assert seen == set(values)
    assert (
        len(
            grid(
                parse_config(
                    {
                        **raw,
                        "search": {
                            "nn_conditioning_covariate_keys": raw["search"][
                                "nn_conditioning_covariate_keys"
                            ]
                        },
                    }
                )
            )
        )
        == 3
    )


def test_trial_data_arguments_decode_searched_purposes(tmp_path):
    from dataclasses import replace

    from regvi.sweep.settings import TrialSettings

    settings = replace(
        TrialSettings.from_config(parse_config(_base()), tmp_path),
        data={"path": "x.h5ad", "library_key": "sample"},
        data_params=("nn_conditioning_covariate_keys", "feature_scaling_covariate_keys"),
    )
    params = {
        "nn_conditioning_covariate_keys": '["donor", "tech"]',
        "feature_scaling_covariate_keys": None,
        "n_hidden": 32,
    }
    data = settings.data_arguments(params)
    assert data == {
        "path": "x.h5ad",
        "library_key": "sample",
        "nn_conditioning_covariate_keys": ["donor", "tech"],
        "feature_scaling_covariate_keys": None,
    }
    assert settings.data == {"path": "x.h5ad", "library_key": "sample"}  # not changed


@pytest.mark.parametrize(
    ("search", "message"),
    [
        (
            {"library_key": {"type": "categorical", "values": ["condition", "cell_type"]}},
            r"search\.library_key: 'library_key' cannot be searched: it defines what every trial",
        ),
        (
            {"labels_key": {"type": "categorical", "values": ["cell_type"]}},
            r"search\.labels_key: 'labels_key' cannot be searched",
        ),
        (
            {"technical_covariate_keys": {"type": "categorical", "values": [None, ["donor"]]}},
            r"search\.technical_covariate_keys: 'technical_covariate_keys' cannot be searched: "
            r"it defines what every trial",
        ),
        (
            {"dispersion_key": {"type": "categorical", "values": ["donor"]}},
            r"search\.dispersion_key: 'dispersion_key' cannot be searched: it is set by the "
            r"fixed library_key",
        ),
        (
            {"nn_conditioning_covariate_keys": {"type": "uniform", "low": 0, "high": 1}},
            r"search\.nn_conditioning_covariate_keys\.type: 'uniform'; a covariate purpose is "
            r"searched as categorical",
        ),
        (
            {"encoder_covariate_keys": {"type": "categorical", "values": [None, 3]}},
            r"search\.encoder_covariate_keys\.values\[1\]: 3; expected null \(the default\), an "
            r"obs column name",
        ),
        (
            {"encoder_covariate_keys": {"type": "categorical", "values": ["a", ["a"], "a"]}},
            r"search\.encoder_covariate_keys\.values: .* lists a value twice",
        ),
        (
            {"nn_conditioning_covariate_keys": {"type": "categorical", "values": ["[x]"]}},
            r"'\[x\]' is not an obs column name",
        ),
    ],
)
def test_bad_searched_covariate_purposes_are_refused(search, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_base(search=search), REPO / "sweeps" / "x.yaml")


def test_searched_purpose_also_fixed_under_data_is_refused():
    raw = _base(
        search={"nn_conditioning_covariate_keys": {"type": "categorical", "values": [None]}}
    )
    raw["data"]["nn_conditioning_covariate_keys"] = "condition"
    with pytest.raises(ConfigError, match=r"search\.nn_conditioning_covariate_keys: also fixed"):
        parse_config(raw, REPO / "sweeps" / "x.yaml")


def test_dry_run_checks_every_searched_purpose_value_against_obs(tmp_path, capsys):
    from regvi.sweep.data_check import check_data_files

    _h5ad(tmp_path, technology=["t0", "t1", "t1"] * 40)
    good = {
        "n_hidden": {"type": "categorical", "values": [16, 32]},
        "nn_conditioning_covariate_keys": {
            "type": "categorical",
            "values": [None, "technology", ["technology", "library"]],
        },
    }
    summary = check_data_files(load_config(_sim_config(tmp_path, search=good)))
    assert summary.levels["library"] == 2
    bad = dict(good)
    bad["nn_conditioning_covariate_keys"] = {
        "type": "categorical",
        "values": [None, ["technology", "technolgy"]],
    }
    with pytest.raises(
        ConfigError,
        match=r"search\.nn_conditioning_covariate_keys\.values\[1\] = \['technology', "
        r"'technolgy'\]: data\.nn_conditioning_covariate_keys: 'technolgy' is not an obs "
        r"column .*closest: \['technology'\]",
    ):
        check_data_files(load_config(_sim_config(tmp_path, search=bad)))
    rc, _, err = _cli([tmp_path / "c.yaml", "--dry-run"], capsys)
    assert rc == 2 and "search.nn_conditioning_covariate_keys.values[1]" in err
    assert not (tmp_path / "runs").exists()
    # a value the registry refuses (NaN in the column) is named too
    _h5ad(tmp_path, technology=["t0", None, "t1"] * 40)
    nan = {"encoder_covariate_keys": {"type": "categorical", "values": [None, "technology"]}}
    with pytest.raises(
        ConfigError,
        match=r"search\.encoder_covariate_keys\.values\[1\] = 'technology': .*missing",
    ):
        check_data_files(load_config(_sim_config(tmp_path, search=nan)))


def test_evaluation_metric_prefixes_cover_final_metrics(tmp_path):
    """Every final-report metric is trial bookkeeping or has an evaluation prefix."""
    from regvi.sweep.metric_names import (
        EVALUATION_METRIC_PREFIXES,
        TRIAL_BOOKKEEPING,
        metric_families,
    )

    raw = _multimodal(tmp_path)
    raw["data"]["technical_covariate_keys"] = ["lane"]
    raw["data"]["dataset_key"] = "dataset"
    raw["evaluation"] = {"lowcount": True}
    for cfg in (parse_config(_base()), parse_config(raw, tmp_path / "c.yaml")):
        for family in metric_families(cfg):
            if family.per_epoch:
                continue
            for name in family.names:
                assert name in TRIAL_BOOKKEEPING or name.startswith(EVALUATION_METRIC_PREFIXES)


# ------------------------------------------------------------- the settings a trial runs with
def test_trial_settings_carry_the_config_to_the_worker(tmp_path):
    """One frozen TrialSettings from the config; a trial's sampled values merged in; it pickles
    (Ray sends it to the Train workers) and the epoch default is MODEL_EPOCHS's."""
    import dataclasses
    import pickle

    from regvi.sweep.settings import EvaluationSettings, TrialSettings

    raw = _base(
        evaluation={"n_subsample": 500, "umap": False},
        resources={"workers": 2, "cpus_per_worker": 2, "gpus_per_worker": 0.5},
        search={
            "n_hidden": {"type": "categorical", "values": [16, 32]},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "nn_conditioning_covariate_keys": {
                "type": "categorical",
                "values": [None, ["condition", "cell_type"]],
            },
        },
    )
    cfg = parse_config(raw)
    settings = TrialSettings.from_config(cfg, tmp_path / "sweep")
    assert (settings.model_params, settings.train_params) == (("n_hidden",), ("lr",))
    assert settings.data_params == ("nn_conditioning_covariate_keys",)
    assert settings.evaluation == EvaluationSettings(n_subsample=500, umap=False)
    assert settings.evaluation.pool and settings.evaluation.scib  # the defaults
    assert settings.train_storage == str(tmp_path / "sweep" / "train")
    assert settings.resources_per_worker == {"CPU": 2.0, "GPU": 0.5} and settings.use_gpu
    assert settings.max_epochs == 3 and settings.train_kwargs == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1
    params = {"n_hidden": 32, "lr": 0.01, "nn_conditioning_covariate_keys": '["condition"]'}
    trial = settings.for_trial(params, trial_start=1.0, divergence_file="x/DIVERGED")
    assert trial.model == {"n_hidden": 32}
    assert trial.training == {"max_epochs": 3, "lr": 0.01}
    assert trial.data["nn_conditioning_covariate_keys"] == ["condition"]
    assert (trial.trial_start, trial.divergence_file) == (1.0, "x/DIVERGED")
    assert settings.model == {} and settings.trial_start is None  # the sweep's are unchanged
    assert pickle.loads(pickle.dumps(trial)) == trial
    no_epochs = dataclasses.replace(settings, training={})
    from regvi.training import MODEL_EPOCHS

    assert no_epochs.max_epochs == MODEL_EPOCHS.max_epochs == 400


def test_scheduler_max_t_is_refused_naming_max_epochs():
    raw = _base(scheduler={"name": "asha", "max_t": 50})
    with pytest.raises(
        ConfigError, match=r"scheduler\.max_t: 50; not supported.*training\.max_epochs"
    ):
        parse_config(raw)
    parse_config(_base(scheduler={"name": "asha", "grace_period": 2}))  # without it: accepted


@pytest.mark.parametrize(
    ("training", "search", "where"),
    [
        ({"max_epochs": 100, "n_epochs_kl_warmup": 100}, {}, r"training\.n_epochs_kl_warmup"),
        (
            {"max_epochs": 400},
            {"n_epochs_kl_warmup": {"type": "categorical", "values": [50, 400]}},
            r"search\.n_epochs_kl_warmup: 400",
        ),
        ({}, {"n_epochs_kl_warmup": {"type": "int", "low": 10, "high": 500}}, r"500"),
    ],
)
def test_kl_warmup_must_end_before_max_epochs(training, search, where):
    raw = _base(training=training)
    raw["search"] = {**raw["search"], **search}
    with pytest.raises(ConfigError, match=where + r".* not below max_epochs"):
        parse_config(raw)


def test_kl_warmup_below_max_epochs_accepted():
    raw = _base(training={"max_epochs": 401})
    raw["search"] = {"n_epochs_kl_warmup": {"type": "categorical", "values": [50, 400]}}
    assert parse_config(raw).params[0].values == [50, 400]
