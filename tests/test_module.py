"""The generative model and loss: initial values, the plate rule, priors (spec §2–§4, §8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import regvi
from regvi.data import CountBatches, make_loader
from regvi.nn import gamma_poisson_log_prob


def _batch(model, n=64, seed=0):
    data = CountBatches(model._X, model._covariates)
    return next(iter(make_loader(data, np.arange(model._X.shape[0]), n, True, seed)))


def test_initial_values_at_prior_means(sim):
    m = regvi.RegVI(
        sim,
        library_key="library",
        nn_conditioning_covariate_keys="technology",
        data_init=False,
        n_hidden=16,
        n_latent=3,
    )
    mod = m.module
    assert torch.allclose(torch.exp(mod.log_theta_mean), torch.tensor(9.0))
    assert torch.allclose(mod.log_theta_scale(), torch.tensor(0.1))
    assert torch.allclose(mod.dispersion_rate(), torch.tensor(3.0))
    assert all(torch.allclose(torch.exp(p), torch.tensor(0.01)) for p in mod.ambient_log)
    codes = torch.as_tensor(m._covariates["feature_scaling"])
    assert torch.allclose(mod.feature_scaling(codes), torch.tensor(1.0))


def test_two_scaling_keys_multiply_and_start_at_one(sim):
    m = regvi.RegVI(
        sim,
        library_key="library",
        feature_scaling_covariate_keys=["technology", "cell_type"],
        n_hidden=16,
        n_latent=3,
    )
    codes = torch.as_tensor(m._covariates["feature_scaling"][:5])
    assert torch.allclose(
        m.module.feature_scaling(codes), torch.tensor(1.0)
    )  # not 2 (upstream adds)
    with torch.no_grad():
        m.module.feature_scaling_raw[0].fill_(
            float(regvi.module.inverse_softplus(torch.tensor(1.4)))
        )
        m.module.feature_scaling_raw[1].fill_(
            float(regvi.module.inverse_softplus(torch.tensor(2.1)))
        )
    assert torch.allclose(m.module.feature_scaling(codes), torch.tensor(2.0 * 3.0))


def test_data_init(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    bias = torch.nn.functional.softplus(m.module.decoder.out.bias)
    assert (bias >= 0.01 - 1e-6).all()
    # ambient at 0.2 × group mean depth-normalised expression
    X = sim.X.toarray().astype(np.float64)
    offset = float(m.module.library_log_offset)
    Xn = X / np.exp(np.log(X.sum(1)) - offset)[:, None]
    lib0 = (sim.obs["library"] == "lib_0").to_numpy()
    expected = 0.2 * Xn[lib0].mean(0)
    got = torch.exp(m.module.ambient_log[0][0]).detach().numpy()
    np.testing.assert_allclose(got, np.maximum(expected, 1e-6), rtol=1e-4)


def test_library_prior_centred_with_sensitivity(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    assert abs(float(m.module.library_prior_mean.mean())) < 1e-5
    m2 = regvi.RegVI(
        sim, library_key="library", library_centring_sensitivity=0.2, n_hidden=16, n_latent=3
    )
    assert float(m2.module.library_prior_mean.mean()) == pytest.approx(math.log(0.2), abs=1e-5)
    lib = np.log(np.asarray(sim.X.sum(1)).ravel())
    lib0 = (sim.obs["library"] == "lib_0").to_numpy()
    assert float(m.module.library_prior_var[0]) == pytest.approx(lib[lib0].var(), rel=1e-4)


def test_halving_n_obs_doubles_global_term(sim):
    m = regvi.RegVI(
        sim,
        library_key="library",
        regularise_background=True,
        library_residual=True,
        n_hidden=16,
        n_latent=3,
    )
    b = _batch(m)
    terms = ["global", "dispersion_kl", "ambient_prior", "feature_scaling_prior", "decoder_l2"]
    torch.manual_seed(0)
    full = m.module.loss(b, n_obs=1000, sample=False)
    torch.manual_seed(0)
    half = m.module.loss(b, n_obs=500, sample=False)
    for t in terms:
        assert half[t].item() == pytest.approx(2 * full[t].item(), rel=1e-5), t
    for t in ("reconstruction", "kl_z", "kl_library"):  # local terms do not depend on n_obs
        assert float(half[t]) == pytest.approx(float(full[t]), rel=1e-6)
    assert float(full["global"]) != 0.0


def test_n_obs_guard(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    b = _batch(m)
    with pytest.raises(ValueError, match="N_train"):
        m.module.loss(b, n_obs=32)
    with pytest.raises(ValueError, match="n_obs"):
        m.module.loss(b, n_obs=None)
    m.module.loss(b, n_obs=32, skip_n_obs_check=True)


def test_per_gene_nll_sums_to_reconstruction(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    out = m.module.loss(_batch(m), n_obs=300, sample=False, return_per_gene=True)
    assert float(out["reconstruction_per_gene"].sum()) == pytest.approx(
        float(out["reconstruction"]), rel=1e-5
    )


def test_gamma_poisson_matches_torch_negative_binomial():
    x = torch.tensor([0.0, 1.0, 5.0, 30.0])
    mu = torch.tensor([0.5, 2.0, 4.0, 25.0])
    theta = torch.tensor([0.3, 9.0, 2.0, 15.0])
    nb = torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (mu + theta))
    torch.testing.assert_close(
        gamma_poisson_log_prob(x, mu, theta), nb.log_prob(x), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("n_groups", [1, 3])
def test_sparse_row_likelihood_equals_dense_sum_with_gradients(n_groups):
    from regvi.nn import gamma_poisson_log_prob_rows, gamma_poisson_log_prob_unnormalised

    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(7, 30, generator=g) * 0.8, generator=g)
    x[3] = 0.0  # a cell with no counts
    mu = (torch.rand(7, 30, generator=g) * 3).requires_grad_()
    log_theta = torch.randn(n_groups, 30, generator=g).requires_grad_()
    codes = torch.tensor([0, 2, 1, 1, 0, 2, 2]) if n_groups > 1 else None

    def dense_value():
        lt = log_theta if codes is None else log_theta[codes]
        theta = torch.exp(lt)
        return gamma_poisson_log_prob_unnormalised(x, mu, theta, lt, torch.lgamma(theta)).sum(-1)

    dense = dense_value()
    rows = gamma_poisson_log_prob_rows(x, mu, log_theta, codes)
    assert rows.shape == (7,)
    # entries given by the loader (any order, explicit zeros allowed) give the same sums
    flat = torch.nonzero(x.reshape(-1)).squeeze(1).flip(0)
    flat = torch.cat([flat, torch.tensor([3 * 30 + 5])])  # a stored zero (cell 3 is empty)
    given = gamma_poisson_log_prob_rows(x, mu, log_theta, codes, (flat, x.reshape(-1)[flat]))
    torch.testing.assert_close(given, rows, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rows, dense, rtol=1e-6, atol=1e-5)
    grads_dense = torch.autograd.grad(dense.sum(), (mu, log_theta))
    grads_rows = torch.autograd.grad(rows.sum(), (mu, log_theta))
    for a, b in zip(grads_rows, grads_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispersion_prior_convention_mode_at_lambda_squared(sim):
    """With no data, the containment prior alone drives theta to lambda² = (1/m)²."""
    for prior_mean, expected_theta in ((1 / 3, 9.0), (0.5, 4.0)):
        m = regvi.RegVI(
            sim, library_key="library", dispersion_prior_mean=prior_mean, n_hidden=8, n_latent=2
        )
        mod = m.module
        assert float(mod.dispersion_rate()[0]) == pytest.approx(1 / prior_mean, rel=1e-5)
        log_theta = torch.zeros(1, 1, requires_grad=True)
        lam = mod.dispersion_rate().detach()[:1]
        opt = torch.optim.Adam([log_theta], lr=0.05)
        for _ in range(1500):
            u = torch.exp(-0.5 * log_theta)
            nlp = -(torch.log(lam) - lam * u + torch.log(0.5 * u)).sum()  # as in dispersion_kl
            opt.zero_grad()
            nlp.backward()
            opt.step()
        assert float(torch.exp(log_theta)) == pytest.approx(expected_theta, rel=0.02)
        # and dispersion_kl is minimised at the same point w.r.t. log theta
        lt = torch.full_like(mod.log_theta_mean, math.log(expected_theta), requires_grad=True)
        mod.dispersion_kl(lt).backward()
        assert float(lt.grad.abs().max()) < 1e-4


def test_key_fan_out_invariance(sim):
    """library_key=K gives the same model as the three purpose keys all set to K."""
    torch.manual_seed(0)
    a = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    torch.manual_seed(0)
    b = regvi.RegVI(
        sim,
        ambient_covariate_keys=["library"],
        dispersion_key="library",
        library_size_key="library",
        n_hidden=16,
        n_latent=3,
    )
    for (ka, va), (kb, vb) in zip(
        a.module.state_dict().items(), b.module.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    batch_a, batch_b = _batch(a), _batch(b)
    for k in batch_a:
        assert torch.equal(batch_a[k], batch_b[k])
    a.module.eval()
    b.module.eval()  # no dropout noise
    la = a.module.loss(batch_a, 300, sample=False)["loss"]
    lb = b.module.loss(batch_b, 300, sample=False)["loss"]
    assert torch.equal(la, lb)


def test_relabelling_categories_does_not_change_loss(sim):
    """Renaming library levels permutes parameter rows but leaves the loss unchanged."""
    torch.manual_seed(0)
    a = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
    sim2 = sim.copy()
    sim2.obs["library"] = (
        sim2.obs["library"].map({"lib_0": "z", "lib_1": "y", "lib_2": "x"}).astype("category")
    )
    torch.manual_seed(0)
    b = regvi.RegVI(sim2, library_key="library", n_hidden=16, n_latent=3)
    a.module.eval()
    b.module.eval()
    la = a.module.loss(_batch(a), 300, sample=False)["loss"]
    lb = b.module.loss(_batch(b), 300, sample=False)["loss"]
    assert float(la) == pytest.approx(float(lb), rel=1e-6)


def test_gradients_reach_every_parameter(sim):
    m = regvi.RegVI(
        sim,
        library_key="library",
        nn_conditioning_covariate_keys="technology",
        regularise_background=True,
        library_residual=True,
        n_hidden=16,
        n_latent=3,
    )
    out = m.module.loss(_batch(m), n_obs=300)
    out["loss"].backward()
    missing = [
        n
        for n, p in m.module.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing


def test_dispersion_init_from_data(sim):
    torch.manual_seed(0)
    m = regvi.RegVI(
        sim, library_key="library", data_init=False, dispersion_init="data", n_hidden=16, n_latent=3
    )
    theta = torch.exp(m.module.log_theta_mean)
    assert theta.shape == (3, sim.n_vars)
    assert (theta >= 0.01 - 1e-6).all() and (theta <= 20 + 1e-4).all()
    assert not torch.allclose(theta, torch.tensor(9.0))
    torch.manual_seed(0)
    plain = regvi.RegVI(sim, library_key="library", data_init=False, n_hidden=16, n_latent=3)
    # data_init=False leaves the decoder bias at its default initialisation
    assert torch.equal(m.module.decoder.out.bias, plain.module.decoder.out.bias)
