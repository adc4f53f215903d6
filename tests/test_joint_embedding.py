"""Joint-embedding loss for low-count cells: binomial thinning + Barlow Twins (issue #14 §3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import regvi
from regvi.nn.joint_embedding import barlow_twins_loss, thin_counts


def _first_batch(model, n=64):
    from regvi.data import make_loader

    loader = make_loader(model._dataset(), np.arange(n), n, shuffle=False)
    return next(iter(loader))


def test_thinning_keeps_a_per_cell_fraction_in_range():
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((400, 300), 5.0), generator=g)
    thinned, f = thin_counts(x, 0.1, 0.5, generator=g)
    assert thinned.shape == x.shape and bool((thinned <= x).all()) and bool((thinned >= 0).all())
    assert float(f.min()) >= 0.1 and float(f.max()) <= 0.5 and float(f.std()) > 0.05
    kept = thinned.sum(1) / x.sum(1)
    assert float((kept - f).abs().max()) < 0.06  # binomial: share kept ≈ the cell's fraction
    # the same generator state → the same thinning
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(thin_counts(x, 0.2, 0.2, g1)[0], thin_counts(x, 0.2, 0.2, g2)[0])


def test_barlow_twins_loss_is_zero_for_identical_decorrelated_views_and_large_otherwise():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, 6, generator=g)
    assert float(barlow_twins_loss(z, 3 * z + 1, 0.005)) < 0.01  # invariant to scale and shift
    other = torch.randn(4096, 6, generator=g)
    assert float(barlow_twins_loss(z, other, 0.0)) == pytest.approx(6.0, rel=0.05)
    # redundancy: two copies of one dimension are penalised off the diagonal only
    dup = torch.cat([z[:, :1], z[:, :1]], 1)
    on_only = float(barlow_twins_loss(dup, dup, 0.0))
    assert on_only < 1e-3 and float(barlow_twins_loss(dup, dup, 1.0)) == pytest.approx(2.0, 1e-3)


def test_loss_adds_the_weighted_term_in_training_only_and_never_to_the_elbo(sim):
    weight = 3.0
    on = regvi.RegVI(
        sim, library_key="library", n_hidden=32, n_latent=4, joint_embedding_weight=weight
    )
    off = regvi.RegVI(sim, library_key="library", n_hidden=32, n_latent=4)
    off.module.load_state_dict(on.module.state_dict())
    batch = _first_batch(on)
    on.module.train(), off.module.train()
    torch.manual_seed(5)
    out_on = on.module.loss(batch, n_obs=300)
    torch.manual_seed(5)
    out_off = off.module.loss(batch, n_obs=300)
    assert "joint_embedding" not in out_off
    je = out_on["joint_embedding"]
    assert float(je.detach()) > 0
    torch.testing.assert_close(out_on["elbo"], out_off["elbo"])
    torch.testing.assert_close(out_on["loss"], out_off["loss"] + weight * je)
    # gradients of the joint-embedding term reach the encoder only
    on.module.zero_grad()
    je.backward()
    enc = [p.grad for n, p in on.module.named_parameters() if n.startswith("z_encoder")]
    dec = [p.grad for n, p in on.module.named_parameters() if n.startswith("decoder")]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in enc)
    assert all(g is None or float(g.abs().sum()) == 0 for g in dec)
    on.module.eval()  # validation / evaluation: no joint-embedding term
    assert "joint_embedding" not in on.module.loss(batch, n_obs=300)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"joint_embedding_weight": -1.0}, "joint_embedding_weight"),
        ({"joint_embedding_weight": "1"}, "joint_embedding_weight"),
        ({"joint_embedding_min_fraction": 0.0}, "joint_embedding_min_fraction"),
        ({"joint_embedding_max_fraction": 1.5}, "joint_embedding_max_fraction"),
        (
            {"joint_embedding_min_fraction": 0.6, "joint_embedding_max_fraction": 0.4},
            r"joint_embedding_min_fraction=0\.6 is above joint_embedding_max_fraction=0\.4",
        ),
        ({"joint_embedding_min_fraction": 0.6}, r"is above joint_embedding_max_fraction=0\.5"),
    ],
)
def test_joint_embedding_options_are_checked(sim, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        regvi.RegVI(sim, library_key="library", **kwargs)


def _thinned_displacement(model, adata, q=0.2):
    """Mean distance between a cell's latent and its thinned copy's, over the latent's spread."""
    from evaluation.robustness import binomial_thin

    z = model.get_latent_representation(adata)
    thin = adata.copy()
    thin.X = binomial_thin(adata.X, q, seed=0)
    z_thin = model.get_latent_representation(thin)
    spread = np.sqrt(((z - z.mean(0)) ** 2).sum(1).mean())
    return float(np.linalg.norm(z - z_thin, axis=1).mean() / spread)


def test_training_with_the_joint_embedding_keeps_thinned_cells_closer():
    adata = regvi.simulate(n_cells=800, n_genes=120, n_cell_types=4, n_libraries=2, seed=3)
    moved = {}
    for weight in (0.0, 20.0):
        # log1p input and no encoder covariates: the depth-normalised default input is
        # depth-blind already (displacement 0.12 without the loss, against 0.19 here) and the
        # library one-hot in the encoders lowers it too (0.15), so the loss has less to fix
        m = regvi.RegVI(
            adata,
            library_key="library",
            n_hidden=64,
            n_latent=6,
            joint_embedding_weight=weight,
            encoder_input="log1p",
            encoder_covariate_keys=[],
        )
        hist = m.train(max_epochs=25, early_stopping=False, progress_bar=False, seed=0)
        if weight:
            curve = hist["train_joint_embedding"].to_numpy()
            assert curve[-1] < curve[0]  # the loss it adds is being minimised
        moved[weight] = _thinned_displacement(m, adata)
    print(moved)
    assert moved[20.0] < 0.8 * moved[0.0], moved


def test_multimodal_joint_embedding_per_modality():
    data = regvi.simulate_multiome(n_cells=80, n_genes=20, n_peaks=30, seed=0)
    m = regvi.RegMultiVI(
        data,
        library_key="library",
        n_hidden=16,
        n_latent=3,
        joint_embedding_weight={"rna": 2.0, "atac": 0.0},
    )
    batch = _first_batch(m)
    m.module.train()
    out = m.module.loss(batch, n_obs=80)
    assert "joint_embedding_rna" in out and "joint_embedding_atac" not in out
    torch.manual_seed(0)
    hist = m.train(max_epochs=2, early_stopping=False, progress_bar=False, seed=0)
    assert np.isfinite(hist["train_joint_embedding_rna"]).all()


def test_a_one_cell_last_batch_trains_and_logs_the_term(sim):
    """The epoch accumulator fixes its keys on the first batch: a one-cell batch (no
    correlations) must still report the term (as 0), in both models."""
    model = regvi.RegVI(
        sim, library_key="library", n_hidden=16, n_latent=3, joint_embedding_weight=5.0
    )
    hist = model.train(
        max_epochs=1,
        batch_size=sim.n_obs - 1,
        validation_fraction=0.0,
        early_stopping=False,
        progress_bar=False,
    )
    assert np.isfinite(hist["train_joint_embedding"]).all()
    data = regvi.simulate_multiome(n_cells=81, n_genes=20, n_peaks=30, seed=0)
    multi = regvi.RegMultiVI(
        data, library_key="library", n_hidden=16, n_latent=3, joint_embedding_weight=2.0
    )
    hist = multi.train(
        max_epochs=1,
        batch_size=80,
        validation_fraction=0.0,
        early_stopping=False,
        progress_bar=False,
    )
    assert np.isfinite(hist["train_joint_embedding_rna"]).all()


def test_the_multimodal_term_uses_only_the_modality_block_of_observed_cells():
    """Weights 0 for cells without the modality: the loss equals the loss over the others."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(40, 4), torch.randn(40, 4)
    w = torch.ones(40)
    w[30:] = 0.0
    z1[30:], z2[30:] = 0.0, 0.0
    weighted = barlow_twins_loss(z1, z2, 0.01, weights=w)
    assert torch.allclose(weighted, barlow_twins_loss(z1[:30], z2[:30], 0.01), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert barlow_twins_loss(z1, z2, 0.01).dtype == torch.float32
