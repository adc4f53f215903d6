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


def _without_atac(paired, every=3):
    """The ATAC modality with no counts in every ``every``-th cell, and those cells."""
    atac = paired["atac"].copy()
    missing = np.arange(0, atac.n_obs, every)
    X = atac.X.tolil()
    X[missing] = 0
    atac.X = X.tocsr()
    atac.X.eliminate_zeros()
    return atac, missing


def _partly_paired_model(paired, **kw):
    """A small RegMultiVI on ``paired`` with every third cell lacking ATAC, and those cells."""
    atac, missing = _without_atac(paired)
    model = regvi.RegMultiVI(
        {"atac": atac, "rna": paired["rna"]}, library_key="library", n_hidden=16, n_latent=4, **kw
    )
    return model, missing


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
    # joint z + the one-hot library (3 levels): the decoder is conditioned on it by default
    assert model.module.mods["atac"].decoder.body.linears[0].in_features == 8 + 3
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


def test_a_modality_without_a_given_latent_size_gets_the_multimodal_default(paired):
    """RegMultiVI's per-modality default (10) applies to every modality not given a size, also
    when another one is given (RegVI's own default, 20, must not leak into a modality)."""
    from regvi.multimodal import MODALITY_N_LATENT

    model = regvi.RegMultiVI(paired, library_key="library", n_latent={"rna": 3}, n_hidden=16)
    atac, rna = model.config.configs["atac"], model.config.configs["rna"]
    assert (atac.n_latent, rna.n_latent) == (MODALITY_N_LATENT, 3) == (10, 3)
    assert atac.n_latent_decoder == rna.n_latent_decoder == 13
    assert regvi.RegMultiVI(paired, library_key="library", n_hidden=16).config.n_latent == 20


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
    atac, missing = _without_atac(paired)
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
    assert {f"{m}_decoder_total_attr" for m in model.modalities} <= set(attr.per_cell)
    assert not any(c.startswith("log2_") for c in attr.upstream_obs().columns)
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
    res = modality_attribution(module, z, batch, target="rho")
    assert res["target"] == "rho"
    g_atac = 120
    for cell in (0, 7, 15):
        J = full_jacobian(module, z, batch, cell, target="rho")  # (120 + 40, 5)
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


def _to_double(batch):
    """Floating tensors of a (nested) minibatch in float64."""
    return {
        k: _to_double(v)
        if isinstance(v, dict)
        else (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in batch.items()
    }


def _mu_setup(paired, n=16):
    """float64 module with per-cell feature scaling (ATAC) and ambient (RNA) made non-trivial."""
    model = regvi.RegMultiVI(
        paired,
        library_key="library",
        feature_scaling_covariate_keys="library",
        n_hidden=16,
        n_latent={"atac": 3, "rna": 2},
    )
    module = model.module.double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in module.mods.values():
            for p in [*mod.feature_scaling_raw, *mod.ambient_log]:
                p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    batch = _to_double(_first_batch(model, n))
    z = torch.randn(n, 5, dtype=torch.float64, generator=gen)
    library = {
        m: 2.0 + torch.randn(n, 1, dtype=torch.float64, generator=gen) for m in ("atac", "rna")
    }
    return model, module, batch, z, library


def _mu_by_hand(module, z, batch, library):
    """mu_d = exp(l_d) · (rho_d + s_d) · y_d from the module's own pieces (spec §2)."""
    rho = module.decoder_rates(z, batch)
    out = []
    for m in module.modalities:
        mod, view = module.mods[m], module.modality_batch(batch, m)
        s = mod.ambient_rate(view.get("ambient"))
        y = mod.feature_scaling(view.get("feature_scaling"))
        rate = rho[m] + (0.0 if s is None else s)
        out.append(torch.exp(library[m]) * rate * (1.0 if y is None else y))
    return torch.cat(out, -1)


def test_mu_attribution_matches_jacrev_finite_differences_and_scaled_rho(paired):
    _, module, batch, z, library = _mu_setup(paired)
    # per-cell feature scaling and ambient really vary here
    assert batch["feature_scaling"].shape[1] == 1
    assert module.mods["atac"].feature_scaling(batch["feature_scaling"]).shape == (16, 120)
    # decoder_means is the likelihood's mu (generative at the posterior mean) ...
    inf = module.inference(batch, sample=False)
    gen = module.generative(inf["qz_mean"], inf, batch, sample_theta=False)
    lib_post = module.posterior_library(batch)
    mu = module.decoder_means(inf["qz_mean"], batch, lib_post)
    for m in module.modalities:
        torch.testing.assert_close(mu[m], gen[m]["mu"])
    # ... and equals exp(l) · (rho + s) · y built by hand
    torch.testing.assert_close(
        torch.cat(list(module.decoder_means(z, batch, library).values()), -1),
        _mu_by_hand(module, z, batch, library),
    )
    res = modality_attribution(module, z, batch, target="mu", library=library)
    rho_res = modality_attribution(module, z, batch, target="rho")
    assert res["target"] == "mu"
    blocks = {"atac": slice(0, 3), "rna": slice(3, 5)}
    rows = {"atac": slice(0, 120), "rna": slice(120, 160)}
    for cell in (0, 9, 15):
        # reference: reverse-mode Jacobian of the hand-built mu of this one cell
        def f(z_row, cell=cell):
            zz = z.clone()
            zz = torch.cat([zz[:cell], z_row[None], zz[cell + 1 :]])
            return _mu_by_hand(module, zz, batch, library)[cell]

        J = torch.func.jacrev(f)(z[cell].clone()).detach()
        assert J.shape == (160, 5)
        torch.testing.assert_close(full_jacobian(module, z, batch, cell, "mu", library), J)
        J_rho = full_jacobian(module, z, batch, cell, target="rho")
        for d, dec in enumerate(["atac", "rna"]):
            # ∂mu/∂z = exp(l) · y · ∂rho/∂z (the ambient does not depend on z)
            mod, view = module.mods[dec], module.modality_batch(batch, dec)
            y = mod.feature_scaling(view.get("feature_scaling"))
            y = torch.ones(1) if y is None else y[min(cell, y.shape[0] - 1)]
            scale = torch.exp(library[dec][cell]) * y
            torch.testing.assert_close(J[rows[dec]], scale[:, None] * J_rho[rows[dec]])
            for b, blk in enumerate(["atac", "rna"]):
                Jdb = J[rows[dec], blocks[blk]]
                assert res["block_sq"][cell, d, b] == pytest.approx(float((Jdb**2).sum()), rel=1e-8)
                ref_l1 = float(Jdb.abs().mean(0).sum())
                assert res["block_l1"][cell, d, b] == pytest.approx(ref_l1, rel=1e-8)
            np.testing.assert_allclose(
                res["per_dim"][dec][cell], J[rows[dec]].abs().mean(0).numpy(), rtol=1e-8
            )
        # central finite differences of every latent column of mu
        h = 1e-6
        for j in range(5):
            zp, zm = z.clone(), z.clone()
            zp[cell, j] += h
            zm[cell, j] -= h
            with torch.no_grad():
                fp = torch.cat(list(module.decoder_means(zp, batch, library).values()), -1)[cell]
                fm = torch.cat(list(module.decoder_means(zm, batch, library).values()), -1)[cell]
            fd = ((fp - fm) / (2 * h)).numpy()
            np.testing.assert_allclose(fd, J[:, j].numpy(), rtol=1e-5, atol=1e-6 * np.abs(fd).max())
    # without per-cell feature scaling (RNA), mu scores are exp(l)-scaled rho scores
    e2 = np.exp(2 * library["rna"][:, 0].numpy())
    np.testing.assert_allclose(res["block_sq"][:, 1, :], e2[:, None] * rho_res["block_sq"][:, 1, :])
    np.testing.assert_allclose(
        res["per_dim"]["rna"], np.sqrt(e2)[:, None] * rho_res["per_dim"]["rna"], rtol=1e-10
    )
    # default library: the posterior mean of each library encoder
    dflt = modality_attribution(module, z, batch)
    expl = modality_attribution(module, z, batch, "mu", lib_post)
    np.testing.assert_array_equal(dflt["block_sq"], expl["block_sq"])
    with pytest.raises(ValueError, match="target"):
        modality_attribution(module, z, batch, target="px_rate")


def test_attribution_per_decoder_totals_and_upstream_log2(paired):
    model, module, batch, z, library = _mu_setup(paired, n=24)
    parts, start = [], 0
    for sub in make_loader(model._dataset(), np.arange(24), 10, shuffle=False):  # 10, 10, 4
        s = slice(start, start + sub["index"].shape[0])
        start = s.stop
        lib = {m: v[s] for m, v in library.items()}
        parts.append(modality_attribution(module, z[s], _to_double(sub), "mu", lib))
    whole = modality_attribution(module, z, batch, "mu", library)
    attr = regvi.attribution.ModalityAttribution.concatenate(parts, module.modalities)
    assert attr.target == "mu"
    pc, mods = attr.per_cell, ["atac", "rna"]
    sl = {"atac": slice(0, 3), "rna": slice(3, 5)}
    for dec in mods:
        A = whole["per_dim"][dec]  # (n, D) mean_g |∂mu_{d,g}/∂z_j|
        np.testing.assert_allclose(attr.per_dim[dec], A, rtol=1e-12)
        # upstream: total = attr.sum(axis=1) over ALL latent dims; own = the decoder's block
        np.testing.assert_allclose(pc[f"{dec}_decoder_total_attr"], A.sum(1), rtol=1e-10)
        np.testing.assert_allclose(pc[f"{dec}_decoder_own_attr"], A[:, sl[dec]].sum(1), rtol=1e-10)
        for blk in mods:
            np.testing.assert_allclose(pc[f"attr_{dec}_{blk}"], A[:, sl[blk]].sum(1), rtol=1e-10)
        np.testing.assert_allclose(
            pc[f"{dec}_decoder_total_attr"], pc[f"attr_{dec}_atac"] + pc[f"attr_{dec}_rna"]
        )
    for blk in mods:  # block totals summed over decoders
        np.testing.assert_allclose(
            pc[f"attr_{blk}"], pc[f"attr_atac_{blk}"] + pc[f"attr_rna_{blk}"], rtol=1e-12
        )
        np.testing.assert_allclose(
            pc[f"jacobian_{blk}"] ** 2,
            pc[f"jacobian_atac_{blk}"] ** 2 + pc[f"jacobian_rna_{blk}"] ** 2,
        )
    # upstream regularizedvi store_attribution_results:
    # log2(total_attrs[mod0] / (total_attrs[mod1] + 1e-10)), mod0 < mod1 alphabetically
    total = {m: whole["per_dim"][m].sum(axis=1) for m in mods}
    ref = np.log2(total["atac"] / (total["rna"] + 1e-10))
    np.testing.assert_allclose(pc["log2_atac_vs_rna_attr"], ref, rtol=1e-10)
    up = attr.upstream_obs(suffix="_x")
    assert list(up.columns) == [
        "atac_decoder_total_attr_x",
        "atac_decoder_own_attr_x",
        "rna_decoder_total_attr_x",
        "rna_decoder_own_attr_x",
        "log2_atac_vs_rna_attr_x",
    ]
    np.testing.assert_allclose(up["log2_atac_vs_rna_attr_x"], ref, rtol=1e-10)
    s = attr.summary()
    assert all(isinstance(v, float) for v in s.values())
    assert s["attribution_target_mu"] == 1.0
    assert s["attribution_log2_atac_vs_rna_attr_median"] == pytest.approx(np.median(ref))
    assert s["attribution_log2_atac_vs_rna_attr_mean"] == pytest.approx(np.mean(ref))
    assert s["attribution_rna_decoder_total_attr_median"] == pytest.approx(np.median(total["rna"]))
    with pytest.raises(ValueError, match="targets"):
        regvi.attribution.ModalityAttribution.concatenate(
            [parts[0], {**parts[1], "target": "rho"}], mods
        )


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
    # default target: the NB mean mu; "rho" on request, recorded in the result and summary
    assert attr.target == "mu" and s["attribution_target_mu"] == 1.0
    assert {"attribution_median_atac", "attribution_log2_ratio_median"} <= set(s)
    assert "attribution_log2_atac_vs_rna_attr_median" in s
    rho = model.get_modality_attribution(batch_size=128, target="rho")
    assert rho.target == "rho" and rho.summary()["attribution_target_mu"] == 0.0
    # RNA has no feature scaling: mean|∂mu/∂z_j| = exp(l) · mean|∂rho/∂z_j| for every j
    ratio = attr.per_dim["rna"] / rho.per_dim["rna"]
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(7, 1), rtol=1e-4)
    lib = np.concatenate(
        [
            model.module.posterior_library(b)["rna"].numpy()
            for b in make_loader(model._dataset(), np.arange(300), 128, shuffle=False)
        ]
    )
    np.testing.assert_allclose(ratio[:, 0], np.exp(lib[:, 0]), rtol=1e-4)
    with pytest.raises(ValueError, match="target"):
        model.get_modality_attribution(target="lambda")
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


# ---------------------------------------------------------------- product of experts
def test_poe_posterior_is_the_product_of_prior_and_observed_experts(paired):
    """latent_mode="poe": one shared z whose posterior is N(0, I) × the Gaussian experts of the
    observed modalities (precision-weighted), one KL of that z, missing modalities left out."""
    model, missing = _partly_paired_model(paired, latent_mode="poe")
    assert model.config.n_latent == 4 and model.module.slices == {}
    assert all(c.n_latent_decoder == 4 for c in model.config.configs.values())
    module = model.module.eval()
    batch = next(iter(make_loader(model._dataset(), np.arange(240), 240, shuffle=False)))
    inf = module.inference(batch, sample=False)
    (ma, va), (mr, vr) = (
        (inf["modalities"][m]["qz_mean"], inf["modalities"][m]["qz_var"]) for m in ("atac", "rna")
    )
    has_atac = batch["modalities"]["atac"]["observed"][:, None].to(ma.dtype)
    precision = 1 + has_atac / va + 1 / vr  # the prior N(0, 1) is one expert
    torch.testing.assert_close(inf["qz_var"], 1 / precision)
    torch.testing.assert_close(inf["qz_mean"], (has_atac * ma / va + mr / vr) / precision)
    # cells without ATAC: the RNA expert and the prior only
    only_rna, _ = module.modality_posterior(inf["modalities"]["rna"])
    torch.testing.assert_close(inf["qz_mean"][missing], only_rna[missing])
    # one KL of the shared z; no per-modality KL_z terms
    out = module.loss(batch, n_obs=240, sample=False)
    kl = 0.5 * (inf["qz_var"] + inf["qz_mean"] ** 2 - 1 - torch.log(inf["qz_var"]))
    assert float(out["kl_z"]) == pytest.approx(float(kl.sum(-1).mean()), rel=1e-5)
    assert "kl_z_atac" not in out and "kl_z_rna" not in out
    assert out["kl_z_per_dim"].shape == (4,)
    assert float(out["elbo"]) == pytest.approx(
        float(out["reconstruction"] + out["kl_z"] + out["kl_library"]), rel=1e-6
    )
    # the API: shared latent, per-modality posteriors, no attribution (no blocks)
    z = model.get_latent_representation()
    assert z.shape == (240, 4)
    np.testing.assert_allclose(z, inf["qz_mean"].detach().numpy(), rtol=1e-5, atol=1e-6)
    alone = model.get_modality_latents()
    assert set(alone) == {"atac", "rna"} and alone["rna"].shape == (240, 4)
    np.testing.assert_allclose(alone["rna"], only_rna.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="latent_mode='poe'"):
        model.get_modality_attribution()
    h = model.train(max_epochs=2, early_stopping=False, progress_bar=False)
    assert np.isfinite(h["train_loss"]).all() and "train_kl_z_rna" not in h


def test_poe_save_load_and_bad_options(paired, tmp_path):
    model = regvi.RegMultiVI(paired, library_key="library", n_hidden=8, latent_mode="poe", seed=1)
    assert model.config.n_latent == 20  # POE_N_LATENT: one shared latent, RegVI's default size
    model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    model.save(tmp_path / "poe")
    loaded = regvi.load(tmp_path / "poe", adata=paired)
    assert loaded.config.latent_mode == "poe"
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    with pytest.raises(
        ValueError, match=r"latent_mode='mean' \(str\); expected one of \['concat', 'poe'\]"
    ):
        regvi.RegMultiVI(paired, library_key="library", latent_mode="mean")
    with pytest.raises(ValueError, match="give one n_latent for all of them"):
        regvi.RegMultiVI(
            paired, library_key="library", latent_mode="poe", n_latent={"atac": 3, "rna": 4}
        )


@pytest.mark.parametrize("latent_mode", ["concat", "poe"])
def test_modality_dropout_hides_one_modality_from_the_encoders(paired, latent_mode):
    """modality_dropout p: in training a cell with 2+ observed modalities has, with probability
    p, one of them hidden from the encoders (prior block / expert left out) but still
    reconstructed; cells with one modality, evaluation and p = 0 are untouched."""
    model, _ = _partly_paired_model(paired, latent_mode=latent_mode, modality_dropout=0.5)
    assert model.config.modality_dropout == 0.5
    module = model.module
    batch = next(iter(make_loader(model._dataset(), np.arange(240), 240, shuffle=False)))
    observed = {m: batch["modalities"][m]["observed"][:, None] for m in ("atac", "rna")}
    module.eval()
    shown = module.encoder_visible(batch)
    assert all(torch.equal(shown[m], observed[m]) for m in observed)
    module.train()
    torch.manual_seed(0)
    visible = module.encoder_visible(batch)
    torch.manual_seed(0)
    again = module.encoder_visible(batch)  # same seed, same draw
    assert all(torch.equal(again[m], visible[m]) for m in visible)
    both = (observed["atac"] & observed["rna"])[:, 0]
    for m in visible:
        assert not (visible[m] & ~observed[m]).any()  # never shows a missing modality
    assert torch.equal(visible["rna"][~both], observed["rna"][~both])  # RNA-only cells
    n_seen = visible["atac"][:, 0].int() + visible["rna"][:, 0].int()
    assert (n_seen[both] >= 1).all()
    dropped = int((n_seen[both] == 1).sum())
    assert 0.3 * int(both.sum()) < dropped < 0.7 * int(both.sum())  # 160 paired cells, p 0.5
    assert all(int((~visible[m][both, 0]).sum()) > 0 for m in visible)  # either side
    # the hidden modality leaves the posterior but is still reconstructed
    torch.manual_seed(0)
    inf = module.inference(batch, sample=False)
    torch.testing.assert_close(
        torch.stack([inf["visible"][m] for m in ("atac", "rna")]),
        torch.stack([visible[m] for m in ("atac", "rna")]),
    )
    hid = ~visible["atac"][:, 0] & both
    if latent_mode == "poe":
        only_rna, _ = module.modality_posterior(inf["modalities"]["rna"])
        torch.testing.assert_close(inf["qz_mean"][hid], only_rna[hid])
    else:
        assert (inf["qz_mean"][hid, :4] == 0).all() and (inf["qz_var"][hid, :4] == 1).all()
        torch.manual_seed(0)
        out = module.loss(batch, n_obs=240, sample=False)
        kl = 0.5 * (inf["qz_var"] + inf["qz_mean"] ** 2 - 1 - torch.log(inf["qz_var"]))
        seen = visible["atac"][:, 0].to(kl.dtype)
        assert float(out["kl_z_atac"]) == pytest.approx(
            float((kl[:, :4].sum(-1) * seen).mean()), rel=1e-5
        )
    torch.manual_seed(0)
    out = module.loss(batch, n_obs=240, sample=False)
    eval_out = module.eval().loss(batch, n_obs=240, sample=False)
    # reconstruction is over every observed cell in both; the hidden cells decode worse
    assert float(out["reconstruction_atac"]) > float(eval_out["reconstruction_atac"])
    h = model.train(max_epochs=2, early_stopping=False, progress_bar=False)
    assert np.isfinite(h["train_loss"]).all() and np.isfinite(h["validation_elbo"]).all()


def test_modality_dropout_saved_and_checked(paired, tmp_path):
    model = regvi.RegMultiVI(paired, library_key="library", n_hidden=8, modality_dropout=0.25)
    model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    model.save(tmp_path / "md")
    loaded = regvi.load(tmp_path / "md", adata=paired)
    assert loaded.config.modality_dropout == 0.25
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(
            ValueError, match=r"modality_dropout=.*expected a probability in \[0, 1\)"
        ):
            regvi.RegMultiVI(paired, library_key="library", modality_dropout=bad)


def test_kl_multipliers_weigh_each_block_in_the_loss_only(paired, tmp_path):
    """kl_multipliers {"atac": w}: the training loss has KL weight × w on the ATAC block's
    KL_z; the ELBO and every other term are unchanged; saved; bad values refused."""
    base = regvi.RegMultiVI(paired, library_key="library", n_hidden=8, n_latent=3, seed=2)
    model = regvi.RegMultiVI(
        paired, library_key="library", n_hidden=8, n_latent=3, seed=2, kl_multipliers={"atac": 0.25}
    )
    assert model.config.kl_multipliers == {"atac": 0.25}
    batch = _first_batch(model)
    outs = []
    for m in (base, model):
        m.module.eval()
        outs.append(m.module.loss(batch, n_obs=240, kl_weight=2.0, sample=False))
    plain, weighted = outs
    for key in ("elbo", "kl_z", "kl_z_atac", "kl_z_rna", "reconstruction"):
        torch.testing.assert_close(weighted[key], plain[key])
    expected = plain["loss"] - 2.0 * (1 - 0.25) * plain["kl_z_atac"]
    torch.testing.assert_close(weighted["loss"], expected)
    assert float(plain["kl_z_atac"]) > 0
    model.train(max_epochs=1, early_stopping=False, progress_bar=False)
    model.save(tmp_path / "klm")
    loaded = regvi.load(tmp_path / "klm", adata=paired)
    assert loaded.config.kl_multipliers == {"atac": 0.25}
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    bad_cases = [
        ({"atac": 0.0}, r"kl_multipliers\['atac'\]=0.0; expected a positive number"),
        ({"atac": "0.5"}, r"kl_multipliers\['atac'\]='0.5'; expected a positive number"),
        ({"protein": 0.5}, r"kl_multipliers names unknown modality 'protein'"),
    ]
    for bad, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            regvi.RegMultiVI(paired, library_key="library", kl_multipliers=bad)
    with pytest.raises(TypeError, match=r"kl_multipliers=0.5; expected a dict modality"):
        regvi.RegMultiVI(paired, library_key="library", kl_multipliers=0.5)
    with pytest.raises(ValueError, match="needs latent_mode='concat'"):
        regvi.RegMultiVI(
            paired, library_key="library", latent_mode="poe", kl_multipliers={"atac": 0.5}
        )
