"""Multimodal RegMultiVI (spec §6): joint latent, masking, attribution, validation, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import regvi
from regvi.attribution import full_jacobian, modality_attribution
from regvi.data import make_loader
from regvi.training import TrainingPlan, TrainSettings


def _paired(n_cells=240, seed=0, **kw):
    return regvi.simulate_multiome(
        n_cells=n_cells, n_genes=40, n_peaks=120, n_cell_types=3, n_libraries=3, seed=seed, **kw
    )


@pytest.fixture
def paired():
    return _paired()


@pytest.fixture(scope="module")
def mm_trained():
    data = _paired(n_cells=300, seed=3)
    model = regvi.RegMultiVI(
        data,
        library_key="library",
        labels_key="cell_type",
        n_hidden=32,
        n_latent={"atac": 3, "rna": 4},
    )
    model.train(max_epochs=3, early_stopping=False, progress_bar=False)
    return model, data


def _first_batch(model, n=64):
    return next(iter(make_loader(model._dataset(), np.arange(n), n, shuffle=False)))


# ---------------------------------------------------------------- structure and defaults
def test_latent_order_sizes_and_modality_defaults(paired):
    model = regvi.RegMultiVI(
        {"rna": paired["rna"], "atac": paired["atac"]},  # given RNA first: order is alphabetical
        library_key="library",
        n_latent={"rna": 5, "atac": 3},
        n_hidden={"atac": 16},
    )
    assert model.modalities == ["atac", "rna"]
    assert model.module.slices == {"atac": slice(0, 3), "rna": slice(3, 8)}
    atac, rna = model.config.configs["atac"], model.config.configs["rna"]
    assert (atac.n_hidden, rna.n_hidden) == (16, 128)
    assert atac.n_latent_decoder == rna.n_latent_decoder == 8  # joint z feeds every decoder
    assert model.module.mods["atac"].decoder.body.linears[0].in_features == 8
    # defaults by modality kind (spec §6)
    assert (rna.use_ambient, rna.use_feature_scaling) == (True, False)
    assert (atac.use_ambient, atac.use_feature_scaling) == (False, True)
    assert atac.library_centring_sensitivity == 0.2 and rna.library_centring_sensitivity == 1.0
    # ATAC centring 0.2: the centred library prior mean averages log 0.2 over libraries
    m_p = model.module.mods["atac"].library_prior_mean
    assert float(m_p.mean()) == pytest.approx(np.log(0.2), abs=1e-5)
    z = model.get_latent_representation()
    assert z.shape == (240, 8)
    blocks = model.get_modality_latents()
    np.testing.assert_array_equal(blocks["rna"], z[:, 3:])
    np.testing.assert_array_equal(model.get_latent_representation(modality="atac"), z[:, :3])


def test_train_logs_totals_and_per_modality_terms(mm_trained):
    model, _ = mm_trained
    h = model.history
    assert len(h) == 3
    for split in ("train", "validation"):
        for term in ("loss", "elbo", "reconstruction", "kl_z", "kl_library", "global"):
            assert h[f"{split}_{term}"].notna().all()
        for m in ("atac", "rna"):
            for term in ("reconstruction", "kl_z", "kl_library", "global", "theta_mean"):
                assert np.isfinite(h[f"{split}_{term}_{m}"]).all(), (split, term, m)
        parts = h[f"{split}_reconstruction_atac"] + h[f"{split}_reconstruction_rna"]
        np.testing.assert_allclose(h[f"{split}_reconstruction"], parts, rtol=1e-5)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]


def test_loss_reuses_single_modal_terms_and_plate_rule(paired):
    model = regvi.RegMultiVI(paired, library_key="library", n_hidden=16, n_latent=3)
    module = model.module.eval()
    batch = _first_batch(model)
    torch.manual_seed(0)
    out = module.loss(batch, n_obs=240, sample=False)
    inf = module.inference(batch, sample=False)
    gen = module.generative(inf["z"], inf, batch, sample_theta=False)
    for m in model.modalities:
        view = module.modality_batch(batch, m)
        local = module.mods[m].local_terms(view, inf["modalities"][m], gen[m])
        assert float(out[f"reconstruction_{m}"]) == pytest.approx(
            float(local["reconstruction"].mean()), rel=1e-6
        )
    assert float(out["elbo"]) == pytest.approx(
        float(out["reconstruction"] + out["kl_z"] + out["kl_library"]), rel=1e-6
    )
    half = module.loss(batch, n_obs=120, sample=False)
    assert float(half["global"]) == pytest.approx(2 * float(out["global"]), rel=1e-5)
    with pytest.raises(ValueError, match="n_obs=10 is smaller than the minibatch"):
        module.loss(batch, n_obs=10)


def test_missing_modality_is_masked(paired):
    atac = paired["atac"].copy()
    missing = np.arange(0, 240, 3)  # every third cell has no ATAC
    X = atac.X.tolil()
    X[missing] = 0
    atac.X = X.tocsr()
    atac.X.eliminate_zeros()
    model = regvi.RegMultiVI(
        {"atac": atac, "rna": paired["rna"]}, library_key="library", n_hidden=16, n_latent=3
    )
    module = model.module.eval()
    data = model._dataset()
    batch = next(iter(make_loader(data, missing, len(missing), shuffle=False)))
    assert not batch["modalities"]["atac"]["observed"].any()
    out = module.loss(batch, n_obs=240, sample=True, kl_weight=1.0)
    for term in ("reconstruction_atac", "kl_z_atac", "kl_library_atac"):
        assert float(out[term]) == 0.0, term
    assert float(out["reconstruction_rna"]) > 0
    # at inference the missing block is the prior mean; the observed block is encoded
    z = model.get_latent_representation()
    np.testing.assert_array_equal(z[missing, :3], 0.0)
    observed = np.setdiff1d(np.arange(240), missing)
    assert np.abs(z[observed, :3]).sum() > 0
    h = model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    assert np.isfinite(h["train_loss"]).all()


def test_lr_multipliers_become_parameter_groups(paired):
    model = regvi.RegMultiVI(
        paired, library_key="library", n_hidden=16, n_latent=2, lr_multipliers={"atac": 0.5}
    )
    plan = TrainingPlan(model.module, 200, TrainSettings(lr=2e-3))
    opt = plan.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"atac": pytest.approx(1e-3), "rna": pytest.approx(2e-3)}
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.module.parameters())


def test_covariate_switches_per_modality(paired):
    for d in paired.values():
        d.obs["tech"] = pd.Categorical(np.where(np.arange(240) % 2, "a", "b"))
    model = regvi.RegMultiVI(
        paired,
        library_key="library",
        nn_conditioning_covariate_keys="tech",
        n_hidden=16,
        n_latent=2,
        disabled_covariates={"atac": ["nn_conditioning", "dispersion"], "rna": ["ambient"]},
    )
    atac, rna = model.config.configs["atac"], model.config.configs["rna"]
    assert atac.n_cats_decoder == [] and rna.n_cats_decoder == [2]
    assert atac.n_dispersion_groups == 1 and rna.n_dispersion_groups == 3
    assert rna.n_ambient_per_key == [1]
    assert model.module.mods["atac"].log_theta_mean.shape == (1, 120)
    batch = _first_batch(model)
    view = model.module.modality_batch(batch, "rna")
    assert int(view["ambient"].max()) == 0 and "nn_conditioning" in view
    assert "nn_conditioning" not in model.module.modality_batch(batch, "atac")
    h = model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    assert np.isfinite(h["train_loss"]).all()


def test_three_modalities(paired):
    rng = np.random.default_rng(0)
    protein = AnnData(
        X=sp.csr_matrix(rng.poisson(20, (240, 8)).astype(np.int32)), obs=paired["rna"].obs.copy()
    )
    protein.var_names = [f"adt_{i}" for i in range(8)]
    data = {**paired, "protein": protein}
    model = regvi.RegMultiVI(data, library_key="library", n_hidden=16, n_latent=2)
    assert model.modalities == ["atac", "protein", "rna"]
    assert model.get_latent_representation().shape == (240, 6)
    model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    attr = model.get_modality_attribution(batch_size=100)
    assert {"jacobian_atac", "jacobian_protein", "jacobian_rna"} <= set(attr.per_cell)
    assert "log2_ratio" not in attr.per_cell
    s = attr.summary()
    share = sum(s[f"attribution_share_led_{m}"] for m in model.modalities)
    assert share == pytest.approx(1.0)


# ---------------------------------------------------------------- attribution
def test_jacobian_attribution_matches_full_jacobian_and_finite_differences(paired):
    model = regvi.RegMultiVI(
        paired, library_key="library", n_hidden=16, n_latent={"atac": 3, "rna": 2}
    )
    module = model.module.double().eval()
    batch = _first_batch(model, 16)
    batch = {
        k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in batch.items()
    }
    z = torch.randn(16, 5, dtype=torch.float64)
    res = modality_attribution(module, z, batch)
    g_atac = 120
    for cell in (0, 7, 15):
        J = full_jacobian(module, z, batch, cell)  # (120 + 40, 5)
        assert J.shape == (160, 5)
        blocks = {"atac": slice(0, 3), "rna": slice(3, 5)}
        rows = {"atac": slice(0, g_atac), "rna": slice(g_atac, 160)}
        for d, dec in enumerate(["atac", "rna"]):
            for b, blk in enumerate(["atac", "rna"]):
                ref = float((J[rows[dec], blocks[blk]] ** 2).sum())
                assert res["block_sq"][cell, d, b] == pytest.approx(ref, rel=1e-8)
            np.testing.assert_allclose(
                res["per_dim"][dec][cell], J[rows[dec]].abs().mean(0).numpy(), rtol=1e-8
            )
        # central finite differences of one latent column
        j, h = 3, 1e-6
        zp, zm = z.clone(), z.clone()
        zp[cell, j] += h
        zm[cell, j] -= h
        with torch.no_grad():
            fp = torch.cat(list(module.decoder_rates(zp, batch).values()), -1)[cell]
            fm = torch.cat(list(module.decoder_rates(zm, batch).values()), -1)[cell]
        np.testing.assert_allclose(((fp - fm) / (2 * h)).numpy(), J[:, j].numpy(), atol=1e-6)


def test_attribution_api_summary_and_plot(mm_trained, tmp_path):
    model, _ = mm_trained
    attr = model.get_modality_attribution(batch_size=128)
    pc = attr.per_cell
    assert len(pc) == 300 and list(pc.index[:2]) == ["cell_0", "cell_1"]
    np.testing.assert_allclose(
        pc["log2_ratio"], np.log2(pc["jacobian_atac"] / pc["jacobian_rna"]), rtol=1e-10
    )
    np.testing.assert_allclose(
        pc["jacobian_atac"] ** 2, pc["jacobian_atac_atac"] ** 2 + pc["jacobian_rna_atac"] ** 2
    )
    assert attr.per_dim["rna"].shape == (300, 7) and (attr.per_dim["rna"] >= 0).all()
    s = attr.summary()
    assert s["attribution_share_led_atac"] + s["attribution_share_led_rna"] == pytest.approx(1)
    # memory-bounded: batch size does not change the result
    small = model.get_modality_attribution(batch_size=37)
    np.testing.assert_allclose(small.per_cell.to_numpy(), pc.to_numpy(), rtol=1e-5)
    z = model.get_latent_representation()
    path = tmp_path / "attribution.png"
    model.plot_attribution_scatter(path=str(path), coords=z[:, :2])
    assert path.stat().st_size > 10_000


# ---------------------------------------------------------------- inference, persistence
def test_normalized_expression_per_modality(mm_trained):
    model, _ = mm_trained
    rna = model.get_normalized_expression()  # the RNA-like modality by default
    atac = model.get_normalized_expression(modality="atac", library_size=1.0)
    assert rna.shape == (300, 40) and atac.shape == (300, 120)
    assert (rna >= 0).all()
    np.testing.assert_allclose(atac.sum(1), 1.0, rtol=1e-4)
    df = model.get_normalized_expression(
        modality="rna", gene_list=["gene_3", "gene_1"], return_pandas=True
    )
    assert list(df.columns) == ["gene_3", "gene_1"] and df.index[0] == "cell_0"
    with pytest.raises(KeyError, match="modality 'protein' unknown"):
        model.get_normalized_expression(modality="protein")
    with pytest.raises(KeyError, match="features not in modality 'rna'"):
        model.get_normalized_expression(modality="rna", gene_list=["peak_1"])


def test_save_load_round_trip(mm_trained, tmp_path):
    model, data = mm_trained
    model.save(tmp_path / "mm")
    loaded = regvi.load(tmp_path / "mm", adata=data)
    assert isinstance(loaded, regvi.RegMultiVI) and loaded.modalities == ["atac", "rna"]
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k]), k
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    np.testing.assert_allclose(loaded.history.to_numpy(), model.history.to_numpy(), rtol=1e-12)
    # new data is checked per modality
    bad = {"atac": data["atac"][:, :100].copy(), "rna": data["rna"]}
    with pytest.raises(ValueError, match="modality 'atac': adata has 100 features"):
        loaded.get_latent_representation(bad)


# ---------------------------------------------------------------- bad input
def test_bad_multimodal_input(paired):
    rna, atac = paired["rna"], paired["atac"]
    kw = {"library_key": "library", "n_hidden": 8, "n_latent": 2}
    with pytest.raises(TypeError, match="MuData or a dict of AnnData"):
        regvi.RegMultiVI([rna, atac], **kw)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        regvi.RegMultiVI({"rna": rna}, **kw)
    with pytest.raises(KeyError, match=r"modalities \['protein'\] not in the data"):
        regvi.RegMultiVI(paired, modalities=["rna", "protein"], **kw)
    other = atac.copy()
    other.obs_names = [f"x{i}" if i < 5 else n for i, n in enumerate(atac.obs_names)]
    with pytest.raises(ValueError, match="5 cells only in 'atac'"):
        regvi.RegMultiVI({"atac": other, "rna": rna}, **kw)
    with pytest.raises(ValueError, match="same cells in a different order"):
        regvi.RegMultiVI({"atac": atac[::-1].copy(), "rna": rna}, **kw)
    frac = atac.copy()
    frac.X = frac.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match=r"modality 'atac' X.*non-integer"):
        regvi.RegMultiVI({"atac": frac, "rna": rna}, **kw)
    with pytest.raises(KeyError, match="unknown modalities \\['protein'\\]"):
        regvi.RegMultiVI(paired, library_key="library", n_latent={"protein": 3})
    with pytest.raises(KeyError, match="no modality's obs has column 'lane'"):
        regvi.RegMultiVI(paired, library_key="lane")
    clash = rna.copy()
    clash.obs["library"] = clash.obs["library"].to_numpy()[::-1]
    with pytest.raises(ValueError, match="obs column 'library' differs between modalities"):
        regvi.RegMultiVI({"atac": atac, "rna": clash}, **kw)
    with pytest.raises(ValueError, match="unknown purposes \\['labels'\\]"):
        regvi.RegMultiVI(paired, disabled_covariates={"rna": ["labels"]}, **kw)
    with pytest.raises(TypeError, match="unknown RegMultiVI argument"):
        regvi.RegMultiVI(paired, n_hiden=3, library_key="library")


def test_mudata_input(paired):
    mudata = pytest.importorskip("mudata")
    md = mudata.MuData({"rna": paired["rna"], "atac": paired["atac"]})
    md.obs["lane"] = paired["rna"].obs["library"].astype(str).to_numpy()
    model = regvi.RegMultiVI(md, library_key="lane", n_hidden=8, n_latent=2)
    assert model.registry.categories["lane"] == ["lib_0", "lib_1", "lib_2"]
    assert model.get_latent_representation().shape == (240, 4)
