"""Covariate registry: key fan-out, validation and encoding (spec §1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import regvi
from regvi.data import CovariateRegistry


def test_library_key_fans_out(sim):
    reg = CovariateRegistry.from_anndata(sim, library_key="library")
    for purpose in ("ambient", "dispersion", "library_size"):
        assert reg.keys_for(purpose) == ["library"]
    assert reg.categories["library"] == ["lib_0", "lib_1", "lib_2"]
    # the decoder is conditioned on the library key by default; feature scaling follows it
    assert reg.keys_for("nn_conditioning") == ["library"]
    assert reg.keys_for("feature_scaling") == ["library"]
    free = CovariateRegistry.from_anndata(
        sim, library_key="library", nn_conditioning_covariate_keys=[]
    )
    assert free.keys_for("nn_conditioning") == [] and free.keys_for("feature_scaling") == []
    explicit = CovariateRegistry.from_anndata(
        sim,
        ambient_covariate_keys="technology",
        dispersion_key="library",
        library_size_key="library",
    )
    assert explicit.keys_for("nn_conditioning") == ["library"]  # the library-size key


def test_batch_key_is_alias(sim):
    a = CovariateRegistry.from_anndata(sim, library_key="library")
    b = CovariateRegistry.from_anndata(sim, batch_key="library")
    assert a.to_dict() == b.to_dict()


def test_feature_scaling_defaults_to_conditioning_keys(sim):
    reg = CovariateRegistry.from_anndata(
        sim, library_key="library", nn_conditioning_covariate_keys=["technology"]
    )
    assert reg.keys_for("feature_scaling") == ["technology"]


@pytest.mark.parametrize(
    "extra",
    [
        {"dispersion_key": "library"},
        {"ambient_covariate_keys": ["technology"]},
        {"library_size_key": "technology"},
    ],
)
def test_library_key_plus_explicit_key_is_error(sim, extra):
    name = next(iter(extra))
    with pytest.raises(ValueError, match=name):
        CovariateRegistry.from_anndata(sim, library_key="library", **extra)


def test_without_library_key_all_three_needed(sim):
    with pytest.raises(ValueError, match="library_size_key"):
        CovariateRegistry.from_anndata(
            sim, ambient_covariate_keys="library", dispersion_key="library"
        )


def test_alias_disagreement(sim):
    with pytest.raises(ValueError, match="alias"):
        CovariateRegistry.from_anndata(sim, library_key="library", batch_key="technology")


def test_missing_key_names_key_and_purpose(sim):
    with pytest.raises(KeyError, match=r"'nope'.*nn_conditioning"):
        CovariateRegistry.from_anndata(
            sim, library_key="library", nn_conditioning_covariate_keys="nope"
        )


def test_nan_in_key(sim):
    sim.obs["library"] = sim.obs["library"].astype(object)
    sim.obs.iloc[3, sim.obs.columns.get_loc("library")] = np.nan
    with pytest.raises(ValueError, match=r"'library'.*1 missing"):
        CovariateRegistry.from_anndata(sim, library_key="library")


def test_dataset_key_validation_lists_offenders(sim):
    sim.obs["dataset"] = np.where(np.arange(sim.n_obs) % 2, "A", "B")  # every library in both
    with pytest.raises(ValueError, match=r"lib_0.*\['A', 'B'\]"):
        CovariateRegistry.from_anndata(sim, library_key="library", dataset_key="dataset")
    sim.obs["dataset"] = np.where(sim.obs["library"] == "lib_0", "A", "B")
    reg = CovariateRegistry.from_anndata(sim, library_key="library", dataset_key="dataset")
    assert reg.keys_for("dataset") == ["dataset"]


def test_unseen_category_error_and_fallback(sim):
    reg = CovariateRegistry.from_anndata(sim, library_key="library")
    obs = sim.obs.copy()
    obs["library"] = obs["library"].astype(str)
    obs.iloc[0, obs.columns.get_loc("library")] = "lib_new"
    with pytest.raises(ValueError, match=r"lib_new.*category_fallback"):
        reg.encode(obs)
    codes = reg.encode(obs, category_fallback={"library": "lib_1"})
    assert codes["ambient"][0, 0] == 1
    with pytest.raises(ValueError, match="not a known category"):
        reg.encode(obs, category_fallback={"library": "lib_x"})


def test_encoding_follows_recorded_categories(sim):
    reg = CovariateRegistry.from_anndata(sim, library_key="library")
    shuffled = sim.obs.iloc[::-1].copy()
    shuffled["library"] = shuffled["library"].astype(str)  # category order lost
    codes = reg.encode(shuffled)["library_size"][:, 0]
    expected = [reg.categories["library"].index(v) for v in shuffled["library"]]
    assert codes.tolist() == expected


def test_continuous_covariates_standardised(sim):
    sim.obs["pct_mito"] = np.linspace(0, 10, sim.n_obs)
    reg = CovariateRegistry.from_anndata(
        sim, library_key="library", continuous_covariate_keys="pct_mito"
    )
    cont = reg.encode(sim.obs)["continuous"]
    assert cont.shape == (sim.n_obs, 1)
    assert abs(cont.mean()) < 1e-5 and abs(cont.std() - 1) < 1e-3
    sim.obs["pct_mito"] = sim.obs["pct_mito"].astype(str)
    with pytest.raises(TypeError, match="pct_mito"):
        CovariateRegistry.from_anndata(
            sim, library_key="library", continuous_covariate_keys="pct_mito"
        )


def test_registry_json_round_trip(sim):
    reg = CovariateRegistry.from_anndata(
        sim, library_key="library", technical_covariate_keys=["technology"]
    )
    assert CovariateRegistry.from_dict(reg.to_dict()) == reg
    with pytest.raises(ValueError, match="not a regvi registry"):
        CovariateRegistry.from_dict({"foo": 1})


def test_parameter_shapes_per_key(sim):
    sim.obs["lane"] = pd.Categorical(np.arange(sim.n_obs) % 5)
    m = regvi.RegVI(
        sim,
        ambient_covariate_keys=["library", "lane"],
        dispersion_key="technology",
        library_size_key="lane",
        feature_scaling_covariate_keys=["technology", "library"],
        n_hidden=16,
        n_latent=3,
    )
    G = sim.n_vars
    assert [tuple(p.shape) for p in m.module.ambient_log] == [(3, G), (5, G)]
    assert tuple(m.module.log_theta_mean.shape) == (2, G)
    assert tuple(m.module.dispersion_rate_raw.shape) == (2,)
    assert tuple(m.module.library_prior_mean.shape) == (5,)
    assert [tuple(p.shape) for p in m.module.feature_scaling_raw] == [(2, G), (3, G)]
    gene_only = regvi.RegVI(sim, library_key="library", dispersion="gene", n_hidden=16, n_latent=3)
    assert tuple(gene_only.module.log_theta_mean.shape) == (1, G)
    # feature scaling follows the decoder conditioning: the library key by default, else none
    assert [tuple(p.shape) for p in gene_only.module.feature_scaling_raw] == [(3, G)]
    free = regvi.RegVI(sim, library_key="library", nn_conditioning_covariate_keys=[], n_latent=3)
    assert [tuple(p.shape) for p in free.module.feature_scaling_raw] == [(1, G)]


def test_single_level_categorical_ignored_in_networks(sim):
    sim.obs["one"] = "x"
    m = regvi.RegVI(
        sim,
        library_key="library",
        nn_conditioning_covariate_keys=["one", "technology"],
        n_hidden=16,
        n_latent=3,
    )
    assert m.module.decoder_cats.n_out == 2  # only technology's two levels


def test_covariate_keys_one_definition():
    """RegVI / RegMultiVI take the CovariateKeys fields (``library_key`` explicitly, the others
    as keyword options split off by CovariateKeys.split) and REGISTRY_ARGS is derived from them."""
    import inspect

    from regvi import RegMultiVI, RegVI
    from regvi.data.registry import REGISTRY_ARGS, CovariateKeys
    from regvi.model import REGISTRY_ARGS as MODEL_REGISTRY_ARGS
    from regvi.sweep.config import DATA_KEYS

    assert REGISTRY_ARGS == MODEL_REGISTRY_ARGS == CovariateKeys.names()
    assert len(REGISTRY_ARGS) == 13 and set(REGISTRY_ARGS) <= DATA_KEYS
    for cls in (RegVI, RegMultiVI):
        params = inspect.signature(cls.__init__).parameters
        assert params["library_key"].default is None, cls
        assert list(params.values())[-1].kind is inspect.Parameter.VAR_KEYWORD, cls
    options = {"labels_key": "cell_type", "n_hidden": 8}
    keys, rest = CovariateKeys.split(options, library_key="library")
    assert keys == CovariateKeys(library_key="library", labels_key="cell_type")
    assert rest == {"n_hidden": 8}
    keys = CovariateKeys.from_kwargs({"library_key": "library", "labels_key": "cell_type"})
    assert CovariateKeys.from_kwargs(keys.as_kwargs()) == keys
    assert keys.columns() == ["cell_type", "library"]
    with pytest.raises(TypeError, match="unknown covariate key"):
        CovariateKeys.from_kwargs({"libary_key": "library"})


def test_from_anndata_takes_keys_or_kwargs(sim):
    from regvi.data.registry import CovariateKeys

    keys = CovariateKeys(library_key="library", layer="counts")
    a = CovariateRegistry.from_anndata(sim, keys)
    b = CovariateRegistry.from_anndata(sim, library_key="library", layer="counts")
    assert a.to_dict() == b.to_dict() and a.layer == "counts"
    with pytest.raises(TypeError, match="not both"):
        CovariateRegistry.from_anndata(sim, keys, labels_key="cell_type")
    with pytest.raises(TypeError, match="unknown covariate key"):
        CovariateRegistry.from_anndata(sim, libary_key="library")
