"""Reference mapping (``RegVI.load_query_data``): new categories get their own technical
terms, the reference's weights and latent do not move, bad queries are refused up front."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import regvi


@pytest.fixture(scope="module")
def split():
    """A reference (libraries 0, 1) and a query (libraries 2, 3) of one simulation."""
    adata = regvi.simulate(n_cells=600, n_genes=60, n_cell_types=3, n_libraries=4, seed=3)
    libs = sorted(adata.obs["library"].unique())
    ref = adata[adata.obs["library"].isin(libs[:2])].copy()
    query = adata[adata.obs["library"].isin(libs[2:])].copy()
    return ref, query


@pytest.fixture(scope="module")
def reference(split):
    ref, _ = split
    model = regvi.RegVI(ref, library_key="library", n_hidden=32, n_latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=4, progress_bar=False)
    return model


def _state(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _reference_part(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return new[tuple(slice(0, n) for n in old.shape)]


def _assert_reference_entries_unchanged(reference_state, query_state) -> None:
    """Every reference entry (rows, and one-hot columns of grown layers) is byte-identical."""
    for name, old in reference_state.items():
        part = _reference_part(query_state[name], old)
        if ".body.linears." in name and name.endswith("weight"):
            part = query_state[name][:, : old.shape[1]]
        assert torch.equal(part, old), f"reference entries of {name} moved"


def test_new_libraries_get_their_own_technical_terms(split, reference):
    _, query = split
    q = regvi.RegVI.load_query_data(query, reference)
    assert q.registry.categories["library"] == ["lib_0", "lib_1", "lib_2", "lib_3"]
    assert q.query.added_categories == {"library": ["lib_2", "lib_3"]}
    assert q.config.n_library_groups == 4 and q.config.n_dispersion_groups == 4
    assert q.module.ambient_log[0].shape[0] == 4
    # new ambient rows start from the query's counts (0.2 × depth-normalised mean), not the
    # prior's log 0.01; new library prior rows from the query's library sizes
    new_ambient = q.module.ambient_log[0][2:].detach()
    assert not torch.allclose(new_ambient, torch.full_like(new_ambient, np.log(0.01)))
    totals = np.asarray(query.X.sum(1)).ravel()
    offset = float(reference.module.library_log_offset)
    lib2 = (query.obs["library"] == "lib_2").to_numpy()
    expected = np.log(totals[lib2]).mean() - offset
    assert float(q.module.library_prior_mean[2]) == pytest.approx(expected, abs=1e-4)
    # the reference's own rows are the reference's
    ref_state, q_state = _state(reference), _state(q)
    for name, old in ref_state.items():
        if "decoder.body.linears" in name and name.endswith("weight"):
            continue  # columns grow; checked below
        assert torch.equal(_reference_part(q_state[name], old), old), name


def test_decoder_columns_map_and_new_ones_start_at_the_reference_mean(split, reference):
    _, query = split
    q = regvi.RegVI.load_query_data(query, reference)
    old = reference.module.decoder.body.linears[0].weight.detach()
    new = q.module.decoder.body.linears[0].weight.detach()
    n_in = reference.config.n_latent
    assert new.shape[1] == old.shape[1] + 2
    assert torch.equal(new[:, : old.shape[1]], old)
    mean = old[:, n_in:].mean(1, keepdim=True)
    assert torch.allclose(new[:, old.shape[1] :], mean.expand(-1, 2))


def test_query_training_fits_only_new_entries_and_the_reference_latent_stays(split, reference):
    ref, query = split
    z_ref = reference.get_latent_representation()
    q = regvi.RegVI.load_query_data(query, reference)
    z_query_before = q.get_latent_representation()
    before = _state(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.train(max_epochs=3, progress_bar=False)
    after = _state(q)
    _assert_reference_entries_unchanged(_state(reference), after)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert {"ambient_log.0", "log_theta_mean", "feature_scaling_raw.0"} <= moved
    assert not any(k.startswith(("z_encoder", "l_encoder", "decoder")) for k in moved)
    # the encoder is the reference's: reference cells encode as before, query cells as before
    np.testing.assert_array_equal(q.get_latent_representation(ref), z_ref)
    np.testing.assert_array_equal(q.get_latent_representation(), z_query_before)
    # the freeze is lifted after training
    assert all(p.requires_grad for p in q.module.parameters())
    assert len(q.history) >= 1 and np.isfinite(q.get_elbo())


def test_query_training_defaults_to_the_short_budget_without_warmup(split, reference):
    """A query's ``train()`` defaults are QUERY_EPOCHS (100 epochs, patience 10, no KL
    warm-up: the reference finished at full KL weight); a reference's are MODEL_EPOCHS."""
    from regvi.training import MODEL_EPOCHS, QUERY_EPOCHS

    _, query = split
    q = regvi.RegVI.load_query_data(query, reference)
    assert q._epoch_budget(None, None, "auto") == (100, 10, None)
    assert reference._epoch_budget(None, None, "auto") == (400, 45, 50)
    assert q._epoch_budget(7, 3, 2) == (7, 3, 2)  # given values win
    assert (QUERY_EPOCHS.max_epochs, MODEL_EPOCHS.max_epochs) == (100, 400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = q.train(progress_bar=False)
    assert 1 <= len(history) <= 100
    assert (history["kl_weight"] == 2.0).all()  # no warm-up: the full β (the default 2) at once
    with pytest.raises(TypeError, match=r"n_epochs_kl_warmup='autoo'.*'auto'"):
        q.train(n_epochs_kl_warmup="autoo", progress_bar=False)


def test_a_query_of_known_libraries_has_nothing_to_train(split, reference):
    """Without new categories or fine-tuning every entry is frozen: train() says so and
    returns (it used to fail inside Lightning: 'does not require grad')."""
    ref, _ = split
    q = regvi.RegVI.load_query_data(ref[:100].copy(), reference)
    assert q.query.added_categories == {}
    before = _state(q)
    with pytest.warns(UserWarning, match="nothing to train"):
        history = q.train(progress_bar=False)
    assert len(history) == 0
    assert all(torch.equal(v, before[k]) for k, v in _state(q).items())
    tuned = regvi.RegVI.load_query_data(ref[:100].copy(), reference, fine_tune="encoder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(tuned.train(max_epochs=1, progress_bar=False)) == 1


def test_fine_tuning_conditioning_and_encoder(split, reference):
    _, query = split
    q = regvi.RegVI.load_query_data(query, reference, fine_tune=["conditioning", "encoder"])
    before = _state(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.train(max_epochs=2, progress_bar=False)
    after = _state(q)
    name = "decoder.body.linears.0.weight"
    n_old = reference.module.decoder.body.linears[0].weight.shape[1]
    assert torch.equal(after[name][:, :n_old], before[name][:, :n_old])
    assert not torch.equal(after[name][:, n_old:], before[name][:, n_old:])
    assert not torch.equal(after["z_encoder.mean.weight"], before["z_encoder.mean.weight"])
    assert torch.equal(after["decoder.out.weight"], before["decoder.out.weight"])


def test_query_is_reproducible_and_saves_as_a_plain_model(split, reference, tmp_path):
    _, query = split
    runs = []
    for _ in range(2):
        q = regvi.RegVI.load_query_data(query, reference)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.train(max_epochs=2, progress_bar=False, seed=5)
        runs.append(_state(q))
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    q.save(tmp_path / "query")
    loaded = regvi.load(tmp_path / "query", adata=query)
    np.testing.assert_array_equal(loaded.get_latent_representation(), q.get_latent_representation())
    # the reference can also be given as a directory
    reference.save(tmp_path / "ref")
    from_dir = regvi.RegVI.load_query_data(query, str(tmp_path / "ref"))
    assert from_dir.registry.categories == q.registry.categories


def test_genes_are_matched_by_name(split, reference):
    _, query = split
    z = regvi.RegVI.load_query_data(query, reference).get_latent_representation()
    shuffled = query[:, np.random.default_rng(0).permutation(query.n_vars)].copy()
    z_shuffled = regvi.RegVI.load_query_data(shuffled, reference).get_latent_representation()
    np.testing.assert_allclose(z_shuffled, z, rtol=1e-5, atol=1e-5)
    # extra query genes are ignored
    extra = query.copy()
    extra.var_names = list(query.var_names)
    wider = __import__("anndata").concat([extra, _renamed(extra, "x_")], axis=1, merge="first")
    z_wider = regvi.RegVI.load_query_data(wider, reference).get_latent_representation()
    np.testing.assert_allclose(z_wider, z, rtol=1e-5, atol=1e-5)


def _renamed(adata, prefix):
    out = adata.copy()
    out.var_names = [prefix + v for v in adata.var_names]
    return out


def test_missing_genes_are_refused_or_zero_filled(split, reference):
    _, query = split
    short = query[:, 5:].copy()
    with pytest.raises(ValueError, match=r"lacks 5 of the reference's 60 genes.*allow_missing"):
        regvi.RegVI.load_query_data(short, reference)
    with pytest.warns(UserWarning, match="5 of 60 reference genes are missing"):
        q = regvi.RegVI.load_query_data(short, reference, allow_missing_genes=True)
    X = q._X.toarray() if sp.issparse(q._X) else q._X
    assert X.shape == (query.n_obs, 60) and not X[:, :5].any()
    np.testing.assert_array_equal(
        X[:, 5:], np.asarray(short.X.todense() if sp.issparse(short.X) else short.X)
    )
    renamed = _renamed(query, "ENSG_")
    with pytest.raises(ValueError, match="shares no gene"):
        regvi.RegVI.load_query_data(renamed, reference, allow_missing_genes=True)


def test_bad_queries_are_refused_before_any_work(split, reference):
    ref, query = split
    no_key = query.copy()
    del no_key.obs["library"]
    with pytest.raises(KeyError, match="'library'"):
        regvi.RegVI.load_query_data(no_key, reference)
    nan_key = query.copy()
    nan_key.obs["library"] = nan_key.obs["library"].astype(object)
    nan_key.obs.iloc[0, nan_key.obs.columns.get_loc("library")] = np.nan
    with pytest.raises(ValueError, match=r"obs\['library'\] has 1 missing"):
        regvi.RegVI.load_query_data(nan_key, reference)
    with pytest.raises(ValueError, match="fine_tune"):
        regvi.RegVI.load_query_data(query, reference, fine_tune="decoder")
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        regvi.RegVI.load_query_data(query.X, reference)
    with pytest.raises(TypeError, match="allow_missing_genes"):
        regvi.RegVI.load_query_data(query, reference, allow_missing_genes="yes")
    fresh = regvi.RegVI(ref, library_key="library", n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="not trained"):
        regvi.RegVI.load_query_data(query, fresh)
    fractional = query.copy()
    fractional.X = fractional.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match=r"query adata\.X"):
        regvi.RegVI.load_query_data(fractional, reference)
    q = regvi.RegVI.load_query_data(query, reference)
    with pytest.raises(ValueError, match="initialise=True"):
        q.train(max_epochs=1, initialise=True, progress_bar=False)


# ---------------------------------------------------------------------------------- multimodal
@pytest.fixture(scope="module")
def multiome():
    """A RegMultiVI reference on libraries 0, 1 and the paired query cells of libraries 2, 3."""
    data = regvi.simulate_multiome(n_cells=800, n_genes=60, n_peaks=80, n_libraries=4, seed=0)
    libs = sorted(data["rna"].obs["library"].unique())
    is_ref = data["rna"].obs["library"].isin(libs[:2]).to_numpy()
    ref = {m: a[is_ref].copy() for m, a in data.items()}
    query = {m: a[~is_ref].copy() for m, a in data.items()}
    model = regvi.RegMultiVI(ref, library_key="library", n_hidden=32, n_latent=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=30, progress_bar=False)
    return model, ref, query


def test_multimodal_query_keeps_the_reference_and_fits_new_libraries(multiome):
    reference, ref, query = multiome
    before = _state(reference)
    q = regvi.RegMultiVI.load_query_data(query, reference)
    assert q.query.added_categories == {"library": ["lib_2", "lib_3"]}
    assert all(c.n_library_groups == 4 for c in q.config.configs.values())
    grown = _state(q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.train(max_epochs=3, progress_bar=False)
    after = _state(q)
    _assert_reference_entries_unchanged(before, after)
    moved = {k for k in after if not torch.equal(after[k], grown[k])}
    assert {"mods.rna.ambient_log.0", "mods.atac.feature_scaling_raw.0"} <= moved
    np.testing.assert_array_equal(
        q.get_latent_representation(ref), reference.get_latent_representation()
    )


def test_rna_only_query_cells_land_near_their_paired_twins(multiome):
    """RNA-only cells miss ATAC as unpaired cells do in training: their ATAC block is the
    prior mean. Their twins (the same cells mapped with both modalities) must still be among
    their nearest query cells, and the reference's labels must transfer."""
    from scipy.spatial.distance import cdist

    from regvi.map.labels import transfer_accuracy, transfer_labels

    reference, ref, query = multiome
    paired = regvi.RegMultiVI.load_query_data(query, reference)
    rna_only = regvi.RegMultiVI.load_query_data({"rna": query["rna"]}, reference)
    assert rna_only.query.added_categories == {"library": ["lib_2", "lib_3"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rna_only.train(max_epochs=3, progress_bar=False)  # a missing modality trains nothing
    z_paired = paired.get_latent_representation()
    z_rna = rna_only.get_latent_representation()
    atac, rna = (reference.config.latent_slices()[m] for m in ("atac", "rna"))
    assert not z_rna[:, atac].any()  # the prior mean, as in training
    np.testing.assert_allclose(z_rna[:, rna], z_paired[:, rna], rtol=1e-5, atol=1e-5)
    d = cdist(z_rna, z_paired)
    twin = np.diag(d)
    rank = (d < twin[:, None]).sum(1)
    # measured: median rank 20 of 363 query cells; twin 2.6× closer than a random query cell
    assert np.median(rank) < 0.1 * len(d)
    assert twin.mean() < 0.5 * d.mean()
    labels = ref["rna"].obs["cell_type"].to_numpy()
    table = transfer_labels(reference.get_latent_representation(), labels, z_rna)
    scores = transfer_accuracy(query["rna"].obs["cell_type"].to_numpy(), table["label"])
    assert scores["accuracy"] > 0.7  # measured 0.83 (paired: 0.99)


def test_bad_multimodal_queries_are_refused(multiome):
    reference, _, query = multiome
    with pytest.raises(KeyError, match=r"query modalities \['protein'\]"):
        regvi.RegMultiVI.load_query_data({**query, "protein": query["rna"]}, reference)
    short = {"rna": query["rna"][:, 3:].copy()}
    with pytest.raises(ValueError, match="lacks 3 of the reference's 60 genes"):
        regvi.RegMultiVI.load_query_data(short, reference)
    single = regvi.RegVI(query["rna"], library_key="library", n_hidden=8, n_latent=2)
    with pytest.raises(TypeError, match="reference must be a trained RegMultiVI"):
        regvi.RegMultiVI.load_query_data(query, single)


def test_a_query_without_the_reference_counts_layer_is_refused(split):
    ref, query = split
    ref = ref.copy()
    ref.layers["counts"] = ref.X.copy()
    model = regvi.RegVI(ref, library_key="library", layer="counts", n_hidden=8, n_latent=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(KeyError, match=r"layer='counts' is not in adata\.layers"):
        regvi.RegVI.load_query_data(query, model)
    with_layer = query.copy()
    with_layer.layers["counts"] = with_layer.X.copy()
    q = regvi.RegVI.load_query_data(with_layer[:, ::-1].copy(), model)  # reordered genes too
    assert q.get_latent_representation().shape == (query.n_obs, 2)


def test_data_initialised_dispersion_of_new_libraries_starts_from_the_query(split):
    """With ``dispersion_init="data"`` the reference's theta came from its counts; new
    libraries' theta (and the containment prior's mean) come from the query's counts."""
    ref, query = split
    model = regvi.RegVI(ref, library_key="library", n_hidden=8, n_latent=2, dispersion_init="data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(max_epochs=1, progress_bar=False)
    q = regvi.RegVI.load_query_data(query, model)
    new = q.module.log_theta_mean[2:].detach()
    assert torch.isfinite(new).all()
    assert not torch.allclose(new, torch.full_like(new, np.log(9.0)))
    torch.testing.assert_close(
        q.module.dispersion_rate_prior_mean[2:],
        1.0 / torch.exp(new).rsqrt().mean(-1),
    )
    torch.testing.assert_close(q.module.log_theta_mean[:2], model.module.log_theta_mean)


def test_rna_only_query_on_a_product_of_experts_reference(multiome):
    """latent_mode="poe": a cell without ATAC is encoded by its RNA expert and the prior, so an
    RNA-only query lands exactly where the paired query's RNA-alone posterior is."""
    from regvi.map.labels import transfer_accuracy, transfer_labels

    _, ref, query = multiome
    reference = regvi.RegMultiVI(
        ref, library_key="library", n_hidden=32, n_latent=4, latent_mode="poe"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.train(max_epochs=30, progress_bar=False)
    paired = regvi.RegMultiVI.load_query_data(query, reference)
    rna_only = regvi.RegMultiVI.load_query_data({"rna": query["rna"]}, reference)
    assert rna_only.config.latent_mode == "poe"
    z_rna = rna_only.get_latent_representation()
    np.testing.assert_allclose(
        z_rna, paired.get_latent_representation(modality="rna"), rtol=1e-5, atol=1e-5
    )
    assert np.abs(z_rna - paired.get_latent_representation()).max() > 1e-3  # ATAC adds to z
    labels = ref["rna"].obs["cell_type"].to_numpy()
    table = transfer_labels(reference.get_latent_representation(), labels, z_rna)
    scores = transfer_accuracy(query["rna"].obs["cell_type"].to_numpy(), table["label"])
    assert scores["accuracy"] > 0.9  # measured 1.00 (the block reference above: 0.83)
