"""``encoder_input``: the z encoder reads log1p(x) or depth-normalised log1p(x · L̄ / L)."""

from __future__ import annotations

import pytest
import torch

import regvi


def _module(sim, **kwargs):
    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3, **kwargs)
    model.module.eval()
    return model


def _batch(model, scale: float):
    data = model._dataset()
    batch = next(iter(regvi.data.make_loader(data, range(40), 40, shuffle=False)))
    return {**batch, "x": batch["x"] * scale}


def test_normalised_input_makes_z_blind_to_depth_and_the_library_encoder_not(sim):
    model = _module(sim, encoder_input="normalised")
    with torch.no_grad():
        one = model.module.inference(_batch(model, 1.0), sample=False)
        two = model.module.inference(_batch(model, 2.0), sample=False)
    torch.testing.assert_close(one["qz_mean"], two["qz_mean"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(one["ql_mean"], two["ql_mean"])
    default = _module(sim, encoder_input="log1p")
    with torch.no_grad():
        one = default.module.inference(_batch(default, 1.0), sample=False)
        two = default.module.inference(_batch(default, 2.0), sample=False)
    assert not torch.allclose(one["qz_mean"], two["qz_mean"])


def test_normalised_input_saves_and_loads(sim, tmp_path):
    model = _module(sim, encoder_input="normalised")
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = regvi.load(tmp_path / "m", adata=sim)
    assert loaded.config.encoder_input == "normalised"
    torch.testing.assert_close(
        torch.as_tensor(loaded.get_latent_representation()),
        torch.as_tensor(model.get_latent_representation()),
    )


def test_an_unknown_encoder_input_is_refused(sim):
    with pytest.raises(ValueError, match="encoder_input"):
        regvi.RegVI(sim, library_key="library", encoder_input="log")
