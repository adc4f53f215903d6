"""Model correctness found in review (issue #13): validation ELBO, library and dispersion
initialisation, training-cells-only statistics, option types and reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import regvi
from regvi.data import train_validation_split
from regvi.initialisation import initialise_from_data
from regvi.module import ModuleConfig, RegVIModule
from regvi.training import TrainingPlan, TrainSettings


def _first_batch(model, n=64):
    from regvi.data import make_loader

    loader = make_loader(model._dataset(), np.arange(n), n, shuffle=False)
    return next(iter(loader))


# ---------------------------------------------------------------- validation ELBO
def test_validation_elbo_uses_theta_posterior_mean(sim):
    """Validation samples z and l but not theta: its ELBO does not depend on sigma_theta."""
    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    batch = _first_batch(model)
    plan = TrainingPlan(model.module, n_obs_train=270, settings=TrainSettings())
    values = []
    for scale in (1e-4, 2.0):  # sigma_theta tiny vs large
        with torch.no_grad():
            model.module.log_theta_scale_raw.fill_(math.log(math.expm1(scale)))
        plan.on_validation_epoch_start()
        torch.manual_seed(0)
        with torch.no_grad():
            plan.validation_step(batch, 0)
        values.append(plan._val_acc.result("validation")["validation_elbo"])
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    # ...while training's ELBO does sample theta
    train_values = []
    for scale in (1e-4, 2.0):
        with torch.no_grad():
            model.module.log_theta_scale_raw.fill_(math.log(math.expm1(scale)))
        torch.manual_seed(0)
        with torch.no_grad():
            train_values.append(float(model.module.loss(batch, 270)["elbo"]))
    assert train_values[0] != pytest.approx(train_values[1], rel=1e-6)


def test_get_elbo_is_seeded_and_matches_validation(sim):
    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    model.train(max_epochs=2, early_stopping=False, progress_bar=False)
    a = model.get_elbo(indices=model.validation_indices, seed=3)
    b = model.get_elbo(indices=model.validation_indices, seed=3)
    assert a == b
    assert np.isfinite(a)
    assert model.get_elbo(indices=model.validation_indices, seed=4) != a  # z, l draws differ


# ---------------------------------------------------------------- library prior and encoder
def _log_library_group_means(adata, key, cells=None):
    X = sp.csr_matrix(adata.X)
    log_lib = np.log(np.maximum(np.asarray(X.sum(1)).ravel(), 1.0))
    codes = adata.obs[key].astype("category").cat.codes.to_numpy()
    use = np.ones(adata.n_obs, bool) if cells is None else cells
    return np.array([log_lib[(codes == p) & use].mean() for p in range(codes.max() + 1)])


@pytest.mark.parametrize("s", [1.0, 0.2])
def test_library_encoder_starts_at_the_prior_mean(sim, s):
    model = regvi.RegVI(
        sim, library_key="library", n_hidden=16, n_latent=3, library_centring_sensitivity=s
    )
    mod = model.module
    codes = model._covariates["library_size"][:, 0]
    expected = float(mod.library_prior_mean[torch.as_tensor(codes)].mean())
    assert float(mod.l_encoder.mean.bias) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx(math.log(s), abs=0.05)
    # with the weights at 0 the posterior mean of every cell is the prior's cell-weighted mean
    with torch.no_grad():
        mod.l_encoder.mean.weight.zero_()
        inf = mod.inference(_first_batch(model), sample=False)
    assert float(inf["ql_mean"].mean()) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("s, w", [(0.2, 2.0), (1.0, 0.5), (0.2, 1.0)])
def test_residual_library_form(sim, s, w):
    """E_q[l] = r + log s + w · (log L − mean_p m_p): no (w − 1) · log s shift."""
    model = regvi.RegVI(
        sim,
        library_key="library",
        n_hidden=16,
        n_latent=3,
        library_centring_sensitivity=s,
        library_residual=True,
    )
    mod = model.module
    assert float(mod.l_encoder.mean.bias) == 0.0
    with torch.no_grad():
        mod.l_encoder.mean.weight.zero_()
        mod.library_w_mean.fill_(math.log(w))
    batch = _first_batch(model)
    inf = mod.inference(batch, sample=False)
    mean_m = _log_library_group_means(sim, "library").mean()
    log_l = np.log(np.maximum(batch["x"].sum(-1).numpy(), 1.0))
    expected = math.log(s) + w * (log_l - mean_m)
    np.testing.assert_allclose(inf["ql_mean"][:, 0].detach().numpy(), expected, atol=1e-4)


# ---------------------------------------------------------------- training cells only
def test_library_prior_and_data_init_use_training_cells_only(sim):
    adata = sim.copy()
    seed = 4
    _, val = train_validation_split(adata.n_obs, 0.1, seed)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    X[val] *= 50  # validation cells 50× deeper: they must not move the prior
    adata.X = sp.csr_matrix(X)
    model = regvi.RegVI(adata, library_key="library", n_hidden=16, n_latent=3)
    model.train(max_epochs=1, early_stopping=False, progress_bar=False, seed=seed)
    np.testing.assert_array_equal(model.validation_indices, val)
    in_train = np.ones(adata.n_obs, bool)
    in_train[val] = False
    m = _log_library_group_means(adata, "library", in_train)
    mod = model.module
    np.testing.assert_allclose(mod.library_prior_mean.numpy(), m - m.mean(), atol=1e-5)
    assert float(mod.library_log_offset) == pytest.approx(m.mean(), abs=1e-5)


def test_initialise_from_data_cell_mask_equals_the_subset(sim):
    """The mask path (chunked, no copy) gives the same init as the subset matrix."""
    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3, dispersion_init="data")
    cov = model._covariates
    rng = np.random.default_rng(0)
    cells = rng.random(sim.n_obs) < 0.7
    X = sp.csr_matrix(sim.X)
    a, b = RegVIModule(model.config), RegVIModule(model.config)
    initialise_from_data(a, X, cov, True, "data", chunk_nnz=500, cells=cells)
    initialise_from_data(b, X[cells], {k: v[cells] for k, v in cov.items()}, True, "data")
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        if name.startswith(("z_encoder", "l_encoder.body", "l_encoder.var", "decoder.body")):
            continue  # random weights, not data statistics
        if name == "decoder.out.weight" or name == "l_encoder.mean.weight":
            continue
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------- dispersion
def test_data_dispersion_init_moves_the_containment_prior():
    """With dispersion_init="data" the prior keeps theta near the data, not at 1/m² = 9."""
    cfg = ModuleConfig(n_genes=50, n_dispersion_groups=2)
    mod = RegVIModule(cfg)
    theta = torch.full((2, 50), 2.0)
    theta[1] = 0.5
    mod.data_init(None, None, theta)
    lam = mod.dispersion_rate().detach()
    torch.testing.assert_close(lam, torch.tensor([2.0**0.5, 0.5**0.5]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.dispersion_rate_prior_mean, lam, rtol=1e-4, atol=1e-5)
    params = [mod.log_theta_mean, mod.log_theta_scale_raw, mod.dispersion_rate_raw]
    opt = torch.optim.Adam(params, lr=0.02)
    for _ in range(400):  # the prior alone (no data): where does it pull theta?
        opt.zero_grad()
        mod.dispersion_kl(mod.log_theta_mean).backward()
        opt.step()
    final = torch.exp(mod.log_theta_mean.detach().mean(-1))
    # before the fix the hyper-prior (mean lambda 3) pulled both rows towards theta ≈ 9
    assert float(final[0]) == pytest.approx(2.0, rel=0.35)
    assert float(final[1]) == pytest.approx(0.5, rel=0.35)


def test_old_saved_models_without_the_prior_mean_buffer_load(sim, tmp_path):
    from safetensors.torch import load_file, save_file

    model = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    model.save(tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    state.pop("dispersion_rate_prior_mean")
    save_file(state, tmp_path / "m" / "model.safetensors")
    loaded = regvi.load(tmp_path / "m")
    torch.testing.assert_close(
        loaded.module.dispersion_rate_prior_mean, torch.full((3,), 3.0), rtol=1e-6, atol=0
    )


# ---------------------------------------------------------------- option types
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"use_ambient": "False"}, "use_ambient"),
        ({"library_residual": "no"}, "library_residual"),
        ({"n_hidden": "128"}, "n_hidden"),
        ({"n_latent": 10.0}, "n_latent"),
        ({"n_layers": True}, "n_layers"),
        ({"dropout_rate": "0.1"}, "dropout_rate"),
        ({"decoder_l2": "0.1"}, "decoder_l2"),
        ({"dispersion_prior_mean": None}, "dispersion_prior_mean"),
        ({"data_init": "False"}, "data_init"),
        ({"allow_non_integer": 1}, "allow_non_integer"),
        ({"dispersion_init": True}, "dispersion_init"),
        ({"seed": "0"}, "seed"),
        ({"activation": "swish"}, "activation"),
    ],
)
def test_regvi_options_are_type_checked(sim, kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        regvi.RegVI(sim, library_key="library", **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"early_stopping": "False"}, "early_stopping"),
        ({"progress_bar": "no"}, "progress_bar"),
        ({"compile": 1}, "compile"),
        ({"lr": "1e-3"}, "lr"),
        ({"max_epochs": 5.0}, "max_epochs"),
        ({"patience": "10"}, "patience"),
        ({"n_epochs_kl_warmup": "50"}, "n_epochs_kl_warmup"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"restore_best": "True"}, "restore_best"),
        ({"data_on_device": "yes"}, "data_on_device"),
        ({"seed": 1.5}, "seed"),
        ({"initialise": "yes"}, "initialise"),
    ],
)
def test_train_options_are_type_checked_before_any_work(sim, kwargs, name):
    model = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match=name):
        model.train(**{"max_epochs": 1, "progress_bar": False, **kwargs})
    assert len(model.history) == 0 and model.train_indices is None
    for k, v in model.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_multimodal_options_are_type_checked():
    data = regvi.simulate_multiome(n_cells=60, n_genes=20, n_peaks=30, seed=0)
    for kwargs, name in [
        ({"n_latent": {"rna": "10"}}, "n_latent"),
        ({"use_ambient": {"atac": "False"}}, "atac"),
        ({"data_init": "True"}, "data_init"),
        ({"allow_non_integer": {"rna": "no"}}, "allow_non_integer"),
        ({"lr_multipliers": {"atac": "2"}}, "lr_multipliers"),
        ({"seed": None}, "seed"),
    ]:
        with pytest.raises((TypeError, ValueError), match=name):
            regvi.RegMultiVI(data, library_key="library", **kwargs)


# ---------------------------------------------------------------- reproducibility
def test_construction_is_seeded_and_leaves_the_global_rng_alone(sim):
    torch.manual_seed(1)
    a = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    for (k, va), vb in zip(
        a.module.state_dict().items(), b.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    torch.manual_seed(1)
    assert float(torch.rand(1)) == float(after_a)  # construction drew nothing from it
    c = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3, seed=1)
    assert not torch.equal(a.module.z_encoder.mean.weight, c.module.z_encoder.mean.weight)


def test_the_same_call_twice_gives_the_same_latent(sim):
    """Two identical 3-epoch runs from different global RNG states: max |dz| = 0."""
    latents = []
    for state in (11, 97):
        torch.manual_seed(state)
        m = regvi.RegVI(sim, library_key="library", n_hidden=32, n_latent=4)
        m.train(max_epochs=3, early_stopping=False, progress_bar=False, seed=0)
        latents.append(m.get_latent_representation())
    assert np.abs(latents[0] - latents[1]).max() == 0.0
    m = regvi.RegVI(sim, library_key="library", n_hidden=32, n_latent=4)
    m.train(max_epochs=3, early_stopping=False, progress_bar=False, seed=1)
    assert np.abs(m.get_latent_representation() - latents[0]).max() > 1e-3


def test_train_seed_sets_the_initial_weights_too(sim):
    """train(seed=s) on a model built with seed 0 equals a model built with seed s."""
    runs = []
    for build_seed in (0, 5):
        m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3, seed=build_seed)
        m.train(max_epochs=2, early_stopping=False, progress_bar=False, seed=5)
        runs.append(m.get_latent_representation())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_multimodal_same_call_twice_same_latent():
    data = regvi.simulate_multiome(n_cells=80, n_genes=20, n_peaks=30, seed=0)
    latents = []
    for state in (3, 4):
        torch.manual_seed(state)
        m = regvi.RegMultiVI(data, library_key="library", n_hidden=16, n_latent=3)
        m.train(max_epochs=2, early_stopping=False, progress_bar=False, seed=0)
        latents.append(m.get_latent_representation())
    np.testing.assert_array_equal(latents[0], latents[1])
    elbo = m.get_elbo(indices=m.validation_indices, seed=0)
    assert np.isfinite(elbo) and elbo == m.get_elbo(indices=m.validation_indices, seed=0)


@pytest.mark.parametrize("activation", ["exp", "softplus"])
def test_encoder_var_init_sets_the_initial_posterior_std(sim, activation):
    model = regvi.RegVI(
        sim,
        library_key="library",
        n_hidden=64,
        n_latent=8,
        var_activation=activation,
        encoder_var_init=0.1,
    )
    inf = model.module.inference(_first_batch(model), sample=False)
    std = inf["qz_var"].sqrt()
    assert float(std.mean()) == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="encoder_var_init"):
        regvi.RegVI(sim, library_key="library", encoder_var_init=-1.0)


def test_library_stats_match_a_per_group_loop():
    from regvi.initialisation import _library_stats

    rng = np.random.default_rng(0)
    n_groups, n = 7, 2000
    codes = rng.integers(0, 5, n)  # groups 5 and 6 have no cells at all
    codes[:3] = 4
    log_lib = rng.normal(7.0, 0.8, n) + codes * 0.3
    fallback = np.ones(n, dtype=bool)
    use = rng.random(n) < 0.9
    use[codes == 3] = False  # group 3: only validation cells → falls back to all its cells
    use[np.flatnonzero(codes == 2)[1:]] = False  # group 2: one training cell → variance 1
    means, variances, counts = _library_stats(log_lib, codes, use, fallback, n_groups)
    for p in range(5):
        src = use if (codes[use] == p).any() else fallback
        vals = log_lib[(codes == p) & src]
        np.testing.assert_allclose(means[p], vals.mean(), rtol=1e-12)
        np.testing.assert_allclose(variances[p], vals.var() if len(vals) > 1 else 1.0, rtol=1e-9)
        assert counts[p] == int(((codes == p) & use).sum())
    assert variances[2] == 1.0 and counts[3] == 0
    np.testing.assert_allclose(means[5:], means[:5].mean())  # empty groups: mean of the others
    assert list(variances[5:]) == [1.0, 1.0] and list(counts[5:]) == [0, 0]
