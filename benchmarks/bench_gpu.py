"""regvi on one GPU: speed, memory, roofline, GPU sharing and JAX's memory, in one timed run.

Written for a single short run on a lent GPU machine (one NVIDIA H200): every part has its own
time cap inside an overall budget (``--budget-s``), results are written to the JSON file after
every measurement (a run stopped from outside still leaves what was measured), and a part that
fails records its error and the script carries on. ``--smoke`` runs every part at toy sizes
(on CPU where no GPU is visible) to check the script end to end.

Parts (``--parts``, in this order):

1. ``peaks`` — dense ``torch.mm`` throughput on the device at exactly the matmul shapes of the
   models (every ``nn.Linear`` of a training forward pass: forward, weight gradient and input
   gradient, at batch 128 and 1024 and the validation batch), in three precisions: ``fp32``
   (torch's default ``float32_matmul_precision="highest"``, what ``precision="32-true"`` runs),
   ``tf32`` (``"high"``) and ``bf16``; plus square matrices for the device's best case. Timed
   with CUDA events, best of several repeats. Shapes and FLOPs come from
   ``benchmarks/bench_roofline.py`` (``count_linear_flops``, ``run_shapes``).
2. ``kang`` — ``RegVI.train`` on the bundled Kang 2018 PBMC subset (4,030 cells × 2,000
   genes): seconds per epoch (median of the epochs after the first, each epoch = training +
   validation on 10 % of the cells), cells per second, ``torch.cuda.max_memory_allocated`` and
   the size of the GPU-resident counts, for batch 128 / 1024 × n_hidden / n_latent 128 / 10
   and 512 / 128 with the counts on the device; then ``data_on_device=False`` (pinned host
   batches), ``precision="bf16-mixed"`` and TF32 at chosen sizes. Early stopping off,
   ``scale_lr_with_batch_size=True``, every run from the same initial weights, so the final
   validation ELBO of bf16 and fp32 runs can be compared. Achieved matmul FLOP/s of every run
   against the measured peak at its own shapes and precision (``epoch_accounting``).
3. ``jax`` — JAX's hold on GPU memory. A child process initialises torch's CUDA context, reads
   the device's free memory, imports JAX, runs a 4096² matmul on the GPU and reads the free
   memory again: once with the environment regvi gives every Ray worker
   (``regvi.sweep.runner.WORKER_ENV``: ``XLA_PYTHON_CLIENT_PREALLOCATE=false``,
   ``XLA_PYTHON_CLIENT_ALLOCATOR=platform``), once without it (JAX's default pre-allocates
   75 % of the device).
4. ``sim`` — as ``kang``, on 100,000 simulated cells × 2,000 genes (``regvi.simulate`` of
   20,000 cells, 10 cell types, 4 libraries, tiled 5 times: same density as one 100k
   simulation, about 63 M non-zeros, at a fifth of the generation time).
5. ``share`` — four trials on one GPU, as a sweep with ``gpus_per_worker: 0.25`` runs them: 4
   child processes, each capping its CUDA allocator with
   ``regvi.data.device.limit_gpu_memory(0.25)``, training on the 100k set (counts on the device
   by ``data_on_device="auto"``) after a common start barrier. Each one's seconds per epoch,
   peak memory and success, and the total cells per second, against the same child run
   alone; the lone child also checks that an allocation above its cap is refused.

Usage
-----
::

    # on the GPU machine (see benchmarks/gpu_run.sh)
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json"
    # here, to check it end to end (CPU, toy sizes, under 2 minutes)
    .venv/bin/python benchmarks/bench_gpu.py --smoke --out /tmp/bench_gpu_smoke.json

At module level only the standard library is imported (the script is also the entry point of
the ``--child`` processes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_gpu.json"
PARTS = ("peaks", "kang", "jax", "sim", "share")
#: time cap of each part (seconds, GPU run); every part also ends by the overall budget
PART_CAPS = {"peaks": 30.0, "kang": 50.0, "jax": 45.0, "sim": 115.0, "share": 80.0}
#: a part is skipped when less than this is left of the overall budget
PART_MIN_S = {"peaks": 5.0, "kang": 10.0, "jax": 10.0, "sim": 20.0, "share": 30.0}
ARCHS = {"128/10": (128, 10), "512/128": (512, 128)}
#: ``regvi.simulate`` arguments of the simulated set (as benchmarks/bench_scvi.py's simNk)
SIM_KWARGS = {"n_genes": 2000, "n_cell_types": 10, "n_libraries": 4, "seed": 0}
MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")
#: Lightning precision setting and matmul precision of each run variant
VARIANTS = {
    "fp32": ("32-true", "fp32"),
    "tf32": ("32-true", "tf32"),
    "bf16": ("bf16-mixed", "bf16"),
}
XLA_KEYS = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_ALLOCATOR")
MIB = 2**20


#: dataset → (batch sizes of the fp32 grid over ARCHS with counts on the device, epochs per
#: batch size)
PLAN_BATCHES = {"kang": ((128, 1024), {128: 4, 1024: 4}), "sim": ((1024, 128), {128: 3, 1024: 4})}
#: dataset → (data path, variant) → the (batch, arch) runs that vary them beyond the grid
PLAN_EXTRAS = {
    "kang": {
        ("host", "fp32"): [(128, "128/10"), (1024, "512/128")],
        ("device", "bf16"): [(128, "128/10"), (1024, "512/128"), (128, "512/128")],
        ("device", "tf32"): [(1024, "512/128")],
    },
    "sim": {
        ("device", "bf16"): [(1024, "512/128"), (128, "512/128")],
        ("host", "fp32"): [(1024, "128/10"), (128, "128/10")],
        ("device", "tf32"): [(1024, "512/128")],
    },
}


def run_plan(dataset: str, smoke: bool) -> list[dict[str, Any]]:
    """The training runs of one dataset, most informative first.

    Each run: ``batch``, ``arch`` (key of :data:`ARCHS`), ``path`` (``"device"``: counts on
    the GPU, ``"host"``: pinned host batches), ``variant`` (key of :data:`VARIANTS`) and
    ``epochs``: the fp32 grid (:data:`PLAN_BATCHES` × arch, counts on the device), then the
    data path and precision varied at the sizes where they matter most (:data:`PLAN_EXTRAS`).
    Kang: the whole grid first. Simulated 100k: the batch-1024 runs first (a few seconds
    each), then the batch-128 ones (about 8× the steps).
    """
    kind = "kang" if dataset == "kang" else "sim"
    batches, epochs = PLAN_BATCHES[kind]
    runs = [(b, a, "device", "fp32") for b in batches for a in ARCHS]
    runs += [(b, a, p, v) for (p, v), at in PLAN_EXTRAS[kind].items() for b, a in at]
    if kind == "sim":
        runs.sort(key=lambda run: -run[0])  # the short batch-1024 runs first (stable)
    return [
        {
            "dataset": dataset,
            "batch": b,
            "arch": a,
            "path": p,
            "variant": v,
            "epochs": 2 if smoke else epochs[b],
        }
        for b, a, p, v in runs
    ]


# --------------------------------------------------------------------------- bookkeeping


class Context:
    """Budget, results and shared state of one benchmark invocation.

    Parameters
    ----------
    args
        Parsed command line.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        self.results: dict[str, Any] = {
            "benchmark": "regvi on one GPU (benchmarks/bench_gpu.py)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": vars(args),
            "parts": {},
            "flops": {},
            "peaks": {},
            "runs": [],
            "share": {},
            "jax": {},
        }
        self.cache: dict[str, Any] = {}

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        """Seconds left of the overall budget."""
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        """Progress line with the elapsed time, flushed."""
        print(f"[bench_gpu {self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        """Write the results so far (atomically: a kill never leaves half a file)."""
        self.results["elapsed_s"] = self.elapsed()
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=_json_default))
        os.replace(tmp, self.out)


def _json_default(obj: Any) -> Any:
    """numpy scalars and paths in JSON."""
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _error(err: BaseException) -> dict[str, str]:
    """An exception as JSON: type, message and the last lines of the traceback."""
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {err}", "traceback": "".join(tb)[-3000:]}


def _median_after_first(times: list[float]) -> float | None:
    """Median epoch time, leaving out the first epoch (CUDA / cuBLAS start-up) when possible."""
    if not times:
        return None
    return float(statistics.median(times[1:] if len(times) > 1 else times))


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Versions, the device and ``nvidia-smi``'s view of it."""
    import importlib.metadata as md

    import torch

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "xla_env_in_parent": {k: os.environ.get(k) for k in XLA_KEYS},
    }
    for pkg in ("lightning", "pytorch-lightning", "numpy", "scipy", "pandas", "anndata", "jax"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": p.name,
            "total_memory_mib": p.total_memory / MIB,
            "multi_processor_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    env["nvidia_smi"] = _nvidia_smi()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        )
        env["git_sha"] = sha.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_sha"] = None
    return env


def _nvidia_smi() -> str | None:
    """One CSV line per GPU: name, driver, memory, clocks (``None`` without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit"
    try:
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"failed: {err}"
    return (res.stdout or res.stderr).strip()


# --------------------------------------------------------------------------- matmul peaks


@contextlib.contextmanager
def matmul_precision(prec: str) -> Iterator[None]:
    """Set torch's float32 matmul precision for ``prec`` (``tf32``: ``"high"``), then restore."""
    import torch

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class MatmulPeaks:
    """Measured ``torch.mm`` GFLOP/s per (precision, shape), filled on demand.

    Parameters
    ----------
    device
        Device to time on.
    min_time_s
        Minimum duration of one timed batch of products.
    repeats
        Timed batches per shape (the best counts).
    """

    def __init__(self, device: Any, min_time_s: float, repeats: int):
        self.device = device
        self.min_time_s = min_time_s
        self.repeats = repeats
        self.rates: dict[str, dict[str, float]] = {p: {} for p in MATMUL_PRECISIONS}
        self.square: dict[str, dict[str, float]] = {p: {} for p in MATMUL_PRECISIONS}

    def _timer(self) -> Callable[[Callable[[], None]], float]:
        import torch

        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def timed(fn: Callable[[], None]) -> float:
                start.record()
                fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3

            return timed

        def timed_cpu(fn: Callable[[], None]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        return timed_cpu

    def time_mm(self, m: int, k: int, n: int, layout: str, prec: str) -> float:
        """GFLOP/s of ``torch.mm`` on ``(m, k) @ (k, n)`` in ``layout`` (as bench_roofline)."""
        import torch

        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        dev = self.device

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=dev, dtype=dtype)

        if layout == "nt":
            a, b = rnd(m, k), rnd(n, k).t()
        elif layout == "tn":
            a, b = rnd(k, m).t(), rnd(k, n)
        else:
            a, b = rnd(m, k), rnd(k, n)
        out = torch.empty(m, n, device=dev, dtype=dtype)
        timed = self._timer()
        with matmul_precision(prec):

            def run(iters: int) -> Callable[[], None]:
                def fn() -> None:
                    for _ in range(iters):
                        torch.mm(a, b, out=out)

                return fn

            timed(run(3))  # warm-up (kernel selection, clocks)
            one = max(timed(run(1)), 1e-7)
            iters = int(min(max(1, self.min_time_s / one), 20000))
            best = min(timed(run(iters)) / iters for _ in range(self.repeats))
        return 2.0 * m * k * n / max(best, 1e-12) / 1e9

    def ensure(self, shapes: list[dict[str, Any]], precisions: tuple[str, ...]) -> int:
        """Measure every shape not measured yet; returns how many were measured."""
        from bench_roofline import shape_key

        done = 0
        for prec in precisions:
            for s in shapes:
                key = shape_key(s)
                if key not in self.rates[prec]:
                    self.rates[prec][key] = self.time_mm(s["m"], s["k"], s["n"], s["layout"], prec)
                    done += 1
        return done

    def measure_square(self, sizes: tuple[int, ...], precisions: tuple[str, ...]) -> None:
        """Square products ``n × n × n``: the device's best case per precision."""
        for prec in precisions:
            for n in sizes:
                self.square[prec][str(n)] = self.time_mm(n, n, n, "nn", prec)

    def peak_square(self, prec: str) -> float | None:
        """Best square-matrix GFLOP/s of ``prec``."""
        return max(self.square[prec].values(), default=None)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: rates per precision and shape, square rates, settings."""
        return {
            "rates_gflops": self.rates,
            "square_gflops": self.square,
            "peak_square_gflops": {p: self.peak_square(p) for p in MATMUL_PRECISIONS},
            "peak_model_shapes_gflops": {
                p: max(self.rates[p].values(), default=None) for p in MATMUL_PRECISIONS
            },
            "min_time_s": self.min_time_s,
            "repeats": self.repeats,
            "device": str(self.device),
        }


def count_flops(model: Any, n_cells: int) -> dict[str, Any]:
    """Matmul FLOPs of one training forward pass of ``model`` (module on the host, 64 cells)."""
    import numpy as np
    from bench_roofline import count_linear_flops

    data = model._dataset()
    batch = data[np.arange(min(64, len(data)))]
    module = model.module
    module.train()
    flops = count_linear_flops(
        module, lambda: module.loss(batch, n_cells, kl_weight=1.0, skip_n_obs_check=True)
    )
    module.eval()
    return flops


def model_shapes(flops: dict[str, Any], batch_sizes: list[int], val_batch: int) -> list[dict]:
    """Every ``torch.mm`` problem of the training and validation loops at ``batch_sizes``."""
    from bench_roofline import run_shapes

    shapes: list[dict[str, Any]] = []
    for b in batch_sizes:
        shapes += run_shapes(flops, b, max(b, val_batch))
    return shapes


# --------------------------------------------------------------------------- training runs


def _deadline_callback(deadline: float, grace_s: float) -> Any:
    """A Lightning callback that ends training by ``deadline`` (``time.monotonic``).

    At an epoch's end it stops when another epoch of the same length would pass the deadline;
    within an epoch it stops ``grace_s`` after it (that epoch is then cut short and marked).
    """
    import lightning.pytorch as pl

    class Deadline(pl.Callback):
        def __init__(self) -> None:
            self.stopped_early = False
            self.cut_mid_epoch = False

        def on_train_epoch_end(self, trainer: Any, plan: Any) -> None:
            row = plan.finish_epoch()
            if time.monotonic() + float(row.get("epoch_time_s", 0.0)) > deadline:
                self.stopped_early = True
                trainer.should_stop = True

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if time.monotonic() > deadline + grace_s:
                self.stopped_early = self.cut_mid_epoch = True
                trainer.should_stop = True

    return Deadline()


class Prepared:
    """One dataset with a model per architecture, their initial weights and FLOP counts."""

    def __init__(self, name: str, adata: Any, library_key: str):
        self.name = name
        self.adata = adata
        self.library_key = library_key
        self.models: dict[str, Any] = {}
        self.init_states: dict[str, dict[str, Any]] = {}
        self.flops: dict[str, dict[str, Any]] = {}

    def model(self, arch: str) -> Any:
        """The model of ``arch`` (built, weights saved and FLOPs counted on first use)."""
        if arch not in self.models:
            import regvi

            h, latent = ARCHS[arch]
            model = regvi.RegVI(
                self.adata,
                library_key=self.library_key,
                labels_key="cell_type",
                n_hidden=h,
                n_latent=latent,
            )
            other = next(iter(self.models.values()), None)
            if other is not None:  # same counts: share the minibatch view (per-cell constants)
                model._cached_dataset = other._dataset()
            self.flops[arch] = count_flops(model, self.adata.n_obs)
            self.init_states[arch] = {
                k: v.detach().clone() for k, v in model.module.state_dict().items()
            }
            self.models[arch] = model
        return self.models[arch]


def train_run(
    ctx: Context, prep: Prepared, run: dict[str, Any], peaks: MatmulPeaks, deadline: float
) -> dict[str, Any]:
    """Train one configuration from the arch's initial weights and measure it.

    Returns
    -------
    dict
        The run spec plus: epochs run, epoch times, ``s_per_epoch`` (median after the first),
        ``cells_per_s``, wall and setup seconds, memory (peak allocated / reserved, counts on
        the device), final validation ELBO and the matmul accounting of
        ``bench_roofline.epoch_accounting`` against the peak of the run's own precision.
    """
    import pandas as pd
    import torch
    from bench_roofline import epoch_accounting

    from regvi.data.device import device_bytes_needed

    model = prep.model(run["arch"])
    model.module.load_state_dict(prep.init_states[run["arch"]])
    model.history = pd.DataFrame()
    cuda = ctx.cache["device"].type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    lightning_precision, mm = VARIANTS[run["variant"]]
    stop = _deadline_callback(deadline, grace_s=5.0)
    t0 = time.perf_counter()
    with matmul_precision(mm):
        hist = model.train(
            max_epochs=run["epochs"],
            batch_size=run["batch"],
            scale_lr_with_batch_size=True,
            early_stopping=False,
            accelerator=ctx.cache["accelerator"],
            devices=1,
            data_on_device=run["path"] == "device",
            precision=lightning_precision,
            progress_bar=False,
            callbacks=[stop],
            seed=0,
        )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    times = [float(t) for t in hist["epoch_time_s"]]
    timed = times[:-1] if stop.cut_mid_epoch else times
    s_epoch = _median_after_first(timed)
    n_train, n_val = len(model.train_indices), len(model.validation_indices)
    val_batch = model._validation_batch_size(run["batch"])
    rec: dict[str, Any] = {
        **run,
        "precision": lightning_precision,
        "matmul": mm,
        "data_on_device": bool(model.data_on_device),
        "epochs_run": len(times),
        "epoch_times_s": times,
        "stopped_by_deadline": stop.stopped_early,
        "cut_mid_epoch": stop.cut_mid_epoch,
        "s_per_epoch": s_epoch,
        "cells_per_s": (n_train + n_val) / s_epoch if s_epoch else None,
        "wall_s": wall,
        "setup_s": wall - sum(times),
        "n_train": n_train,
        "n_val": n_val,
        "val_batch": val_batch,
        "validation_elbo": float(hist["validation_elbo"].iloc[-1]) if len(hist) else None,
        "train_loss": float(hist["train_loss"].iloc[-1]) if len(hist) else None,
        "counts_on_device_mib": (
            device_bytes_needed(model._dataset()) / MIB if model.data_on_device else 0.0
        ),
    }
    if cuda:
        rec["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        rec["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        rec["memory_allocated_before_mib"] = base_alloc / MIB
    flops = prep.flops[run["arch"]]
    shapes = model_shapes(flops, [run["batch"]], val_batch)
    try:
        peaks.ensure(shapes, (mm,))
        rates, square = peaks.rates[mm], peaks.peak_square(mm)
    except Exception as err:  # accounting without a floor
        rec["peak_error"] = _error(err)["error"]
        rates, square = None, None
    rec["roofline"] = epoch_accounting(
        flops, n_train, n_val, run["batch"], val_batch, s_epoch, rates, square
    )
    model.module.cpu()
    return rec


def run_dataset(ctx: Context, prep: Prepared, deadline: float) -> None:
    """Every planned run of one dataset, until ``deadline``; each run saved as it ends."""
    import torch

    plan = run_plan(prep.name, ctx.args.smoke)
    run_cap = ctx.args.run_cap_s
    for i, run in enumerate(plan):
        left = deadline - time.monotonic()
        tag = f"{prep.name} b{run['batch']} {run['arch']} {run['path']} {run['variant']}"
        if left < 3.0:
            ctx.log(f"skip {tag}: part time used up")
            ctx.results["runs"].append({**run, "skipped": "part time used up"})
            continue
        ctx.log(f"run {i + 1}/{len(plan)}: {tag} ({left:.0f} s left in part)")
        try:
            rec = train_run(
                ctx, prep, run, ctx.cache["peaks"], min(deadline, time.monotonic() + run_cap)
            )
        except Exception as err:
            rec = {**run, **_error(err)}
            ctx.log(f"  FAILED: {rec['error']}")
            if "out of memory" in str(err).lower() and torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            roof = rec.get("roofline", {})
            ctx.log(
                f"  {_num(rec['s_per_epoch'], '.3f')} s/epoch ({rec['epochs_run']} epochs"
                f"{', cut by the deadline' if rec['stopped_by_deadline'] else ''}, "
                f"{_num(rec['cells_per_s'], '.0f')} cells/s), peak alloc "
                f"{_num(rec.get('max_memory_allocated_mib'), '.0f')} MiB, counts "
                f"{rec['counts_on_device_mib']:.0f} MiB, achieved/peak "
                f"{_num(roof.get('achieved_over_peak_model_shapes'), '.3f')}, "
                f"val ELBO {_num(rec['validation_elbo'], '.1f')}"
            )
        ctx.results["runs"].append(rec)
        ctx.save()


def _num(v: Any, spec: str) -> str:
    """A number formatted, or ``-`` when missing."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


# --------------------------------------------------------------------------- parts


def part_peaks(ctx: Context, deadline: float) -> dict[str, Any]:
    """Kang models (both archs): FLOP counts and device matmul peaks at their shapes."""
    prep = kang_prepared(ctx)
    peaks: MatmulPeaks = ctx.cache["peaks"]
    precs = ctx.cache["precisions"]
    n = 0
    for arch in ARCHS:
        prep.model(arch)
        flops = prep.flops[arch]
        ctx.results["flops"][f"kang {arch}"] = flops
        val_batch = prep.models[arch]._validation_batch_size(128)
        n += peaks.ensure(model_shapes(flops, [128, 1024], val_batch), precs)
        ctx.log(
            f"peaks: {arch}: {flops['fwd_flops_per_cell'] / 1e6:.2f} MFLOP/cell forward, "
            f"{n} shapes timed so far"
        )
        if time.monotonic() > deadline:
            break
    peaks.measure_square(ctx.cache["square_sizes"], precs)
    ctx.results["peaks"] = peaks.as_dict()
    best = ctx.results["peaks"]["peak_square_gflops"]
    ctx.log("peaks: square " + ", ".join(f"{p} {_num(best[p], '.0f')} GFLOP/s" for p in precs))
    return {"shapes_timed": n}


def kang_prepared(ctx: Context) -> Prepared:
    """The Kang subset (a random 1,200 cells with ``--smoke``), cached."""
    if "kang" not in ctx.cache:
        import numpy as np

        import regvi

        adata = regvi.datasets.kang_pbmc_small()
        if ctx.args.smoke:
            keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, 1200, replace=False))
            adata = adata[keep].copy()
        ctx.cache["kang"] = Prepared("kang", adata, "condition")
    return ctx.cache["kang"]


def part_kang(ctx: Context, deadline: float) -> dict[str, Any]:
    """Training runs on the bundled Kang subset."""
    prep = kang_prepared(ctx)
    run_dataset(ctx, prep, deadline)
    return {"n_cells": prep.adata.n_obs, "n_genes": prep.adata.n_vars}


def sim_data(ctx: Context) -> dict[str, Any]:
    """The simulated set: ``regvi.simulate`` of ``--sim-base`` cells tiled ``--sim-tiles``
    times, kept in memory and written as an uncompressed CSR ``.npz`` for the share children."""
    if "sim" in ctx.cache:
        return ctx.cache["sim"]
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import regvi

    a = ctx.args
    t = time.perf_counter()
    base = regvi.simulate(n_cells=a.sim_base, **SIM_KWARGS)
    t_sim = time.perf_counter() - t
    X = sp.vstack([base.X] * a.sim_tiles, format="csr")
    obs = pd.concat([base.obs] * a.sim_tiles, ignore_index=True)
    obs.index = [f"cell_{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=X, obs=obs, var=base.var.copy())
    path = ctx.tmp / "sim"
    path.mkdir(exist_ok=True)
    sp.save_npz(path / "X.npz", X, compressed=False)
    for key in ("library", "cell_type"):
        np.save(path / f"{key}.npy", obs[key].cat.codes.to_numpy())
    info = {
        "n_cells": X.shape[0],
        "n_genes": X.shape[1],
        "nnz": int(X.nnz),
        "density": X.nnz / (X.shape[0] * X.shape[1]),
        "base_cells": a.sim_base,
        "tiles": a.sim_tiles,
        "simulate_s": t_sim,
        "total_s": time.perf_counter() - t,
        "path": str(path),
    }
    ctx.cache["sim"] = {"adata": adata, "info": info, "path": path}
    ctx.log(
        f"sim data: {info['n_cells']} × {info['n_genes']}, {info['nnz'] / 1e6:.1f} M non-zeros "
        f"(simulate {t_sim:.1f} s, total {info['total_s']:.1f} s)"
    )
    return ctx.cache["sim"]


def part_sim(ctx: Context, deadline: float) -> dict[str, Any]:
    """Training runs on the simulated 100k set."""
    data = sim_data(ctx)
    prep = Prepared("sim", data["adata"], "library")
    ctx.cache["sim_prep"] = prep
    for arch in ARCHS:  # FLOPs (and any new matmul shapes) before the timed runs
        prep.model(arch)
        ctx.results["flops"][f"sim {arch}"] = prep.flops[arch]
    run_dataset(ctx, prep, deadline)
    prep.models.clear()
    ctx.cache.pop("sim_prep", None)
    return data["info"]


def part_jax(ctx: Context, deadline: float) -> dict[str, Any]:
    """JAX's GPU memory with and without regvi's Ray worker environment, in child processes."""
    from regvi.sweep.runner import WORKER_ENV

    worker_xla = {k: v for k, v in WORKER_ENV.items() if k.startswith("XLA_")}
    out: dict[str, Any] = {"worker_env_xla": worker_xla}
    _release_gpu_cache()
    for name, extra in (("worker_env", worker_xla), ("jax_default", {})):
        env = {k: v for k, v in os.environ.items() if k not in XLA_KEYS}
        env.update(extra)
        left = deadline - time.monotonic()
        if left < 5:
            out[name] = {"skipped": "part time used up"}
            continue
        rec = launch_child(
            ctx, ["--child", "jax"], env, timeout=min(60.0, left), name=f"jax_{name}"
        )
        out[name] = rec
        ctx.results["jax"] = out
        ctx.save()
        taken = rec.get("taken_mib")
        ctx.log(
            f"jax {name}: took {_num(taken, '.0f')} MiB "
            f"({_num(rec.get('taken_fraction'), '.3f')} of the device), "
            f"backend {rec.get('backend')}, ok={rec.get('ok')}"
        )
    return {}


def _release_gpu_cache() -> None:
    """Give this process's cached CUDA blocks back (before children use the device)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_share(ctx: Context, deadline: float) -> dict[str, Any]:
    """One child alone, then ``--share-procs`` children at once, each capped at its share."""
    data = sim_data(ctx)
    _release_gpu_cache()
    n = ctx.args.share_procs
    frac = 1.0 / n
    out: dict[str, Any] = {"fraction": frac, "procs": n}
    alone_left = deadline - time.monotonic()
    out["alone"] = run_share_group(ctx, data["path"], 1, frac, min(alone_left * 0.45, 45.0))
    ctx.results["share"] = out
    ctx.save()
    _log_share(ctx, "alone", out["alone"])
    left = deadline - time.monotonic()
    if left < 15:
        out["concurrent"] = {"skipped": "part time used up"}
        return {}
    out["concurrent"] = run_share_group(ctx, data["path"], n, frac, left - 2.0)
    _log_share(ctx, f"{n} at once", out["concurrent"])
    out["summary"] = share_summary(out["alone"], out["concurrent"])
    ctx.results["share"] = out
    ctx.log(
        f"share summary: total {_num(out['summary'].get('concurrent_cells_per_s'), '.0f')} "
        f"cells/s vs alone {_num(out['summary'].get('alone_cells_per_s'), '.0f')} "
        f"(× {_num(out['summary'].get('throughput_ratio'), '.2f')}), "
        f"all ok: {out['summary'].get('all_ok')}"
    )
    return {}


def run_share_group(
    ctx: Context, data_path: Path, n: int, fraction: float, timeout: float
) -> dict[str, Any]:
    """Start ``n`` share children with a common barrier; wait for all (killed at ``timeout``)."""
    group = ctx.tmp / f"share_{n}_{time.monotonic_ns()}"
    (group / "barrier").mkdir(parents=True)
    a = ctx.args
    # the same threads per trial alone and together (a sweep's cpus_per_worker)
    threads = max(1, (os.cpu_count() or 2) // max(a.share_procs, 1))
    procs = []
    for rank in range(n):
        args = [
            "--child",
            "share",
            "--data",
            str(data_path),
            "--rank",
            str(rank),
            "--n-procs",
            str(n),
            "--fraction",
            str(fraction),
            "--barrier",
            str(group / "barrier"),
            "--record",
            str(group / f"rank{rank}.json"),
            "--threads",
            str(threads),
            "--share-epochs",
            str(a.share_epochs),
            "--share-batch",
            str(a.share_batch),
            "--share-arch",
            a.share_arch,
        ]
        if n == 1:
            args.append("--probe-cap")
        log = open(group / f"rank{rank}.log", "w")
        cmd = [sys.executable, str(Path(__file__).resolve()), *args]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    t_end = time.monotonic() + timeout
    try:
        for proc, _ in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, t_end - time.monotonic()))
    finally:  # at the timeout, or when this process is stopped: end the children it started
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    children = []
    for rank, (proc, _) in enumerate(procs):
        rec_path = group / f"rank{rank}.json"
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"ok": False}
        rec["returncode"] = proc.returncode
        if proc.returncode == -9:
            rec["killed_at_timeout_s"] = timeout
        if not rec.get("ok"):
            rec["log_tail"] = (group / f"rank{rank}.log").read_text()[-2000:]
        children.append(rec)
    return {"children": children, "threads_per_child": threads}


def _log_share(ctx: Context, label: str, group: dict[str, Any]) -> None:
    for c in group.get("children", []):
        ctx.log(
            f"share {label}: rank {c.get('rank')} ok={c.get('ok')} "
            f"{_num(c.get('s_per_epoch'), '.3f')} s/epoch, peak alloc "
            f"{_num(c.get('max_memory_allocated_mib'), '.0f')} MiB, "
            f"cap probe: {c.get('cap_probe', '-')}"
            + (f", error: {c['error']}" if "error" in c else "")
        )


def share_summary(alone: dict[str, Any], conc: dict[str, Any]) -> dict[str, Any]:
    """Throughput of the concurrent group against the lone child, and how much they overlapped."""
    one = (alone.get("children") or [{}])[0]
    kids = conc.get("children") or []
    ok = [c for c in kids if c.get("ok")]
    total = sum(c["cells_per_s"] for c in ok if c.get("cells_per_s"))
    starts = [c["train_start"] for c in ok if "train_start" in c]
    ends = [c["train_end"] for c in ok if "train_end" in c]
    overlap = None
    if len(starts) == len(kids) and kids:
        span = max(ends) - min(starts)
        overlap = max(0.0, min(ends) - max(starts)) / span if span > 0 else None
    alone_cps = one.get("cells_per_s")
    conc_times = [c["s_per_epoch"] for c in ok if c.get("s_per_epoch")]
    return {
        "alone_cells_per_s": alone_cps,
        "alone_s_per_epoch": one.get("s_per_epoch"),
        "concurrent_cells_per_s": total or None,
        "concurrent_s_per_epoch": [c.get("s_per_epoch") for c in kids],
        "throughput_ratio": total / alone_cps if alone_cps and total else None,
        "per_trial_slowdown": (
            statistics.median(conc_times) / one["s_per_epoch"]
            if conc_times and one.get("s_per_epoch")
            else None
        ),
        "all_ok": len(ok) == len(kids) and bool(kids),
        "training_overlap": overlap,
        "max_memory_allocated_mib": [c.get("max_memory_allocated_mib") for c in kids],
        "cap_probe": one.get("cap_probe"),
        "auto_vs_cap": one.get("auto_vs_cap"),
    }


# --------------------------------------------------------------------------- children


def launch_child(
    ctx: Context, child_args: list[str], env: dict[str, str], timeout: float, name: str
) -> dict[str, Any]:
    """Run this script as a child with ``child_args``; its JSON record, or the failure."""
    record = ctx.tmp / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *child_args, "--record", str(record)]
    try:
        res = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"")[-2000:]
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "log_tail": str(out)}
    rec = json.loads(record.read_text()) if record.exists() else {"ok": False}
    rec["returncode"] = res.returncode
    if not rec.get("ok"):
        rec["log_tail"] = (res.stdout + res.stderr)[-2000:]
    return rec


def child_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Free device memory before and after JAX's first GPU computation (torch reads it)."""
    rec: dict[str, Any] = {"ok": False, "env": {k: os.environ.get(k) for k in XLA_KEYS}}
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.zeros(1, device="cuda")  # torch's own context first, so it is not counted
        free0, total = torch.cuda.mem_get_info()
        rec.update({"free_before_mib": free0 / MIB, "total_mib": total / MIB})
    smi0 = _smi_used_mib()
    t = time.perf_counter()
    import jax
    import jax.numpy as jnp

    rec["jax"] = jax.__version__
    rec["backend"] = jax.default_backend()
    rec["devices"] = [str(d) for d in jax.devices()]
    x = jnp.ones((4096, 4096), dtype=jnp.float32)
    y = (x @ x).block_until_ready()
    rec["result_ok"] = bool(float(y[0, 0]) == 4096.0)
    rec["jax_s"] = time.perf_counter() - t
    if cuda:
        free1, total = torch.cuda.mem_get_info()
        rec["free_after_mib"] = free1 / MIB
        rec["taken_mib"] = (free0 - free1) / MIB
        rec["taken_fraction"] = (free0 - free1) / total
    smi1 = _smi_used_mib()
    if smi0 is not None and smi1 is not None:  # nvidia-smi's view of the same difference
        rec["nvidia_smi_used_before_mib"], rec["nvidia_smi_used_after_mib"] = smi0, smi1
        rec["nvidia_smi_taken_mib"] = smi1 - smi0
    try:
        stats = jax.devices()[0].memory_stats() or {}
        rec["jax_memory_stats"] = {
            k: stats[k] for k in ("bytes_in_use", "bytes_limit", "bytes_reserved") if k in stats
        }
    except Exception as err:  # not every backend has memory_stats
        rec["jax_memory_stats"] = f"{type(err).__name__}: {err}"
    rec["ok"] = True
    return rec


def _smi_used_mib() -> float | None:
    """Device memory in use according to ``nvidia-smi`` (first GPU), or ``None``."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        res = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return float(res.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def child_share(args: argparse.Namespace) -> dict[str, Any]:
    """One trial of a shared GPU: cap, load the simulated set, wait at the barrier, train."""
    rec: dict[str, Any] = {"ok": False, "rank": args.rank, "pid": os.getpid()}
    t_start = time.monotonic()

    def stage(name: str) -> None:  # where a child killed at its timeout had got to
        rec.setdefault("stages_s", {})[name] = time.monotonic() - t_start
        Path(args.record).write_text(json.dumps(rec, default=_json_default))

    import torch

    import regvi
    from regvi.data.device import device_bytes_needed, limit_gpu_memory

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    rec["fraction_set"] = limit_gpu_memory(args.fraction) if cuda else None
    stage("imported")
    adata = _load_share_data(Path(args.data))
    h, latent = ARCHS[args.share_arch]
    model = regvi.RegVI(
        adata, library_key="library", labels_key="cell_type", n_hidden=h, n_latent=latent
    )
    model._dataset()  # per-cell constants before the barrier
    stage("model_built")
    _wait_at_barrier(Path(args.barrier), args.rank, args.n_procs, rec)
    stage("barrier_passed")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rec["train_start"] = time.time()
    hist = model.train(
        max_epochs=args.share_epochs,
        batch_size=args.share_batch,
        scale_lr_with_batch_size=True,
        early_stopping=False,
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        data_on_device="auto",
        progress_bar=False,
        seed=args.rank,
    )
    rec["train_end"] = time.time()
    stage("trained")
    times = [float(t) for t in hist["epoch_time_s"]]
    s_epoch = _median_after_first(times)
    n_cells = len(model.train_indices) + len(model.validation_indices)
    rec.update(
        {
            "epoch_times_s": times,
            "s_per_epoch": s_epoch,
            "cells_per_s": n_cells / s_epoch if s_epoch else None,
            "data_on_device": bool(model.data_on_device),
            "counts_mib": device_bytes_needed(model._dataset()) / MIB,
            "validation_elbo": float(hist["validation_elbo"].iloc[-1]),
        }
    )
    if cuda:
        rec["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        rec["max_memory_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
        if args.probe_cap:
            rec["cap_probe"] = _probe_cap(args.fraction)
            rec["auto_vs_cap"] = _auto_vs_cap(model, args.fraction)
    rec["ok"] = True
    return rec


def _load_share_data(data: Path) -> Any:
    """The simulated set written for the sharing trials (``X.npz``, ``library.npy``,
    ``cell_type.npy``) as an AnnData."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    X = sp.load_npz(data / "X.npz").tocsr()
    obs = pd.DataFrame(
        {
            "library": pd.Categorical([f"lib_{c}" for c in np.load(data / "library.npy")]),
            "cell_type": pd.Categorical([f"type_{c}" for c in np.load(data / "cell_type.npy")]),
        },
        index=[f"cell_{i}" for i in range(X.shape[0])],
    )
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))


def _wait_at_barrier(barrier: Path, rank: int, n_procs: int, rec: dict[str, Any]) -> None:
    """Mark this trial ready and wait (at most 90 s) until all ``n_procs`` are, so that every
    trial starts training together; the wait goes to ``rec``."""
    (barrier / f"ready{rank}").touch()
    t_wait = time.monotonic()
    while len(list(barrier.glob("ready*"))) < n_procs:
        if time.monotonic() - t_wait > 90:
            rec["barrier_timeout"] = True
            break
        time.sleep(0.05)
    rec["barrier_wait_s"] = time.monotonic() - t_wait


def _probe_cap(fraction: float) -> str:
    """Try to allocate more than this process's share: refused means the cap holds."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    try:
        block = torch.empty(
            int(total * min(1.0, fraction + 0.05)), dtype=torch.uint8, device="cuda"
        )
    except torch.OutOfMemoryError:
        return "refused (cap enforced)"
    del block
    torch.cuda.empty_cache()
    return "allocated (cap NOT enforced)"


def _auto_vs_cap(model: Any, fraction: float) -> dict[str, Any]:
    """What ``data_on_device="auto"`` decides for counts larger than this trial's cap.

    ``resolve_data_on_device`` compares the counts with half the device's free memory; this
    asks it about counts of 0.4 × the device (above a 0.25 cap, below half the free memory of
    an idle device) by standing in for ``device_bytes_needed``. ``True`` means ``auto`` would
    upload counts that the trial's own allocator cap cannot hold.
    """
    import torch

    import regvi.data.device as dev

    total = torch.cuda.get_device_properties(0).total_memory
    pretend = int(0.4 * total)
    real = dev.device_bytes_needed
    dev.device_bytes_needed = lambda data: pretend
    try:
        decision = dev.resolve_data_on_device(
            "auto", model._dataset(), torch.device("cuda", torch.cuda.current_device())
        )
    finally:
        dev.device_bytes_needed = real
    free, _ = torch.cuda.mem_get_info()
    return {
        "counts_mib": pretend / MIB,
        "cap_mib": fraction * total / MIB,
        "free_mib": free / MIB,
        "auto_puts_on_device": bool(decision),
    }


def run_child(args: argparse.Namespace) -> int:
    """Child entry: run the part, write its record (also on failure)."""
    fn = {"jax": child_jax, "share": child_share}[args.child]
    try:
        rec = fn(args)
    except Exception as err:
        staged = Path(args.record)
        rec = json.loads(staged.read_text()) if staged.exists() else {"rank": args.rank}
        rec.update({"ok": False, **_error(err)})
    Path(args.record).write_text(json.dumps(rec, indent=1, default=_json_default))
    print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}, default=_json_default))
    return 0 if rec.get("ok") else 1


# --------------------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown tables (runs, peaks, sharing, JAX)."""
    env = results.get("environment", {})
    gpu = env.get("gpu", {})
    lines = [
        f"Device: {gpu.get('name', 'cpu')}; torch {env.get('torch')} (CUDA "
        f"{env.get('torch_cuda')}), lightning {env.get('lightning')}, budget "
        f"{results['args']['budget_s']:.0f} s, elapsed {results.get('elapsed_s', 0):.0f} s."
    ]
    lines += _table(
        "| data | batch | n_hidden / n_latent | counts | precision | s/epoch | cells/s "
        "| peak alloc MiB | counts MiB | achieved TFLOP/s | peak TFLOP/s (shapes) "
        "| achieved / peak | val ELBO |",
        [_run_row(r) for r in results.get("runs", [])],
    )
    peaks = results.get("peaks", {})
    if peaks:
        lines += _table(
            "| matmul precision | best at model shapes TFLOP/s | best square TFLOP/s |",
            [_peak_row(p, peaks) for p in MATMUL_PRECISIONS],
        )
    share = results.get("share", {})
    if share.get("alone"):
        lines += _table(
            "| sharing | trial | ok | s/epoch | cells/s | peak alloc MiB | cap probe |",
            [
                _share_row(label, c)
                for label in ("alone", "concurrent")
                for c in (share.get(label) or {}).get("children", [])
            ],
        )
        lines += _share_notes(share)
    jx = results.get("jax", {})
    if any(k in jx for k in ("worker_env", "jax_default")):
        lines += _table(
            "| JAX env | XLA_PYTHON_CLIENT_PREALLOCATE / ALLOCATOR | GPU MiB taken "
            "| share of device | ok |",
            [_jax_row(name, jx.get(name, {})) for name in ("worker_env", "jax_default")],
        )
    parts = results.get("parts", {}).items()
    lines += _table(
        "| part | status | seconds |",
        [f"| {n} | {p.get('status')} | {_num(p.get('elapsed_s'), '.1f')} |" for n, p in parts],
    )
    return "\n".join(lines)


def _table(header: str, rows: list[str]) -> list[str]:
    """A markdown table after a blank line: ``header`` (``| a | b |``), its rule and ``rows``."""
    return ["", header, "|" + "---|" * (header.count("|") - 1), *rows]


def _run_row(r: dict[str, Any]) -> str:
    """One training run: speed, memory, achieved and peak TFLOP/s, validation ELBO."""
    head = f"| {r['dataset']} | {r['batch']} | {r['arch']} | {r['path']} | {r['variant']} "
    if "s_per_epoch" not in r:
        why = r.get("skipped") or r.get("error", "?")
        return head + f"| {why[:60]} | | | | | | | |"
    roof = r.get("roofline", {})
    ach = roof.get("achieved_gflops_nominal")
    peak = roof.get("peak_gflops_model_shapes")
    return (
        head + f"| {_num(r['s_per_epoch'], '.3f')} | {_num(r['cells_per_s'], ',.0f')} "
        f"| {_num(r.get('max_memory_allocated_mib'), '.0f')} "
        f"| {_num(r['counts_on_device_mib'], '.0f')} "
        f"| {_num(ach / 1e3 if ach else None, '.2f')} "
        f"| {_num(peak / 1e3 if peak else None, '.1f')} "
        f"| {_num(roof.get('achieved_over_peak_model_shapes'), '.3f')} "
        f"| {_num(r['validation_elbo'], '.1f')} |"
    )


def _peak_row(precision: str, peaks: dict[str, Any]) -> str:
    """The best matmul TFLOP/s of one precision, at the model's shapes and square."""
    ms = peaks.get("peak_model_shapes_gflops", {}).get(precision)
    sq = peaks.get("peak_square_gflops", {}).get(precision)
    return (
        f"| {precision} | {_num(ms / 1e3 if ms else None, '.1f')} "
        f"| {_num(sq / 1e3 if sq else None, '.1f')} |"
    )


def _share_row(label: str, c: dict[str, Any]) -> str:
    """One GPU-sharing trial (``label``: alone or concurrent)."""
    return (
        f"| {label} | {c.get('rank')} | {c.get('ok')} "
        f"| {_num(c.get('s_per_epoch'), '.3f')} "
        f"| {_num(c.get('cells_per_s'), ',.0f')} "
        f"| {_num(c.get('max_memory_allocated_mib'), '.0f')} "
        f"| {c.get('cap_probe', '-')} |"
    )


def _share_notes(share: dict[str, Any]) -> list[str]:
    """The sharing summary and what ``data_on_device="auto"`` did under the memory cap."""
    notes = []
    s = share.get("summary", {})
    if s:
        notes.append(
            f"\nTotal {_num(s.get('concurrent_cells_per_s'), ',.0f')} cells/s with "
            f"{share.get('procs')} trials vs {_num(s.get('alone_cells_per_s'), ',.0f')} "
            f"alone (× {_num(s.get('throughput_ratio'), '.2f')}); per-trial slowdown × "
            f"{_num(s.get('per_trial_slowdown'), '.2f')}; training overlap "
            f"{_num(s.get('training_overlap'), '.2f')}; all ok: {s.get('all_ok')}."
        )
    avc = s.get("auto_vs_cap") or {}
    if avc:
        notes.append(
            f'\n`data_on_device="auto"` under a {share.get("fraction")} cap '
            f"({_num(avc.get('cap_mib'), ',.0f')} MiB), counts of "
            f"{_num(avc.get('counts_mib'), ',.0f')} MiB, "
            f"{_num(avc.get('free_mib'), ',.0f')} MiB free: on the device = "
            f"{avc.get('auto_puts_on_device')}; allocation above the cap: "
            f"{s.get('cap_probe')}."
        )
    return notes


def _jax_row(name: str, r: dict[str, Any]) -> str:
    """The GPU memory JAX took under one environment (``worker_env`` or ``jax_default``)."""
    e = r.get("env", {})
    return (
        f"| {name} | {e.get(XLA_KEYS[0])} / {e.get(XLA_KEYS[1])} "
        f"| {_num(r.get('taken_mib'), '.0f')} | {_num(r.get('taken_fraction'), '.3f')} "
        f"| {r.get('ok')} {r.get('error', r.get('skipped', ''))} |"
    )


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Command line (the ``--child`` options are internal)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    out = Path(os.environ["OUT"]) / "bench_gpu.json" if os.environ.get("OUT") else DEFAULT_OUT
    p.add_argument("--out", default=str(out), help="JSON results (default $OUT/bench_gpu.json)")
    p.add_argument("--budget-s", type=float, default=285.0, help="overall time budget")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--smoke", action="store_true", help="toy sizes, CPU if no GPU (< 2 min)")
    p.add_argument("--run-cap-s", type=float, default=40.0, help="time cap of one training run")
    p.add_argument("--sim-base", type=int, default=20000, help="cells per simulate() call")
    p.add_argument("--sim-tiles", type=int, default=5, help="copies of the simulated cells")
    p.add_argument("--share-procs", type=int, default=4)
    p.add_argument("--share-epochs", type=int, default=3)
    p.add_argument("--share-batch", type=int, default=1024)
    p.add_argument("--share-arch", default="512/128", choices=sorted(ARCHS))
    # child-only
    p.add_argument("--child", choices=("jax", "share"), help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n-procs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--probe-cap", action="store_true", help=argparse.SUPPRESS)
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    """Toy sizes for ``--smoke`` (explicit options beyond these are kept)."""
    args.sim_base, args.sim_tiles = 1000, 2
    args.share_procs, args.share_epochs = 2, 2
    args.budget_s = min(args.budget_s, 150.0)
    args.run_cap_s = min(args.run_cap_s, 15.0)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts within the budget; print the tables."""
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR))  # bench_roofline (stdlib-only at module level)
    if str(ROOT) not in sys.path:  # regvi from this checkout (not installed on the GPU machine)
        sys.path.insert(1, str(ROOT))
    if args.child:
        return run_child(args)
    if args.smoke:
        apply_smoke(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        sys.exit(f"--parts: unknown {unknown}; expected some of {list(PARTS)}")
    ctx = Context(args)
    ctx.log(f"start: parts {parts}, budget {args.budget_s:.0f} s, out {ctx.out}")
    # a kill from outside (timeout) still runs the finally below: results saved, table printed
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.filterwarnings("ignore", message=".*features have zero counts.*")
    warnings.filterwarnings("ignore", message=".*future.infer_string.*")
    try:
        import torch

        if args.smoke and not torch.cuda.is_available():
            torch.set_num_threads(1)
        ctx.results["environment"] = environment()
        env = ctx.results["environment"]
        ctx.log(f"device: {env.get('gpu', {}).get('name', 'cpu (no CUDA)')}; torch {env['torch']}")
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        ctx.cache.update(
            {
                "device": device,
                "accelerator": "gpu" if cuda else "cpu",
                "precisions": MATMUL_PRECISIONS if cuda else ("fp32", "bf16"),
                "square_sizes": (1024, 4096, 8192) if cuda and not args.smoke else (256, 512),
                "peaks": MatmulPeaks(
                    device,
                    min_time_s=0.005 if cuda else 0.002,
                    repeats=3 if cuda else 1,
                ),
            }
        )
        if not cuda:  # on CPU tf32 is fp32: share the measurements
            peaks = ctx.cache["peaks"]
            peaks.rates["tf32"], peaks.square["tf32"] = peaks.rates["fp32"], peaks.square["fp32"]
        ctx.save()
        fns = {
            "peaks": part_peaks,
            "kang": part_kang,
            "jax": part_jax,
            "sim": part_sim,
            "share": part_share,
        }
        for name in PARTS:
            if name in parts:
                run_part(ctx, name, fns[name])
    finally:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        table = markdown(ctx.results)
        ctx.results["markdown"] = table
        ctx.save()
        print("\n" + table, flush=True)
        ctx.log(f"wrote {ctx.out}")
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (an outer ``timeout``): leave through ``main``'s ``finally`` (saves, prints)."""
    print(f"[bench_gpu] signal {signum}: stopping", flush=True)
    sys.exit(128 + signum)


def run_part(ctx: Context, name: str, fn: Callable[[Context, float], dict[str, Any]]) -> None:
    """Run one part under its cap and the overall budget; record status, time and errors."""
    left = ctx.remaining()
    rec: dict[str, Any] = {"cap_s": PART_CAPS[name]}
    ctx.results["parts"][name] = rec
    if left < PART_MIN_S[name]:
        rec["status"] = f"skipped ({left:.0f} s left of the budget)"
        ctx.log(f"part {name}: {rec['status']}")
        ctx.save()
        return
    deadline = time.monotonic() + min(PART_CAPS[name], left)
    ctx.log(f"part {name}: start ({min(PART_CAPS[name], left):.0f} s)")
    t = time.monotonic()
    try:
        rec.update(fn(ctx, deadline) or {})
        rec["status"] = "done"
    except Exception as err:
        rec.update(_error(err))
        rec["status"] = "failed"
        ctx.log(f"part {name}: FAILED {rec['error']}")
    except BaseException:
        rec["status"] = "interrupted"
        rec["elapsed_s"] = time.monotonic() - t
        raise
    rec["elapsed_s"] = time.monotonic() - t
    ctx.log(f"part {name}: {rec['status']} in {rec['elapsed_s']:.1f} s")
    ctx.save()


if __name__ == "__main__":
    raise SystemExit(main())
