"""GPU path, tested on CPU: device-resident CSR minibatches, precision, GPU memory sharing.

The device code is plain torch, so every piece runs here with ``device="cpu"``; on a GPU
machine the same tests run on CUDA when it is visible (``DEVICES``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import regvi
from regvi.data import make_loader
from regvi.data.device import (
    DeviceCSR,
    check_precision,
    device_bytes_needed,
    gather_csr_rows,
    limit_gpu_memory,
    resolve_data_on_device,
    to_device,
    training_device,
)
from regvi.data.loader import CountBatches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _csr(n=50, g=30, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.random(n, g, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.ceil(X.data * 10).astype(np.float32)
    X[7] = 0  # an empty row
    X.eliminate_zeros()
    return X.tocsr()


@pytest.mark.parametrize("device", DEVICES)
def test_gather_csr_rows_equals_scipy_rows(device):
    X = _csr()
    dev = DeviceCSR(X, device)
    assert dev.nbytes == 8 * (X.shape[0] + 1) + 8 * X.nnz  # int64 indptr, int32 indices
    for idx in (np.array([3, 7, 0, 49, 3]), np.arange(50)[::-1], np.array([7]), np.array([], int)):
        got = dev.rows(torch.as_tensor(idx.copy(), device=device)).cpu().numpy()
        np.testing.assert_array_equal(got, X[idx].toarray())
        # with the entry count from the host row pointers (no device sync): the same rows
        total = dev.n_entries(idx)
        assert total == X[idx].nnz
        hint = gather_csr_rows(
            dev.indptr, dev.indices, dev.data, torch.as_tensor(idx.copy(), device=device), 30, total
        )
        np.testing.assert_array_equal(hint[0].cpu().numpy(), X[idx].toarray())
    # all-empty selection
    got, flat, values = gather_csr_rows(dev.indptr, dev.indices, dev.data, torch.tensor([7, 7]), 30)
    assert got.shape == (2, 30) and float(got.abs().sum()) == 0.0 and len(flat) == len(values) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_batches_carry_their_stored_entries(device):
    """x_nonzero / x_values (host and device) are exactly the non-zeros of the dense batch."""
    X = _csr()
    for data in (CountBatches(X, {}), to_device(CountBatches(X, {}), device)):
        for idx in (np.array([3, 7, 0, 49, 3, 12]), np.arange(10, 30)):
            b = data[idx]
            x = b["x"].cpu().reshape(-1)
            flat, values = b["x_nonzero"].cpu(), b["x_values"].cpu()
            assert flat.dtype == torch.int64 and values.dtype == torch.float32
            assert sorted(flat.tolist()) == torch.nonzero(x).squeeze(1).tolist()
            torch.testing.assert_close(values, x[flat], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_device_batches_equal_host_batches(sim, device):
    model = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    host = model._dataset()
    moved = to_device(host, device)
    idx = np.random.default_rng(0).permutation(len(host))[:64]
    a, b = host[idx], moved[idx]
    assert set(a) == set(b)
    for k in a:
        assert b[k].device.type == device, k
        if k in ("x_nonzero", "x_values"):
            continue  # the same entries, in another order (checked below)
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=0, atol=0, msg=k)
    for batch in (a, b):
        order = torch.argsort(batch["x_nonzero"].cpu())
        batch["sorted"] = (batch["x_nonzero"].cpu()[order], batch["x_values"].cpu()[order])
    for u, v in zip(a["sorted"], b["sorted"], strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert device_bytes_needed(host) >= DeviceCSR(host.X, "cpu").nbytes


def test_training_with_data_on_device_matches_host_path(sim):
    """Same seed, same batches: the device-built minibatches give the same losses."""
    hist = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        m = regvi.RegVI(sim, library_key="library", n_hidden=16, n_latent=3)
        h = m.train(
            max_epochs=2, early_stopping=False, progress_bar=False, data_on_device=on_device
        )
        assert m.data_on_device is on_device
        hist[on_device] = h
    for col in ("train_loss", "validation_elbo"):
        np.testing.assert_allclose(hist[True][col], hist[False][col], rtol=1e-5)


def test_multimodal_training_with_data_on_device_matches_host_path():
    data = regvi.simulate_multiome(
        n_cells=200, n_genes=30, n_peaks=80, n_cell_types=3, n_libraries=2, seed=4
    )
    losses = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        m = regvi.RegMultiVI(data, library_key="library", n_hidden=16, n_latent=2)
        h = m.train(
            max_epochs=2, early_stopping=False, progress_bar=False, data_on_device=on_device
        )
        losses[on_device] = h["train_loss"].to_numpy()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)


def test_auto_keeps_host_data_on_cpu_and_memory_mapped_data(sim, tmp_path):
    host = CountBatches(_csr(), {})
    cpu = torch.device("cpu")
    assert resolve_data_on_device("auto", host, cpu) is False
    assert resolve_data_on_device(True, host, cpu) is True
    assert (
        resolve_data_on_device("auto", host, torch.device("cuda", 0), memory_mapped=True) is False
    )
    with pytest.raises(ValueError, match="data_on_device='yes'; expected True, False or 'auto'"):
        resolve_data_on_device("yes", host, cpu)
    m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    m.train(max_epochs=1, progress_bar=False)
    assert m.data_on_device is False


def test_pinned_host_batches():
    host = CountBatches(_csr(), {})
    loader = make_loader(host, np.arange(50), 16, shuffle=False, pin_memory=True)
    assert loader.pin_memory is True
    if torch.cuda.is_available():
        assert next(iter(loader))["x"].is_pinned()


def test_bf16_mixed_precision_trains_with_float32_likelihood(sim):
    torch.manual_seed(0)
    fp32 = regvi.RegVI(sim, library_key="library", n_hidden=32, n_latent=4)
    h32 = fp32.train(max_epochs=8, early_stopping=False, progress_bar=False)
    torch.manual_seed(0)
    mixed = regvi.RegVI(sim, library_key="library", n_hidden=32, n_latent=4)
    h16 = mixed.train(
        max_epochs=8, early_stopping=False, progress_bar=False, precision="bf16-mixed"
    )
    assert all(p.dtype == torch.float32 for p in mixed.module.parameters())
    assert np.isfinite(h16["validation_elbo"]).all()
    # bf16 matmuls change the numbers a little, not the fit
    np.testing.assert_allclose(
        h16["validation_elbo"].iloc[-3:], h32["validation_elbo"].iloc[-3:], rtol=0.03
    )
    assert not np.allclose(h16["train_loss"], h32["train_loss"], rtol=0, atol=0)
    # the decoder output (likelihood input) stays float32 under autocast
    batch = next(iter(make_loader(mixed._dataset(), np.arange(32), 32, shuffle=False)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inf = mixed.module.inference(batch)
        gen = mixed.module.generative(inf["z"], inf["library"], batch)
    assert gen["rho"].dtype == torch.float32 and inf["qz_var"].dtype == torch.float32


def test_precision_and_accelerator_errors(sim):
    cpu = torch.device("cpu")
    assert check_precision(32, cpu) == "32-true"
    assert check_precision("bf16", cpu) == "bf16-mixed"
    with pytest.raises(ValueError, match="precision='64'; expected one of"):
        check_precision("64", cpu)
    with pytest.raises(ValueError, match="'16-mixed' needs a CUDA device"):
        check_precision("16-mixed", cpu)
    m = regvi.RegVI(sim, library_key="library", n_hidden=8, n_latent=2)
    with pytest.raises(ValueError, match="precision='half'"):
        m.train(max_epochs=1, precision="half", progress_bar=False)
    assert not m.is_trained  # refused before any training
    assert training_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="accelerator='gpu', but no CUDA device is visible"):
            training_device("gpu")


def test_gpu_memory_share_for_fractional_trials():
    with pytest.raises(ValueError, match="fraction=0"):
        limit_gpu_memory(0)
    assert limit_gpu_memory(1.0) is None  # a whole GPU: nothing to cap
    if torch.cuda.is_available():
        assert limit_gpu_memory(0.5) == 0.5
    else:
        assert limit_gpu_memory(0.5) is None


def test_jax_does_not_preallocate_gpu_memory():
    """The evaluation sets JAX's allocator to on-demand before scib-metrics imports JAX; the
    sweep passes the same settings to every Ray worker."""
    from regvi.sweep.runner import WORKER_ENV

    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    code = (
        "import os, sys; import evaluation.scib; import jax; "
        "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'], "
        "os.environ['XLA_PYTHON_CLIENT_ALLOCATOR'], 'jax' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["false", "platform", "True"]
    assert WORKER_ENV["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert WORKER_ENV["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"


def _sweep(training: dict, resources: dict | None = None) -> dict:
    cfg = {
        "name": "t",
        "data": {"path": "bundled:kang_pbmc_small", "library_key": "condition"},
        "training": {"max_epochs": 2, **training},
        "search": {"n_hidden": {"type": "categorical", "values": [16, 32]}},
    }
    if resources:
        cfg["resources"] = resources
    return cfg


def test_sweep_config_device_settings():
    from regvi.sweep.config import ConfigError, parse_config

    ok = parse_config(_sweep({"precision": "bf16-mixed", "data_on_device": "auto"}))
    assert ok.training["precision"] == "bf16-mixed"
    gpu = parse_config(
        _sweep({"precision": "16-mixed"}, {"gpus_per_worker": 0.25, "cpus_per_worker": 1})
    )
    assert gpu.gpus_per_worker == 0.25
    cases = {
        "training.precision: 'fp8'; expected one of": _sweep({"precision": "fp8"}),
        "training.precision: '16-mixed' needs GPUs": _sweep({"precision": "16-mixed"}),
        "training.data_on_device: 'always'; expected true, false": _sweep(
            {"data_on_device": "always"}
        ),
        "resources.gpus_per_worker: 1.5; expected 0, a fraction": _sweep(
            {}, {"gpus_per_worker": 1.5}
        ),
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            parse_config(raw)
