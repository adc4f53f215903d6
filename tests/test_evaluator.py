"""The sweep's warm evaluators on a real local Ray (2 CPUs): same metrics as in-process
evaluation, one trial per evaluator at a time, and a fallback when an evaluator dies."""

from __future__ import annotations

import numpy as np
import pytest

import regvi
from regvi.sweep.evaluator import (
    LEASE_NAME,
    evaluate_in_pool,
    evaluate_to_files,
    start_pool,
)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sub():
    a = regvi.simulate(n_cells=400, n_genes=60, n_cell_types=3, n_libraries=2, seed=3)
    a.obsm["X_emb"] = np.random.default_rng(0).normal(size=(a.n_obs, 5)).astype(np.float32)
    return a


@pytest.fixture(scope="module")
def pool(ray_local):
    lease = start_pool("pooltest", 1)  # the handle keeps the actors alive
    yield lease


OPTIONS = {
    "embedding_key": "X_emb",
    "library_key": "library",
    "label_key": "cell_type",
    "n_subsample": None,
    "seed": 0,
    "scib": False,
    "neighbourhood": True,
}


def test_a_sweep_without_evaluators_evaluates_in_the_trial(ray_local, sub):
    assert evaluate_in_pool(None, sub, OPTIONS, ["cell_type"], False, False) is None
    assert evaluate_in_pool("no-such-sweep", sub, OPTIONS, ["cell_type"], False, False) is None


def test_pooled_evaluation_equals_local_and_is_warm_the_second_time(ray_local, pool, sub):
    local = evaluate_to_files(sub, OPTIONS, ["cell_type"], False, True)
    first = evaluate_in_pool("pooltest", sub, OPTIONS, ["cell_type"], False, True)
    second = evaluate_in_pool("pooltest", sub, OPTIONS, ["cell_type"], False, True)
    assert first is not None and second is not None
    assert (first["evaluator_warm"], second["evaluator_warm"]) == (0.0, 1.0)
    timing = {k for k in local["metrics"] if k.startswith("eval_seconds_")}
    assert {k: v for k, v in first["metrics"].items() if k not in timing} == pytest.approx(
        {k: v for k, v in local["metrics"].items() if k not in timing}, nan_ok=True
    )
    assert any(k.startswith("nc_") for k in first["metrics"])
    assert set(first["files"]) == set(local["files"]) >= {"metrics.json", "per_cell.csv"}
    np.testing.assert_allclose(first["coords"], local["coords"], atol=1e-5)
    assert ray_local.get(pool.size.remote()) == 1


def test_an_evaluator_that_dies_is_released_and_the_trial_falls_back(ray_local, pool, sub):
    lease = ray_local.get_actor(LEASE_NAME.format(sweep="pooltest"))  # found by name
    i, actor = ray_local.get(lease.acquire.remote())
    ray_local.get(lease.release.remote(i))
    ray_local.kill(actor, no_restart=True)
    assert evaluate_in_pool("pooltest", sub, OPTIONS, ["cell_type"], False, False) is None
    # the lease was given back: the next trial is not left waiting
    got = ray_local.get(lease.acquire.remote(5.0))
    assert got is not None and got[0] == i


def test_a_lost_lease_falls_back_and_the_lease_lives_on_the_drivers_node(ray_local, sub):
    """The lease is placed on the driver's node; if it is lost anyway (its node died: the CI
    failure of a 2-node sweep), a trial evaluates in its own worker instead of failing."""
    lease = start_pool("lostlease", 1)
    here = ray_local.get_runtime_context().get_node_id()
    assert ray_local.get(lease.node_id.remote()) == here
    ray_local.kill(lease, no_restart=True)
    assert evaluate_in_pool("lostlease", sub, OPTIONS, ["cell_type"], False, False) is None
