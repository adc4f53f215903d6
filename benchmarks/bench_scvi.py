"""Benchmark regvi against scvi-tools ``SCVI``: Kang 2018 PBMC and a simulated 100k-cell set.

The benchmark compares speed (seconds per epoch), peak memory (peak RSS of the
training process) and integration quality (scib-metrics) at equal architecture, for every
(dataset, batch size, architecture), and measures how close regvi's training gets to this
machine's matmul roofline (``benchmarks/bench_roofline.py``).

Pipeline
--------
1. **Data** (once per dataset, in a child):

   * ``kang`` — Kang et al. 2018 IFN-β PBMC, 4,000 HVGs with
     ``sc.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=4000, batch_key="condition")``
     on the raw counts; batch ``condition``, labels ``cell_type``.
   * ``sim100k`` (generally ``simNk``) — ``regvi.simulate(n_cells=N·1000, n_genes=2000,
     n_cell_types=10, n_libraries=4, seed=0)``; batch ``library``, labels ``cell_type``. The
     generation's peak RSS is recorded (5.0 GiB for 100k × 2000: the simulator works on dense
     float64 cells × genes arrays).

   ``X`` stays raw counts; the result is written to a temporary ``.h5ad`` that every run reads.
2. **Training**: every (dataset, batch size, tool, architecture) runs in its own subprocess so
   the peak RSS is per run. regvi runs with the current interpreter, scvi-tools with
   ``--scvi-python`` (a separate virtualenv, see ``benchmarks/setup_scvi_env.sh``). Both use
   ``torch.set_num_threads(2)``, a fixed number of epochs (``--epochs`` for Kang,
   ``--epochs-sim`` for simulated data), no early stopping and validation on 10 % of the
   cells after every epoch. Seconds per epoch = wall time of the ``train`` call / epochs run.
   **Learning rate**: both tools get the same explicit lr at every batch size; with the default
   ``--lr-scaling linear`` it is ``--lr · B / 128`` (1e-3 at 128, 8e-3 at 1024 — the linear
   scaling regvi recommends for large batches; ``none`` keeps ``--lr``). Timing does not
   depend on the lr, quality at a fixed epoch budget does. Tool ``scvi`` is scvi-tools with
   its defaults (ZINB likelihood: one more hidden → genes head than regvi's NB), ``scvi_nb``
   the same with ``gene_likelihood="nb"``. The child writes the latent posterior mean to
   ``.npy`` and counts the matmul FLOPs of one training forward pass (hooks on every
   ``nn.Linear``).
3. **scib-metrics** (``--scib-datasets``, default Kang only; ``--skip-scib``): one
   ``Benchmarker`` per dataset over all its latents (at ``--scib-batch-sizes``) plus an
   "Unintegrated" PCA reference (scanpy PCA of the log-normalised HVG matrix, computed exactly
   the way ``Benchmarker.prepare`` computes its pre-integration embedding).
4. **Roofline and profile** (``--skip-roofline`` / ``--skip-profile``, see
   ``benchmarks/bench_roofline.py``): ``torch.mm`` GFLOP/s at every matmul shape the runs use,
   achieved FLOP/s of every run, and a ``torch.profiler`` breakdown of regvi training on
   ``--profile-dataset`` (Kang) at ``--profile-batch-sizes`` × ``--profile-archs``.

Results go to ``benchmarks/results/bench_scvi.json`` (and the full roofline / profile detail to
``benchmarks/results/bench_roofline.json``).

Usage
-----
::

    benchmarks/setup_scvi_env.sh                      # once: scvi-tools venv
    .venv/bin/python benchmarks/bench_scvi.py --epochs 10 --epochs-sim 3 \
        --scvi-python /work/venv-scvi/bin/python

To redo only the roofline and profile (e.g. after CPU contention) for the runs of an earlier
result, keep its workdir and pass ``--roofline-from benchmarks/results/bench_scvi.json
--workdir DIR``.

The script file is also the child entry point (``--child {regvi,scvi,scvi_nb,prep}``);
at module level it imports only the standard library, so it runs under either
interpreter.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
from _common import (  # stdlib-only at module level, next to this file
    LATENT_BATCH_SIZE,
    N_THREADS,
    REPO_ROOT,
    SEED,
    TRAIN_SIZE,
    Arch,
    parse_archs,
    parse_columns,
    parse_ints,
    peak_rss_mib,
    render_table,
    save_latent,
    set_threads,
)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_scvi.json"
DEFAULT_ROOFLINE_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_roofline.json"

BATCH_KEY = "condition"  # Kang
LABEL_KEY = "cell_type"
N_TOP_GENES = 4000
BATCH_SIZE = 128  # reference batch size of the lr scaling
TOOLS = ("regvi", "regvi_compile", "scvi", "scvi_nb")
SCVI_TOOLS = ("scvi", "scvi_nb")
#: regvi eager, and regvi with ``train(compile=True)`` (its first epoch holds the compilation:
#: compare medians per epoch)
REGVI_TOOLS = ("regvi", "regvi_compile")
#: regvi.simulate arguments of the ``simNk`` datasets (n_cells from the name)
SIM_KWARGS = {"n_genes": 2000, "n_cell_types": 10, "n_libraries": 4, "seed": 0}
SIM_BATCH_KEY = "library"


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset: how to prepare it and its obs keys."""

    name: str
    kind: str  # "kang" or "sim"
    batch_key: str
    label_key: str = LABEL_KEY
    n_cells: int | None = None  # simulated only

    @property
    def sim_kwargs(self) -> dict[str, Any]:
        """Arguments of ``regvi.simulate`` (simulated datasets)."""
        return {"n_cells": self.n_cells, **SIM_KWARGS}


def dataset_spec(name: str) -> DatasetSpec:
    """``kang`` or ``simNk`` (``regvi.simulate`` with N·1000 cells)."""
    if name == "kang":
        return DatasetSpec("kang", "kang", BATCH_KEY)
    m = re.fullmatch(r"sim(\d+)k", name)
    if m:
        return DatasetSpec(name, "sim", SIM_BATCH_KEY, n_cells=int(m.group(1)) * 1000)
    raise argparse.ArgumentTypeError(f"unknown dataset {name!r}; expected kang or simNk")


def parse_datasets(spec: str) -> list[str]:
    """Parse ``"kang,sim100k"``."""
    names = [v.strip() for v in spec.split(",") if v.strip()]
    for n in names:
        dataset_spec(n)
    if not names:
        raise argparse.ArgumentTypeError("no dataset given")
    return names


def lr_for(batch_size: int, base_lr: float, scaling: str) -> float:
    """The lr both tools get at ``batch_size``: linear scaling from batch 128, or constant."""
    return _common.lr_for(batch_size, base_lr, scaling, BATCH_SIZE)


# --------------------------------------------------------------------------- children


def child_prep(dataset: str, data: Path, out: Path) -> dict[str, Any]:
    """Write the shared input ``.h5ad`` of one dataset (``X`` stays raw counts).

    Parameters
    ----------
    dataset
        ``kang`` (HVG selection on the raw-count ``data``) or ``simNk`` (``regvi.simulate``).
    data
        Raw-count input ``.h5ad`` of Kang (``X`` is int CSR counts); unused for simulations.
    out
        Where to write the ``.h5ad``.

    Returns
    -------
    dict
        Shape of the input and of the output (plus generation time / peak RSS for
        simulations).
    """
    import anndata as ad
    import numpy as np

    spec = dataset_spec(dataset)
    if spec.kind == "sim":
        import regvi

        t0 = time.perf_counter()
        adata = regvi.simulate(**spec.sim_kwargs)
        gen_s = time.perf_counter() - t0
        gen_peak = peak_rss_mib()
        adata.uns.clear()  # ground-truth arrays are not needed by the benchmark
        adata.write_h5ad(out)
        nnz = int(adata.X.nnz)
        return {
            "dataset": dataset,
            "simulate": spec.sim_kwargs,
            "n_cells": int(adata.n_obs),
            "n_genes_input": int(adata.n_vars),
            "n_genes_hvg": int(adata.n_vars),
            "nnz": nnz,
            "density": nnz / (adata.n_obs * adata.n_vars),
            "generation_s": gen_s,
            "generation_peak_rss_mib": gen_peak,
            "peak_rss_mib": peak_rss_mib(),
            "regvi": getattr(regvi, "__version__", "unknown"),
            "anndata": ad.__version__,
        }

    import scanpy as sc

    adata = ad.read_h5ad(data)
    n_obs, n_vars = adata.shape
    sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=N_TOP_GENES, batch_key=spec.batch_key
    )
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    x = adata.X
    values = x.data if hasattr(x, "data") else np.asarray(x)
    if not np.all(values == np.round(values)):
        raise ValueError("X is expected to hold raw integer counts")
    adata.write_h5ad(out)
    return {
        "dataset": dataset,
        "n_cells": int(n_obs),
        "n_genes_input": int(n_vars),
        "n_genes_hvg": int(adata.n_vars),
        "scanpy": sc.__version__,
        "anndata": ad.__version__,
    }


@dataclass(frozen=True)
class TrainSettings:
    """What one training child trains: the tool, architecture, epochs, batch, lr, batch key."""

    tool: str
    arch: Arch
    epochs: int
    batch_size: int
    lr: float
    batch_key: str


@dataclass
class Trained(_common.TrainedRun):
    """The measurements of one training run (the tool's own fields go to the record)."""

    n_train: int
    n_val: int
    val_batch_size: int


def child_train(
    tool: str,
    prep: Path,
    arch: Arch,
    epochs: int,
    latent_out: Path,
    batch_size: int = BATCH_SIZE,
    lr: float = 1e-3,
    batch_key: str = BATCH_KEY,
) -> dict[str, Any]:
    """Train one model in this process and save its latent posterior mean.

    Parameters
    ----------
    tool
        ``"regvi"``, ``"scvi"`` (scvi-tools defaults, ZINB) or ``"scvi_nb"`` (NB likelihood).
    prep
        Shared preprocessed ``.h5ad``.
    arch
        Architecture to train.
    epochs
        Number of epochs (fixed, no early stopping).
    latent_out
        ``.npy`` path for the ``(n_cells, n_latent)`` latent mean.
    batch_size, lr
        Minibatch size and (explicit) learning rate, the same for every tool.
    batch_key
        obs column of the batch (regvi ``library_key``, scvi ``batch_key``).

    Returns
    -------
    dict
        Timing, memory, epochs run, matmul FLOPs of one training forward pass and library
        versions.
    """
    import anndata as ad
    import numpy as np
    import torch

    set_threads(N_THREADS)
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - seed the legacy global RNG the libraries may use
    adata = ad.read_h5ad(prep)
    rec: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    settings = TrainSettings(tool, arch, epochs, batch_size, lr, batch_key)
    if tool in SCVI_TOOLS:
        run = _train_scvi(settings, adata, rec)
    elif tool in REGVI_TOOLS:
        run = _train_regvi(settings, adata, rec)
    else:
        raise ValueError(f"unknown tool {tool!r}")

    save_latent(run.z, (adata.n_obs, arch.n_latent), latent_out)
    rec.update(
        {
            "batch_size": batch_size,
            "val_batch_size": run.val_batch_size,
            "lr": lr,
            "n_train": int(run.n_train),
            "n_val": int(run.n_val),
            **run.timing(epochs),
        }
    )
    return rec


def _train_scvi(s: TrainSettings, adata: Any, rec: dict[str, Any]) -> Trained:
    """scvi-tools SCVI (ZINB, or NB for ``scvi_nb``); adds its versions, likelihood, final
    losses and FLOPs to ``rec``."""
    import lightning
    import numpy as np
    import scvi

    scvi.settings.seed = SEED
    set_threads(N_THREADS)  # scvi's seed setter may touch torch settings; re-pin
    timer = _common.epoch_timer()
    scvi.model.SCVI.setup_anndata(adata, batch_key=s.batch_key)
    extra = {"gene_likelihood": "nb"} if s.tool == "scvi_nb" else {}
    model = scvi.model.SCVI(adata, **s.arch.sizes(), **extra)
    _, train_s, rss_before = _common.timed(
        lambda: model.train(
            **_common.scvi_train_kwargs(s.epochs, s.batch_size, timer), plan_kwargs={"lr": s.lr}
        )
    )
    final = {
        k: float(model.history[k].iloc[-1, 0])
        for k in ("elbo_train", "elbo_validation", "reconstruction_loss_validation")
        if k in model.history
    }
    n_rows = min(s.batch_size, adata.n_obs)

    def forward() -> Any:
        loader = model._make_data_loader(adata=adata, indices=np.arange(n_rows), batch_size=n_rows)
        tensors = next(iter(loader))
        return lambda: model.module(tensors)

    _record_flops(rec, model.module, forward)
    z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
    rec.update(
        {
            "scvi-tools": scvi.__version__,
            "lightning": lightning.__version__,
            "gene_likelihood": model.module.gene_likelihood,
            "n_validation_epochs": len(model.history.get("elbo_validation", [])),
            "final": final,
        }
    )
    return Trained(
        z=z,
        train_s=train_s,
        epochs_run=len(model.history["elbo_train"]),
        epoch_times=timer.times,
        rss_before=rss_before,
        n_train=len(np.asarray(getattr(model, "train_indices", []))),
        n_val=len(np.asarray(getattr(model, "validation_indices", []))),
        val_batch_size=s.batch_size,
    )


def _train_regvi(s: TrainSettings, adata: Any, rec: dict[str, Any]) -> Trained:
    """regvi ``RegVI`` (``regvi_compile``: ``train(compile=True)``); adds its version, history
    columns, final values and FLOPs to ``rec``."""
    import numpy as np

    import regvi

    model = regvi.RegVI(adata, library_key=s.batch_key, **s.arch.sizes())
    hist, train_s, rss_before = _common.timed(
        lambda: model.train(
            max_epochs=s.epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            early_stopping=False,
            compile=s.tool == "regvi_compile",
        )
    )
    n_train = len(model.train_indices)
    n_rows = min(s.batch_size, adata.n_obs)

    def forward() -> Any:
        batch = model._dataset()[np.arange(n_rows)]
        return lambda: model.module.loss(batch, n_obs=n_train)

    _record_flops(rec, model.module, forward)
    z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
    rec.update(_common.regvi_history_record(hist))
    return Trained(
        z=z,
        train_s=train_s,
        epochs_run=len(hist),
        epoch_times=_common.history_epoch_times(hist),
        rss_before=rss_before,
        n_train=n_train,
        n_val=len(model.validation_indices),
        val_batch_size=model._validation_batch_size(s.batch_size),
    )


def _record_flops(rec: dict[str, Any], module: Any, forward: Callable[[], Any]) -> None:
    """``rec["flops"]``: matmul FLOPs of the training forward pass ``forward()`` returns (on
    the first rows), counted in train mode; ``rec["flops_error"]`` if that fails."""
    import bench_roofline  # stdlib-only at module level; next to this file

    try:
        step = forward()
        module.train()
        rec["flops"] = bench_roofline.count_linear_flops(module, step)
    except Exception as err:  # FLOP counting is a side measurement
        rec["flops_error"] = f"{type(err).__name__}: {err}"


def run_child_main(args: argparse.Namespace) -> int:
    """Entry point of a child process; writes its record as JSON to ``--record``."""
    if args.child == "prep":
        rec = child_prep(args.dataset, Path(args.data), Path(args.prep))
    else:
        arch = Arch(args.n_hidden, args.n_latent, args.n_layers)
        rec = child_train(
            args.child,
            Path(args.prep),
            arch,
            args.epochs,
            Path(args.latent_out),
            batch_size=args.batch_size,
            lr=args.lr,
            batch_key=args.batch_key,
        )
    return _common.write_record(args, rec)


# --------------------------------------------------------------------------- parent


def _has_module(python: str, module: str) -> bool:
    """Whether ``module`` is importable by interpreter ``python``."""
    res = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    return res.returncode == 0


def launch(python: str, child_args: list[str], log: Path, record: Path) -> dict[str, Any]:
    """Run this script as a child under ``python`` (see :func:`_common.launch`); the record
    has ``contention`` (competing processes and the load average before and after)."""
    return _common.launch_cpu_timed(__file__, python, child_args, log, record)


def run_scib(
    prep: Path,
    latents: dict[str, Path],
    n_jobs: int,
    batch_key: str = BATCH_KEY,
    label_key: str = LABEL_KEY,
) -> dict[str, dict[str, float]]:
    """Score all latents of ``prep`` (raw counts) plus the "Unintegrated" PCA with one
    scib-metrics ``Benchmarker`` (:func:`_common.score_latents`): embedding → {metric: value}."""
    return _common.score_latents(prep, latents, batch_key, label_key, n_jobs)


def print_table(rows: list[dict[str, Any]]) -> str:
    """Render the result rows as a fixed-width table (also returned as text).

    s/epoch = wall time of train() / epochs; median = median per-epoch time (train + val);
    min = fastest epoch (robust to CPU contention from other processes); regvi/scvi = ratio of
    s/epoch at equal dataset, batch size and architecture; min r/s = ratio of min; r/scvi_nb =
    s/epoch ratio against scvi-tools with NB likelihood.
    """
    text = render_table(
        rows,
        [
            ("dataset", "<8", lambda r: r.get("dataset", "")),
            *parse_columns(
                """
                batch       5d     batch_size
                tool        <13    tool
                arch        <10    arch
                s/epoch     8.2f   s_per_epoch
                median      7.2f   median_epoch_s
                min         6.2f   min_epoch_s
                regvi/scvi  10.2f  ratio_regvi_over_scvi
                min r/s     7.2f   ratio_min_epoch_s_regvi_over_scvi
                r/scvi_nb   9.2f   ratio_regvi_over_scvi_nb
                peak MiB    9.0f   peak_rss_mib
                """
            ),
            *_common.SCIB_COLUMNS,
        ],
    )
    print(text)
    return text


def speed_table(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """One row per (dataset, batch size, architecture): both tools side by side."""
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["batch_size"], r["arch"]), {})[r["tool"]] = r
    rows = []
    for (ds, b, arch), by_tool in groups.items():
        row: dict[str, Any] = {"dataset": ds, "batch_size": b, "arch": arch}
        for tool in TOOLS:
            r = by_tool.get(tool, {})
            row[f"{tool}_s_per_epoch"] = r.get("s_per_epoch")
            row[f"{tool}_median_epoch_s"] = r.get("median_epoch_s")
            row[f"{tool}_peak_rss_mib"] = r.get("peak_rss_mib")
        for mine in REGVI_TOOLS:  # median per epoch: a compiled run's first epoch compiles
            for other in SCVI_TOOLS:
                a, o = row[f"{mine}_median_epoch_s"], row[f"{other}_median_epoch_s"]
                if a and o:
                    row[f"ratio_median_{mine}_over_{other}"] = a / o
        for other in SCVI_TOOLS:
            if row["regvi_s_per_epoch"] and row[f"{other}_s_per_epoch"]:
                row[f"ratio_regvi_over_{other}"] = (
                    row["regvi_s_per_epoch"] / row[f"{other}_s_per_epoch"]
                )
        rows.append(row)
    key = [("dataset", "<8", "dataset"), ("batch", ">5", "batch_size"), ("arch", "<10", "arch")]
    by_mean = render_table(
        rows,
        [
            *key,
            *parse_columns(
                """
                regvi s/ep    10.2f  regvi_s_per_epoch
                scvi s/ep     9.2f   scvi_s_per_epoch
                ratio         6.2f   ratio_regvi_over_scvi
                scvi_nb s/ep  12.2f  scvi_nb_s_per_epoch
                ratio         6.2f   ratio_regvi_over_scvi_nb
                regvi MiB     9.0f   regvi_peak_rss_mib
                scvi MiB      8.0f   scvi_peak_rss_mib
                scvi_nb MiB   11.0f  scvi_nb_peak_rss_mib
                """
            ),
        ],
    )
    by_median = render_table(
        rows,
        [
            *key,
            *parse_columns(
                """
                median s/epoch: regvi  21.2f  regvi_median_epoch_s
                regvi_compile          13.2f  regvi_compile_median_epoch_s
                scvi                   6.2f   scvi_median_epoch_s
                scvi_nb                7.2f   scvi_nb_median_epoch_s
                regvi/scvi             10.2f  ratio_median_regvi_over_scvi
                compile/scvi           12.2f  ratio_median_regvi_compile_over_scvi
                regvi/nb               8.2f   ratio_median_regvi_over_scvi_nb
                compile/nb             10.2f  ratio_median_regvi_compile_over_scvi_nb
                """
            ),
        ],
    )
    text = by_mean + "\n\n" + by_median
    print(text)
    return rows, text


def _prep_python(spec: DatasetSpec, scvi_python: str) -> str:
    """Interpreter for a dataset's prep child (seurat_v3 HVGs need scikit-misc; simulations
    need regvi)."""
    if spec.kind == "sim":
        return sys.executable
    if _has_module(sys.executable, "skmisc"):
        return sys.executable
    if Path(scvi_python).exists() and _has_module(scvi_python, "skmisc"):
        print("[bench] scikit-misc missing here; preprocessing with the scvi venv", flush=True)
        return scvi_python
    sys.exit("flavor='seurat_v3' needs scikit-misc (pip install scikit-misc)")


def _summary_rows(
    runs: list[dict[str, Any]], scib: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """One row per run (plus one "Unintegrated" row per scored dataset)."""
    by_key = {(r["dataset"], r["batch_size"], r["tool"], r["arch"]): r for r in runs}
    rows: list[dict[str, Any]] = []
    for r in runs:
        row: dict[str, Any] = {
            "dataset": r["dataset"],
            "batch_size": r["batch_size"],
            "lr": r.get("lr"),
            "tool": r["tool"],
            "arch": r["arch"],
            "error": r.get("error"),
        }
        row["s_per_epoch"] = r.get("s_per_epoch")
        row["median_epoch_s"] = r.get("median_epoch_s")
        row["min_epoch_s"] = r.get("min_epoch_s")
        row["peak_rss_mib"] = r.get("peak_rss_mib")
        if r["tool"] in REGVI_TOOLS:
            for other_tool, suffix in (("scvi", ""), ("scvi_nb", "_nb")):
                other = by_key.get((r["dataset"], r["batch_size"], other_tool, r["arch"]), {})
                if row["s_per_epoch"] and other.get("s_per_epoch"):
                    row[f"ratio_regvi_over_scvi{suffix}"] = (
                        row["s_per_epoch"] / other["s_per_epoch"]
                    )
                for stat in ("median_epoch_s", "min_epoch_s"):
                    if row[stat] and other.get(stat):
                        row[f"ratio_{stat}_regvi_over_scvi{suffix}"] = row[stat] / other[stat]
        sc_row = scib.get(f"{r['dataset']}/{r['emb']}", {})
        row.update({"bio": sc_row.get("Bio conservation"), "batch": sc_row.get("Batch correction"),
                    "total": sc_row.get("Total")})  # fmt: skip
        rows.append(row)
    for key, u in scib.items():
        ds, _, emb = key.partition("/")
        if emb == "Unintegrated":
            rows.append({"dataset": ds, "tool": "Unintegrated", "arch": "pca50",
                         "bio": u.get("Bio conservation"), "batch": u.get("Batch correction"),
                         "total": u.get("Total")})  # fmt: skip
    return rows


def _profile_summary(p: dict[str, Any]) -> dict[str, Any]:
    """A profile record without the per-event detail: timing, shares, top-20 ops."""
    keys = (
        "name",
        "batch_size",
        "val_batch_size",
        "arch",
        "lr",
        "n_cells",
        "n_genes",
        "contention",
    )
    out = {k: p.get(k) for k in (*keys, "lightning_overhead_ms_per_step", "error")}
    for part in ("lightning", "bare"):
        if part in p:
            out[part] = {k: v for k, v in p[part].items() if k != "profile"}
            for k in ("categories", "phases", "top_ops"):
                out[part][k] = p[part]["profile"][k]
    return out


def run_roofline_section(
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
    preps: dict[str, Path],
    workdir: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Profile regvi, time torch.mm at every shape the runs use, compute achieved FLOP/s.

    Returns
    -------
    tuple of dict
        The ``roofline`` and ``profile`` sections of ``bench_scvi.json``.
    """
    import bench_roofline as br

    rdir = workdir / "roofline"
    rdir.mkdir(exist_ok=True)
    profiles = _profiles(args, preps, rdir)
    ok = [r for r in runs if "flops" in r and "error" not in r]
    shapes = br.profile_shapes(profiles)
    for r in ok:
        shapes += br.run_shapes(r["flops"], r["batch_size"], r["val_batch_size"])
    peak = br.run_peak(shapes, rdir, args.mm_repeats)
    rates = peak.get("rates")
    sq = peak.get("peak_gflops_square")
    rows = []
    for r in ok:
        acc = br.epoch_accounting(
            r["flops"], r["n_train"], r["n_val"], r["batch_size"], r["val_batch_size"],
            r["s_per_epoch"], rates, sq,
        )  # fmt: skip
        rows.append({"name": r["name"], "dataset": r["dataset"], "tool": r["tool"],
                     "arch": r["arch"], **acc})  # fmt: skip
    prof_rows = [
        {"name": p["name"], **br.profile_accounting(p, peak)}
        for p in profiles
        if "flops" in p and "error" not in peak
    ]
    print()
    table = br.format_roofline(rows + prof_rows)
    print(table)
    peak_summary = {k: v for k, v in peak.items() if k != "rates"}
    roofline = {
        "method": (
            "achieved = matmul FLOPs per epoch / measured s per epoch; nominal FLOPs = "
            "3 x forward (every nn.Linear, 2*rows*in*out, hooked in one training forward) "
            "x N_train + forward x N_val; exact = forward + backward as executed (no input "
            "gradient for data-fed layers); peak = best torch.mm (float32, 2 threads, best of "
            f"{args.mm_repeats}) over the run's own shapes, or over square sizes; matmul floor = "
            "time of the epoch's matmuls at the measured per-shape speeds"
        ),
        "peak": peak_summary,
        "runs": rows,
        "profile_runs": prof_rows,
        "table": table,
    }
    profile = {
        "method": (
            "torch.profiler (CPU) over whole epochs of regvi.RegVI(...).train(...) after "
            f"{br.PROFILE_WARMUP_EPOCHS} warm-up epoch and an equally long unprofiled window "
            "(>= --profile-steps training steps each, validation included), then a bare loop "
            "(module.loss, backward, Adam) of the same number of steps; shares are of wall "
            "time; overhead = wall - all profiled op self time"
        ),
        "runs": [_profile_summary(p) for p in profiles],
    }
    detail = {
        "benchmark": "regvi roofline and profile (from bench_scvi.py)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "peak": peak,
        "roofline_runs": rows,
        "roofline_profile_runs": prof_rows,
        "profiles": profiles,
        "roofline_table": table,
        "profile_text": [br.format_profile(p) for p in profiles if "lightning" in p],
    }
    out = Path(args.roofline_out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(detail, indent=2))
    print(f"[bench] wrote {out}", flush=True)
    return roofline, profile


def _profiles(args: argparse.Namespace, preps: dict[str, Path], rdir: Path) -> list[dict[str, Any]]:
    """The regvi profiles on ``--profile-dataset`` (none with ``--skip-profile`` or when that
    dataset was not prepared)."""
    import bench_roofline as br

    if args.skip_profile:
        return []
    ds = args.profile_dataset
    if ds not in preps:
        print(f"[bench] profile dataset {ds!r} was not prepared; profile skipped", flush=True)
        return []
    return br.run_profiles(
        preps[ds],
        dataset_spec(ds).batch_key,
        args.profile_archs,
        args.profile_batch_sizes,
        lambda b: lr_for(b, args.lr, args.lr_scaling),
        args.profile_steps,
        rdir,
    )


def rerun_roofline(args: argparse.Namespace) -> int:
    """Redo only the roofline / profile sections of an earlier result (``--roofline-from``)."""
    src = Path(args.roofline_from).resolve()
    result = json.loads(src.read_text())
    if not args.workdir:
        sys.exit("--roofline-from needs --workdir: the folder holding <dataset>/prep.h5ad")
    workdir = Path(args.workdir).resolve()
    preps = {
        ds: workdir / ds / "prep.h5ad"
        for ds in result.get("datasets", {})
        if (workdir / ds / "prep.h5ad").exists()
    }
    print(f"[bench] roofline for the runs of {src} (prepared: {sorted(preps)})", flush=True)
    t0 = time.perf_counter()
    result["roofline"], result["profile"] = run_roofline_section(
        args, result["runs"], preps, workdir
    )
    result["roofline_created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["roofline_wall_s"] = time.perf_counter() - t0
    out = Path(args.out).resolve()
    out.write_text(json.dumps(result, indent=2))
    print(f"\n[bench] wrote {out}")
    return 0


def run_parent(args: argparse.Namespace) -> int:
    """Run the full benchmark: data, all training children, scib, roofline, report."""
    if args.roofline_from:
        return rerun_roofline(args)
    data, scvi_python = _parent_inputs(args)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    workdir = _common.workdir_for(args.workdir, "bench_scvi_")
    t_start = time.perf_counter()

    preps: dict[str, Path] = {}
    prep_recs: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    scib: dict[str, dict[str, float]] = {}
    scib_errors: dict[str, str] = {}
    for ds in args.datasets:
        ddir = workdir / ds
        ddir.mkdir(exist_ok=True)
        preps[ds], prep_recs[ds] = _prepare_dataset(ds, data, scvi_python, ddir)
        ds_runs, latents = _train_dataset(args, ds, preps[ds], scvi_python, ddir, t_start)
        runs += ds_runs
        if not args.skip_scib and ds in args.scib_datasets and latents:
            _score_dataset(args, ds, preps[ds], latents, scib, scib_errors)

    rows = _summary_rows(runs, scib)
    print()
    table = print_table(rows)
    print()
    speed_rows, speed_text = speed_table(runs)

    roofline: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    if not args.skip_roofline:
        print(f"\n[bench] roofline [{time.perf_counter() - t_start:.0f}s elapsed] ...", flush=True)
        roofline, profile = run_roofline_section(args, runs, preps, workdir)

    kang_prep = prep_recs.get("kang", {})
    result = {
        "benchmark": "regvi vs scvi-tools SCVI",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": str(data),
        "preprocessing": {
            "hvg": {"flavor": "seurat_v3", "n_top_genes": N_TOP_GENES, "batch_key": BATCH_KEY},
            "X": "raw counts",
            **kang_prep,
        },
        "datasets": {
            ds: {
                "batch_key": dataset_spec(ds).batch_key,
                "label_key": dataset_spec(ds).label_key,
                **rec,
            }
            for ds, rec in prep_recs.items()
        },
        "settings": _settings_record(args),
        "host": _common.host(),
        "versions": _common.versions(scvi_python),
        "summary": rows,
        "speed": speed_rows,
        "runs": runs,
        "scib": scib,
        "scib_error": "; ".join(f"{k}: {v}" for k, v in scib_errors.items()) or None,
        "table": table,
        "speed_table": speed_text,
        "roofline": roofline,
        "profile": profile,
        "total_wall_s": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\n[bench] wrote {out} [{time.perf_counter() - t_start:.0f}s total]")
    if not args.workdir and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [r["name"] for r in runs if "error" in r]
    return 1 if failed or scib_errors else 0


def _parent_inputs(args: argparse.Namespace) -> tuple[Path, str]:
    """The Kang data file and the scvi-tools interpreter; exits when a needed one is missing."""
    data = Path(args.data).resolve()
    if "kang" in args.datasets and not data.exists():
        sys.exit(f"data file not found: {data} (use --data)")
    scvi_python = str(args.scvi_python)
    if any(t in SCVI_TOOLS for t in args.tools) and not Path(scvi_python).exists():
        sys.exit(
            f"scvi-tools interpreter not found: {scvi_python}\n"
            f"create it with:  bash benchmarks/setup_scvi_env.sh  (or pass --scvi-python)"
        )
    return data, scvi_python


def _prepare_dataset(
    ds: str, data: Path, scvi_python: str, ddir: Path
) -> tuple[Path, dict[str, Any]]:
    """The prepared ``.h5ad`` of dataset ``ds`` (a prep child) and its record; exits on failure."""
    spec = dataset_spec(ds)
    prep = ddir / "prep.h5ad"
    t0 = time.perf_counter()
    prep_rec = launch(
        _prep_python(spec, scvi_python),
        ["--child", "prep", "--dataset", ds, "--data", str(data), "--prep", str(prep)],
        ddir / "prep.log",
        ddir / "prep.json",
    )
    if "error" in prep_rec:
        print(prep_rec["log_tail"], file=sys.stderr)
        sys.exit(f"preparing {ds} failed ({prep_rec['error']})")
    extra = ""
    if spec.kind == "sim":
        extra = (
            f", generation {prep_rec['generation_s']:.0f}s at peak RSS "
            f"{prep_rec['generation_peak_rss_mib']:.0f} MiB, density "
            f"{prep_rec['density']:.3f}"
        )
    print(
        f"[bench] {ds}: {prep_rec['n_cells']} cells x {prep_rec['n_genes_hvg']} genes "
        f"in {time.perf_counter() - t0:.0f}s{extra}",
        flush=True,
    )
    return prep, prep_rec


def _train_dataset(
    args: argparse.Namespace, ds: str, prep: Path, scvi_python: str, ddir: Path, t_start: float
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """One training child per batch size × architecture × tool on dataset ``ds``: their
    records, and the latents to score with scib-metrics (embedding name → ``.npy``)."""
    spec = dataset_spec(ds)
    pythons = {
        "regvi": sys.executable,
        "regvi_compile": sys.executable,
        "scvi": scvi_python,
        "scvi_nb": scvi_python,
    }
    archs = args.archs if spec.kind == "kang" else args.archs_sim
    epochs = args.epochs if spec.kind == "kang" else args.epochs_sim
    runs: list[dict[str, Any]] = []
    latents: dict[str, Path] = {}
    for b in args.batch_sizes:
        lr = lr_for(b, args.lr, args.lr_scaling)
        for arch in archs:
            for tool in args.tools:
                emb = f"b{b}_{tool}_{arch.name}"
                name = f"{ds}_{emb}"
                print(
                    f"[bench] training {name} ({epochs} epochs, lr {lr:g}) "
                    f"[{time.perf_counter() - t_start:.0f}s elapsed] ...",
                    flush=True,
                )
                latent = ddir / f"{emb}.npy"
                rec = launch(
                    pythons[tool],
                    [
                        "--child", tool, "--prep", str(prep), "--epochs", str(epochs),
                        "--n-hidden", str(arch.n_hidden), "--n-latent", str(arch.n_latent),
                        "--n-layers", str(arch.n_layers), "--latent-out", str(latent),
                        "--batch-size", str(b), "--lr", repr(lr),
                        "--batch-key", spec.batch_key,
                    ],
                    ddir / f"{emb}.log",
                    ddir / f"{emb}.json",
                )  # fmt: skip
                rec.update({"dataset": ds, "batch_size": b, "lr": lr, "tool": tool,
                            "arch": arch.name, "n_hidden": arch.n_hidden,
                            "n_latent": arch.n_latent, "n_layers": arch.n_layers,
                            "name": name, "emb": emb})  # fmt: skip
                if "error" in rec:
                    print(f"[bench] {name} FAILED ({rec['error']}); log tail:\n{rec['log_tail']}",
                          file=sys.stderr, flush=True)  # fmt: skip
                else:
                    if args.scib_batch_sizes is None or b in args.scib_batch_sizes:
                        latents[emb] = latent
                    print(
                        f"[bench] {name}: {rec['s_per_epoch']:.2f} s/epoch over "
                        f"{rec['epochs_run']} epochs, peak RSS {rec['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
                runs.append(rec)
    return runs, latents


def _score_dataset(
    args: argparse.Namespace,
    ds: str,
    prep: Path,
    latents: dict[str, Path],
    scib: dict[str, dict[str, float]],
    scib_errors: dict[str, str],
) -> None:
    """scib-metrics of ``latents`` on dataset ``ds`` into ``scib`` (``"ds/embedding"`` keys);
    a failure is reported in ``scib_errors`` and the timing results are kept."""
    spec = dataset_spec(ds)
    print(f"[bench] scib-metrics on {ds}: {len(latents)} latents + Unintegrated ...",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    try:
        res = run_scib(prep, latents, args.n_jobs, spec.batch_key, spec.label_key)
        scib.update({f"{ds}/{k}": v for k, v in res.items()})
        print(f"[bench] scib done in {time.perf_counter() - t0:.0f}s", flush=True)
    except Exception as err:  # report and keep the timing results
        scib_errors[ds] = f"{type(err).__name__}: {err}"
        print(f"[bench] scib FAILED: {scib_errors[ds]}", file=sys.stderr, flush=True)


def _settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """The ``settings`` section of ``bench_scvi.json``."""
    scib_settings = {
        "min_max_scale": False,
        "n_jobs": args.n_jobs,
        "datasets": args.scib_datasets,
        "batch_sizes": args.scib_batch_sizes or "all",
        "unintegrated": "scanpy PCA (arpack, 50 PCs) of log1p(normalize_total 1e4) HVG X",
    }
    return {
        "epochs": args.epochs,
        "epochs_sim": args.epochs_sim,
        "batch_size": args.batch_sizes[0],
        "batch_sizes": args.batch_sizes,
        "lr": {
            "base": args.lr,
            "scaling": args.lr_scaling,
            "by_batch_size": {
                str(b): lr_for(b, args.lr, args.lr_scaling) for b in args.batch_sizes
            },
            "note": "the same explicit lr is passed to every tool (scvi via plan_kwargs)",
        },
        "train_size": TRAIN_SIZE,
        "validation": "every epoch",
        "early_stopping": False,
        "torch_threads": N_THREADS,
        "batch_key": BATCH_KEY,
        "label_key": LABEL_KEY,
        "datasets": args.datasets,
        "tools": args.tools,
        "archs": [a.name for a in args.archs],
        "archs_sim": [a.name for a in args.archs_sim],
        "scib": None if args.skip_scib else scib_settings,
    }


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (parent options and hidden child options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Kang input .h5ad (raw counts)")
    p.add_argument("--datasets", type=parse_datasets, default=parse_datasets("kang,sim100k"),
                   help="comma-separated: kang, simNk (default kang,sim100k)")  # fmt: skip
    p.add_argument("--batch-sizes", type=parse_ints, default=parse_ints("128,1024"),
                   help="comma-separated minibatch sizes (default 128,1024)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="epochs on Kang (default 20)")
    p.add_argument("--epochs-sim", type=int, default=3,
                   help="epochs on simulated data (default 3; enough for timing)")  # fmt: skip
    p.add_argument("--archs", type=parse_archs, default=parse_archs("128x10,512x128"),
                   help="Kang architectures, n_hiddenxn_latent (default 128x10,512x128)")  # fmt: skip
    p.add_argument("--archs-sim", type=parse_archs, default=parse_archs("128x10"),
                   help="architectures on simulated data (default 128x10)")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3, help="lr at batch size 128 (default 1e-3)")
    p.add_argument("--lr-scaling", choices=("linear", "none"), default="linear",
                   help="linear: lr * B / 128 for BOTH tools (default); none: --lr everywhere")  # fmt: skip
    p.add_argument("--tools", default="regvi,scvi",
                   type=lambda s: [t for t in s.split(",") if t in TOOLS],
                   help="subset of regvi,scvi,scvi_nb to run (default regvi,scvi)")  # fmt: skip
    p.add_argument("--scib-datasets", type=parse_datasets, default=parse_datasets("kang"),
                   help="datasets scored with scib-metrics (default kang)")  # fmt: skip
    p.add_argument("--scib-batch-sizes", type=parse_ints, default=None,
                   help="batch sizes whose latents are scored (default all)")  # fmt: skip
    p.add_argument("--skip-roofline", action="store_true",
                   help="skip torch.mm peak, achieved FLOP/s and the profile")  # fmt: skip
    p.add_argument("--skip-profile", action="store_true", help="skip the torch.profiler runs")
    p.add_argument("--profile-dataset", default="kang", help="dataset profiled (default kang)")
    p.add_argument("--profile-batch-sizes", type=parse_ints, default=parse_ints("128,1024"))
    p.add_argument("--profile-archs", type=parse_archs, default=parse_archs("128x10,512x128"))
    p.add_argument("--profile-steps", type=int, default=200,
                   help="training steps per profile window (rounded up to epochs)")  # fmt: skip
    p.add_argument("--mm-repeats", type=int, default=10, help="torch.mm repeats (best of)")
    p.add_argument("--roofline-from", default=None, metavar="RESULT_JSON",
                   help="only redo roofline + profile for the runs of an earlier result "
                   "(with --workdir of that run)")  # fmt: skip
    p.add_argument("--roofline-out", default=str(DEFAULT_ROOFLINE_OUT),
                   help="JSON with the full roofline / profile detail")  # fmt: skip
    _common.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--child", choices=("prep", *TOOLS), help=argparse.SUPPRESS)
    p.add_argument("--dataset", default="kang", help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    p.add_argument("--n-hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-latent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-layers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--batch-key", default=BATCH_KEY, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the parent benchmark or to a child step."""
    return _common.dispatch(build_parser(), run_child_main, run_parent, argv)


if __name__ == "__main__":
    raise SystemExit(main())
