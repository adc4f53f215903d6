"""User API: train, latent, expression, early stopping, save/load (spec §5, §7)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import regvi
from regvi.training import LOGGED_TERMS


def test_train_history_logs_every_term(trained):
    # the ELBO's parts and every prior term of docs/model.md#loss-and-the-plate-rule
    assert {"elbo", "reconstruction", "kl_z", "kl_library", "dispersion_kl"} <= set(LOGGED_TERMS)
    assert {"ambient_prior", "feature_scaling_prior", "decoder_l2", "library_w_kl"} <= set(
        LOGGED_TERMS
    )
    h = trained.history
    assert len(h) == 3 and list(h["epoch"]) == [0, 1, 2]
    for split in ("train", "validation"):
        for term in (*LOGGED_TERMS, "n_active_dims"):
            col = f"{split}_{term}"
            assert col in h and h[col].notna().all(), col
    assert (h["kl_weight"] < 0.2).all()  # inside the default 50-epoch warm-up (towards β = 2)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]


def test_latent_and_expression(trained):
    z = trained.get_latent_representation(batch_size=57)
    assert z.shape == (400, 4) and np.isfinite(z).all()
    np.testing.assert_allclose(
        trained.get_latent_representation(batch_size=400), z, rtol=1e-5, atol=1e-6
    )
    zs = trained.get_latent_representation(give_mean=False)
    assert not np.allclose(zs, z)
    trained.get_latent_representation(store_key="X_regvi")
    assert trained.adata.obsm["X_regvi"].shape == (400, 4)
    rho = trained.get_normalized_expression(batch_size=100)
    assert rho.shape == (400, 80) and (rho >= 0).all()
    df = trained.get_normalized_expression(
        gene_list=["gene_3", "gene_1"], library_size=1e4, return_pandas=True
    )
    assert list(df.columns) == ["gene_3", "gene_1"] and df.index[0] == "cell_0"
    with pytest.raises(KeyError, match="gene_x"):
        trained.get_normalized_expression(gene_list=["gene_x"])


def test_latent_on_new_data_and_unseen_category(trained):
    new = trained.adata[:50].copy()
    z = trained.get_latent_representation(new)
    np.testing.assert_allclose(z, trained.get_latent_representation()[:50], rtol=1e-5, atol=1e-6)
    new.obs["library"] = new.obs["library"].astype(str)
    new.obs.iloc[0, new.obs.columns.get_loc("library")] = "lib_9"
    with pytest.raises(ValueError, match="lib_9"):
        trained.get_latent_representation(new)
    assert trained.get_latent_representation(new, category_fallback={"library": "lib_0"}).shape == (
        50,
        4,
    )
    with pytest.raises(ValueError, match="features"):
        trained.get_latent_representation(trained.adata[:, :70].copy())


def test_save_load_bit_exact(trained, tmp_path):
    trained.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "history.csv", "model.safetensors"]
    loaded = regvi.load(tmp_path / "m", adata=trained.adata)
    for (k, v), (k2, v2) in zip(
        trained.module.state_dict().items(), loaded.module.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    assert np.array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    pd.testing.assert_frame_equal(loaded.history, trained.history, check_dtype=False)
    no_data = regvi.load(tmp_path / "m")
    assert np.array_equal(
        no_data.get_latent_representation(trained.adata), trained.get_latent_representation()
    )
    with pytest.raises(ValueError, match="loaded without data"):
        no_data.get_latent_representation()
    with pytest.raises(FileExistsError):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)


def test_load_checks_genes_and_categories(trained, tmp_path):
    trained.save(tmp_path / "m")
    renamed = trained.adata.copy()
    renamed.var_names = [f"other_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="80 model features missing"):
        regvi.load(tmp_path / "m", adata=renamed)
    reordered = trained.adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="different order"):
        regvi.load(tmp_path / "m", adata=reordered)
    unseen = trained.adata.copy()
    unseen.obs["library"] = "lib_new"
    with pytest.raises(ValueError, match="lib_new"):
        regvi.load(tmp_path / "m", adata=unseen)
    missing = trained.adata.copy()
    del missing.obs["library"]
    with pytest.raises(KeyError, match="library"):
        regvi.load(tmp_path / "m", adata=missing)


def test_corrupt_model_dirs(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        regvi.load(tmp_path / "nothing")
    trained.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="safetensors"):
        regvi.load(tmp_path / "m")
    trained.save(tmp_path / "m2")
    (tmp_path / "m2" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        regvi.load(tmp_path / "m2")
    trained.save(tmp_path / "m3")
    (tmp_path / "m3" / "model.safetensors").unlink()
    (tmp_path / "m3" / "model.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        regvi.load(tmp_path / "m3")
    trained.save(tmp_path / "m4")
    meta = json.loads((tmp_path / "m4" / "config.json").read_text())
    meta["module_config"]["n_latent"] = 7
    (tmp_path / "m4" / "config.json").write_text(json.dumps(meta))
    with pytest.raises((ValueError, RuntimeError)):
        regvi.load(tmp_path / "m4")


def test_bad_train_arguments(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="batch_size"):
        m.train(max_epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="max_epochs"):
        m.train(max_epochs=-3)
    with pytest.raises(ValueError, match="lr"):
        m.train(max_epochs=1, lr=0)
    with pytest.raises(TypeError, match="n_hiden"):
        regvi.RegVI(sim, library_key="library", n_hiden=8)
    with pytest.raises(ValueError, match="n_latent"):
        regvi.RegVI(sim, library_key="library", n_latent=0)
    with pytest.raises(TypeError, match="AnnData"):
        regvi.RegVI(sim.X, library_key="library")


def _never_improving(sim, **train_kwargs) -> regvi.RegVI:
    """A model trained with an impossible min_delta (nothing improves after epoch 0),
    patience 2 and a 5-epoch warm-up."""
    m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    m.train(
        max_epochs=12,
        min_delta_per_feature=1e6,
        patience=2,
        n_epochs_kl_warmup=5,
        progress_bar=False,
        **train_kwargs,
    )
    return m


def test_early_stopping_respects_warmup_and_patience(sim):
    m = _never_improving(sim, max_kl_weight=1.0)
    # warmup epochs 1–4 never count; epochs 5 and 6 exhaust patience
    assert m.early_stopping.stopped_epoch == 6 and len(m.history) == 7
    assert _never_improving(sim, stop_during_warmup=True).early_stopping.stopped_epoch == 2


def test_max_kl_weight_scales_the_warmup_and_not_early_stopping(sim):
    m = _never_improving(sim)  # the default beta = 2
    h = m.history
    np.testing.assert_allclose(h["kl_weight"], [0.0, 0.4, 0.8, 1.2, 1.6, 2.0, 2.0])
    # the warm-up is over at epoch 5 (not when the weight passes 1, at epoch 3)
    assert m.early_stopping.stopped_epoch == 6
    # the loss weighs KL_z by beta; the monitored ELBO does not
    last = h.iloc[-1]
    np.testing.assert_allclose(
        last["train_loss"] - last["train_elbo"],
        last["train_kl_z"] + last["train_global"],
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="max_kl_weight"):
        m.train(max_epochs=1, max_kl_weight=0)
    with pytest.raises(TypeError, match="max_kl_weight"):
        m.train(max_epochs=1, max_kl_weight="2")


def test_training_is_seeded(sim):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
        m.train(max_epochs=2, early_stopping=False, progress_bar=False, seed=5)
        runs.append(m.get_latent_representation())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_divergence_is_a_clear_error(sim):
    m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    with torch.no_grad():
        m.module.decoder.out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        m.train(max_epochs=2, early_stopping=False, progress_bar=False, initialise=False)


def test_stratified_validation_uses_labels(sim):
    m = regvi.RegVI(sim, library_key="library", labels_key="cell_type", n_hidden=8, n_latent=2)
    m.train(max_epochs=1, stratify_validation=True, early_stopping=False, progress_bar=False)
    assert len(m.validation_indices) == pytest.approx(30, abs=5)
    assert not set(m.train_indices) & set(m.validation_indices)


def test_bundled_real_data_trains():
    adata = regvi.datasets.kang_pbmc_small()
    assert adata.n_obs > 3000 and adata.n_vars == 2000
    assert set(adata.obs["condition"]) == {"ctrl", "stim"}
    m = regvi.RegVI(adata, library_key="condition", labels_key="cell_type", n_hidden=32, n_latent=8)
    h = m.train(max_epochs=2, early_stopping=False, progress_bar=False)
    assert np.isfinite(h["validation_elbo"]).all()


@pytest.mark.slow
def test_single_model_quickstart_cli(tmp_path):
    from regvi.quickstart import main

    out = tmp_path / "qs"
    main(["--out", str(out), "--max-epochs", "2"])
    for name in ("model/model.safetensors", "training_curves.png", "umap.png", "summary.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    with pytest.raises(SystemExit, match="not empty"):
        main(["--out", str(out), "--max-epochs", "1"])


def test_training_after_inference_uses_train_mode(sim):
    """Inference sets eval mode; a later train() must switch dropout back on."""
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def __init__(self):
            self.modes: list[bool] = []

        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            self.modes.append(all(m.training for m in plan.module.modules()))

    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=2)
    model.get_latent_representation()
    probe = Probe()
    model.train(max_epochs=1, early_stopping=False, progress_bar=False, callbacks=[probe])
    assert probe.modes and all(probe.modes)


def test_optimizer_state_round_trip_and_resume(sim, tmp_path):
    """Adam moments survive a checkpoint (safetensors + JSON) and are loaded on resume."""
    import lightning.pytorch as pl

    from regvi.io import load_optimizer_state, save_optimizer_state

    class Grab(pl.Callback):
        state = None

        def on_train_end(self, trainer, plan):
            Grab.state = trainer.optimizers[0].state_dict()

    model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=2)
    model.train(max_epochs=2, early_stopping=False, progress_bar=False, callbacks=[Grab()])
    saved = Grab.state
    save_optimizer_state(saved, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    loaded = load_optimizer_state(tmp_path)
    assert loaded["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    for idx, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(loaded["state"][idx][k], v), (idx, k)
    assert load_optimizer_state(tmp_path / "nothing") is None

    class Check(pl.Callback):
        steps = None

        def on_train_start(self, trainer, plan):
            Check.steps = [float(s["step"]) for s in trainer.optimizers[0].state.values()]

    model.train(
        max_epochs=1,
        early_stopping=False,
        progress_bar=False,
        optimizer_state=loaded,
        callbacks=[Check()],
    )
    n_steps = float(saved["state"][0]["step"])
    assert n_steps > 0 and Check.steps and all(s == n_steps for s in Check.steps)


def test_compiled_training_matches_eager(sim):
    """train(compile=True): the loss through torch.compile (dynamic shapes, the KL weight as a
    tensor) equals eager's on fixed samples, and trains as eager does (the sampled z, l and
    theta come from another random stream, so the curves agree only statistically) through a
    KL warmup without a recompile per batch or epoch."""
    import torch._dynamo

    from regvi.data import make_loader

    torch._dynamo.reset()
    m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=4)
    data = m._dataset()
    compiled = torch.compile(m.module.loss, dynamic=True)
    m.module.eval()
    for n, batch in zip((128, 40), make_loader(data, np.arange(168), 128, False), strict=True):
        assert batch["x"].shape[0] == n
        for kl in (0.25, 1.0):
            eager = m.module.loss(batch, 300, kl_weight=kl, sample=False)
            comp = compiled(batch, 300, kl_weight=torch.tensor(kl), sample=False)
            for k in ("loss", "reconstruction", "kl_z", "global"):
                torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    runs = {}
    for flag in (False, True):
        torch.manual_seed(0)  # the same initial weights
        model = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=4)
        runs[flag] = model.train(
            max_epochs=6,
            n_epochs_kl_warmup=4,
            early_stopping=False,
            progress_bar=False,
            seed=0,
            compile=flag,
        )
    np.testing.assert_allclose(runs[True]["kl_weight"], runs[False]["kl_weight"])
    val = {k: h["validation_loss"].to_numpy() for k, h in runs.items()}
    # it learns: with the library one-hot in the encoder epoch 0 is already low (0.91 × it at
    # epoch 5, compiled and eager alike)
    assert val[True][-1] < 0.95 * val[True][0]
    # run-to-run noise of this tiny model is ~10 %; a broken gradient is far off
    assert val[True][-1] == pytest.approx(val[False][-1], rel=0.15)
    # one graph serves every batch size and warmup epoch (dynamic shapes, kl_weight a tensor)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3, graphs
