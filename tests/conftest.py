"""Shared fixtures: small simulated data, quiet Lightning, one torch thread per test process."""

from __future__ import annotations

import logging
import warnings

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
