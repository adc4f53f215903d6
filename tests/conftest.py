"""Shared fixtures (small simulated data, quiet Lightning, one torch thread per test process)
and the unit/integration markers."""

from __future__ import annotations

import contextlib
import http.server
import inspect
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch

import regvi

torch.set_num_threads(1)  # tiny matmuls: OpenMP sync across 2 threads costs more than it gains
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*litlogger.*")


@pytest.fixture
def sim():
    """A 300-cell × 60-gene simulated dataset with 3 libraries and 2 technologies."""
    return regvi.simulate(
        n_cells=300, n_genes=60, n_cell_types=3, n_libraries=3, n_technologies=2, seed=1
    )


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A briefly trained model on simulated data (shared by read-only tests)."""
    adata = regvi.simulate(n_cells=400, n_genes=80, n_cell_types=3, n_libraries=2, seed=2)
    model = regvi.RegVI(adata, library_key="library", n_hidden=32, n_latent=4)
    model.train(max_epochs=3, early_stopping=False, progress_bar=False)
    return model


# ------------------------------------------------------------------ unit / integration markers
# Every test gets exactly one of the markers `unit` or `integration` (pyproject.toml):
#   python -m pytest -m unit          the quick loop (README gives its measured time)
#   python -m pytest -m "integration and not load"   Ray, MLflow servers, subprocesses, faults
# Independently, `fault` (set by the tests themselves) marks the mid-sweep fault injection and
# 2-node cluster tests: the default run leaves them (and `load`) out, `.ci/run` runs
# `python -m pytest -m fault` after it.
# A test is integration when the first rule that applies says so:
#   1. it carries @pytest.mark.integration or @pytest.mark.unit itself (that marker wins);
#   2. it is marked slow or load;
#   3. its module is in INTEGRATION_MODULES;
#   4. it uses a fixture in INTEGRATION_FIXTURES;
#   5. it, or a helper of its module it calls, runs one of INTEGRATION_CALLS (a subprocess, an
#      MLflow server, Ray);
#   6. it is in MEASURED_SLOW (measured too slow for the loop; see there).
# Otherwise it is a unit test.
INTEGRATION_MODULES = {
    "test_sweep",  # `python -m regvi.sweep` subprocesses, MLflow server, faults
    "test_cluster",  # a two-node Ray cluster
    "test_disk_full",  # a real full disk (tmpfs mount) under a sweep
    "test_load",  # the 50-trial load sweep
    "test_docs",  # the Sphinx build of docs/ in a subprocess
    "test_map_cli",  # MLflow runs and registry; its module fixture trains a reference (~50 s)
}
INTEGRATION_FIXTURES = {
    "ray_local",  # ray.init (test_cleanup, test_evaluator)
    "pool",  # Ray evaluator actors
    "two_node_cluster",  # `ray start` head + worker
    "small_disk",  # mounts a size-limited tmpfs and fills it
    "multiome",  # test_mapping: trains a RegMultiVI reference (~55 s)
}
INTEGRATION_CALLS = ("subprocess.", "Popen(", "mlflow_server(", "ray.init(", "init_ray(")
# Rule 6, "file.py::test_name" (every parametrisation), with seconds (setup + call) measured on
# this 2-CPU machine while benchmarks ran: in a first `pytest -m unit --durations=0` / alone.
# They train for many epochs, run scib-metrics or exact neighbour searches, create MLflow
# stores, or read ../shared/data; tests under ~3 s alone stay in the loop.
MEASURED_SLOW = {
    "test_joint_embedding.py::test_training_with_the_joint_embedding_keeps_thinned_cells_closer",  # 122
    "test_evaluation_fixes.py::test_scib_total_matches_scib_metrics_benchmarker",  # 99
    "test_evaluation.py::test_exact_diffusion_neighbours_match_pynndescent_on_small_labels",  # 46
    "test_model.py::test_bundled_real_data_trains",  # 35
    "test_evaluation_fixes.py::test_scib_aggregates_skip_nan_metrics_as_benchmarker",  # 28
    "test_model.py::test_compiled_training_matches_eager",  # 26
    "test_tracking.py::test_an_epoch_whose_report_was_lost_is_logged_from_the_checkpoint",  # 25
    "test_evaluation_fixes.py::test_sparse_reference_pca_is_centred_pca_as_scanpy",  # 18 / 12
    "test_evaluation.py::test_exact_knn_matches_brute_force",  # 18 / 11
    "test_multimodal.py::test_attribution_api_summary_and_plot",  # 14 / 14
    "test_evaluation.py::test_numpy_fuzzy_connectivities_equal_umaps",  # 13 / 6
    "test_mlflow_ui.py::test_an_existing_experiment_gets_the_tag_but_a_users_value_is_kept",  # 11 / 6
    "test_model.py::test_training_is_seeded",  # 10 / 5
    "test_label_transfer.py::test_kang_transfer_across_donors",  # 9 / 6, shared data
    "test_multimodal.py::test_three_modalities",  # 8 / 4
    "test_mlflow_ui.py::test_a_new_experiment_is_tagged_as_model_training",  # 8 / 5
    "test_scale.py::test_training_on_mmap_matches_in_memory",  # 6 / 19
}


def _calls_out(function) -> bool:
    """Rule 5: the test, or a helper of its module it calls by name, has an INTEGRATION_CALLS."""
    module = inspect.getmodule(function)
    helpers = [
        g
        for name in function.__code__.co_names
        if inspect.isfunction(g := getattr(module, name, None)) and g.__module__ == module.__name__
    ]
    for f in (function, *helpers):
        try:
            source = inspect.getsource(f)
        except (OSError, TypeError):
            continue
        if any(call in source for call in INTEGRATION_CALLS):
            return True
    return False


def _is_integration(item: pytest.Item) -> bool:
    if item.get_closest_marker("slow") or item.get_closest_marker("load"):
        return True
    if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
        return True
    if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    function = getattr(item, "function", None)
    if function is not None and _calls_out(function):
        return True
    return f"{item.path.name}::{item.originalname}" in MEASURED_SLOW


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        item.add_marker(pytest.mark.integration if _is_integration(item) else pytest.mark.unit)
    # a renamed test would silently fall back into the loop: name stale entries
    collected = {f"{item.path.name}::{item.originalname}" for item in items}
    files = {item.path.name for item in items}
    stale = sorted(t for t in MEASURED_SLOW if t.split("::")[0] in files and t not in collected)
    if stale:
        warnings.warn(
            pytest.PytestWarning(f"tests/conftest.py MEASURED_SLOW: no such test {stale}"),
            stacklevel=1,
        )


# ------------------------------------------------------------------ shared data required in CI
# Tests that need ../shared/data next to the checkout skip (or xfail) with a reason naming it when
# it is missing; with REGVI_REQUIRE_SHARED_DATA=1 (set by .ci/run) such a skip is a failure.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("REGVI_REQUIRE_SHARED_DATA") != "1" or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "shared/data" in reason or "shared data" in reason:
        report.outcome = "failed"
        report.longrepr = f"REGVI_REQUIRE_SHARED_DATA=1, but skipped: {reason}"


# ------------------------------------------------------------------ catalogued datasets
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that does not log each request."""

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """A real HTTP server on 127.0.0.1 (free port) serving ``folder``; yields its base URL."""
    import functools
    import threading

    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def http_folder():
    """``serve_folder`` as a fixture: ``with http_folder(path) as url: ...``."""
    return serve_folder


@pytest.fixture(scope="session")
def data_mirror():
    """A real HTTP server on 127.0.0.1 serving ../shared/data (the built dataset files), as a
    user's mirror would; yields its base URL. Skips (fails in CI) without ../shared/data."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data at {SHARED_DATA} (../shared/data)")
    with serve_folder(SHARED_DATA) as url:
        yield url


@pytest.fixture(scope="session")
def dataset_cache(data_mirror, tmp_path_factory):
    """Every catalogued dataset fetched from :func:`data_mirror` into a session cache, which
    ``$REGVI_DATA_DIR`` points at for the session (shipped configs name ``dataset:<name>``)."""
    from regvi.datasets import catalog

    cache = tmp_path_factory.mktemp("regvi-datasets")
    catalog.fetch(list(catalog.CATALOG), mirror=data_mirror, cache=cache, log=lambda _: None)
    old = os.environ.get(catalog.ENV_DIR)
    os.environ[catalog.ENV_DIR] = str(cache)
    try:
        yield cache
    finally:
        if old is None:
            os.environ.pop(catalog.ENV_DIR, None)
        else:
            os.environ[catalog.ENV_DIR] = old
