"""Count validation and the sparse minibatch path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

import regvi
from regvi.data import (
    CountBatches,
    get_counts,
    make_loader,
    train_validation_split,
    validate_counts,
)


def _with_x(sim, X):
    return AnnData(X=X, obs=sim.obs.copy(), var=sim.var.copy())


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda X: X.__setitem__((0, 0), -1), "negative"),
        (lambda X: X.__setitem__((0, 0), np.nan), "NaN/inf"),
        (lambda X: X.__setitem__((0, 0), np.inf), "NaN/inf"),
        (lambda X: X.__setitem__((0, 0), 0.5), "non-integer"),
    ],
)
def test_bad_counts_refused(sim, mutate, match):
    X = sim.X.toarray().astype(np.float32)
    mutate(X)
    with pytest.raises(ValueError, match=match):
        regvi.RegVI(_with_x(sim, sp.csr_matrix(X)), library_key="library")


def test_non_integer_opt_out(sim):
    """allow_non_integer=True accepts fractional counts, at setup and for new data passed to a
    model later, and only that: NaN/inf and negative values are still refused."""
    X = sim.X.toarray().astype(np.float32) * 0.5
    assert (X != np.round(X)).any()  # the data really is non-integer
    kw = {"library_key": "library", "n_hidden": 8, "n_latent": 2}
    with pytest.raises(ValueError, match="non-integer"):
        regvi.RegVI(_with_x(sim, X), **kw)  # refused without the opt-out

    model = regvi.RegVI(_with_x(sim, X), allow_non_integer=True, **kw)
    assert model.setup_kwargs["allow_non_integer"] is True
    assert model.count_summary == {"n_zero_cells": 0, "n_zero_genes": 0}
    # the opt-out carries over to data given later (validated again on the way in)
    z = model.get_latent_representation(_with_x(sim, X * 1.5))
    assert z.shape == (sim.n_obs, 2) and np.isfinite(z).all()

    for bad, match in ((-0.5, "negative"), (np.nan, "NaN/inf"), (np.inf, "NaN/inf")):
        Y = X.copy()
        Y[0, 0] = bad
        with pytest.raises(ValueError, match=match):
            validate_counts(Y, allow_non_integer=True)
        with pytest.raises(ValueError, match=match):
            regvi.RegVI(_with_x(sim, Y), allow_non_integer=True, **kw)


def test_empty_refused(sim):
    with pytest.raises(ValueError, match="at least one cell"):
        validate_counts(np.zeros((0, 5)))


def test_zero_count_cells_and_genes_reported(sim):
    X = sim.X.toarray()
    X[:4] = 0
    X[:, 7] = 0
    with pytest.warns(UserWarning, match="4 of 300 cells have zero"):
        summary = validate_counts(sp.csr_matrix(X))
    assert summary == {"n_zero_cells": 4, "n_zero_genes": 1}


def test_missing_layer(sim):
    with pytest.raises(KeyError, match="layer='counts'"):
        regvi.RegVI(sim, library_key="library", layer="counts")


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
def test_formats_give_identical_batches(fmt):
    a = regvi.simulate(n_cells=50, n_genes=20, sparse_format=fmt, seed=3)
    X = get_counts(a)
    assert sp.isspmatrix_csr(X) or isinstance(X, np.ndarray)
    data = CountBatches(X, {"continuous": np.zeros((50, 0), np.float32)})
    idx = np.array([5, 1, 40])
    dense = regvi.simulate(n_cells=50, n_genes=20, sparse_format="dense", seed=3).X
    np.testing.assert_array_equal(data[idx]["x"].numpy(), dense[idx])


def test_layer_is_used(sim):
    sim.layers["counts"] = sim.X.copy()
    sim.X = sp.csr_matrix(sim.X.astype(np.float32) * 0.3)  # normalised junk in X
    m = regvi.RegVI(sim, library_key="library", layer="counts", n_hidden=8, n_latent=2)
    assert m.registry.layer == "counts"


def test_loader_covers_every_cell_once_and_is_seeded(sim):
    data = CountBatches(get_counts(sim), {"continuous": np.zeros((sim.n_obs, 0), np.float32)})
    idx = np.arange(sim.n_obs)
    first = [b["index"].numpy() for b in make_loader(data, idx, 64, shuffle=True, seed=7)]
    again = [b["index"].numpy() for b in make_loader(data, idx, 64, shuffle=True, seed=7)]
    assert np.array_equal(np.sort(np.concatenate(first)), idx)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    loader = make_loader(data, idx, 64, shuffle=True, seed=7)
    loader.sampler.set_epoch(1)
    other = np.concatenate([b["index"].numpy() for b in loader])
    assert not np.array_equal(other, np.concatenate(first))
    assert [len(b) for b in first] == [64, 64, 64, 64, 44]


def test_sharded_sampler_gives_disjoint_equal_shards(sim):
    data = CountBatches(get_counts(sim), {"continuous": np.zeros((sim.n_obs, 0), np.float32)})
    shards = [
        np.concatenate(
            [b["index"].numpy() for b in make_loader(data, np.arange(301 - 1), 32, True, 0, 2, r)]
        )
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 150
    assert not set(shards[0]) & set(shards[1])


def test_stratified_split(sim):
    strata = (sim.obs["cell_type"].astype(str) + sim.obs["library"].astype(str)).to_numpy()
    train, val = train_validation_split(sim.n_obs, 0.2, seed=0, strata=strata)
    assert len(set(train) | set(val)) == sim.n_obs and not set(train) & set(val)
    for s in np.unique(strata):
        n = (strata == s).sum()
        assert (strata[val] == s).sum() == min(round(0.2 * n), n - 1)
    _t2, v2 = train_validation_split(sim.n_obs, 0.2, seed=0, strata=strata)
    assert np.array_equal(val, v2)
    with pytest.raises(ValueError, match="validation_fraction"):
        train_validation_split(10, 1.0)
