"""Sweep config validation: every bad key/value is refused with a message naming it."""

from __future__ import annotations

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


def test_shipped_sweeps_parse():
    parsed = 0
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        try:
            cfg = load_config(path)
        except ConfigError as err:
            # configs on the shared real data need ../shared/data next to the checkout
            assert "data." in str(err) and "does not exist" in str(err), (path, err)
            continue
        assert cfg.params, path
        parsed += 1
    assert parsed >= 1  # the quickstart uses bundled data and always parses


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
    from regvi.sweep.trial import model_arguments

    static = {"model": {"n_latent": 8}, "model_params": ["n_latent.rna"], "data": cfg.data}
    assert model_arguments(static, {"n_latent.rna": 5}) == {"n_latent": {"atac": 8, "rna": 5}}


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
