"""Benchmark regvi ``RegMultiVI`` against scvi-tools ``MULTIVI`` on paired RNA + ATAC data.

The data are the SNARE-seq2 mouse primary motor cortex cells (10,309 cells, 1,677 genes,
25,734 peaks, 12 libraries in ``obs["batch"]``, 23 labels in ``obs["cell_type"]``). The
benchmark compares speed (seconds per epoch), peak memory (peak RSS of the training
process) and integration quality (scib-metrics) at (as far as the tools allow) equal
architecture: 128 hidden units, one hidden layer, a 20-dimensional latent space.

Runs
----
``regvi-multi``
    ``regvi.RegMultiVI({"rna": rna, "atac": atac}, library_key="batch",
    n_latent={"atac": 10, "rna": 10}, n_hidden=128)``; latent = joint
    z = [z_atac ; z_rna] (20 dims).
``regvi-poe``
    the same with ``latent_mode="poe", n_latent=20``: one shared 20-dimensional latent whose
    posterior is the product of the prior and the RNA and ATAC encoders' Gaussian experts.
``regvi-multi-r20``
    ``regvi-multi`` with an RNA block as large as RegVI's latent:
    ``n_latent={"atac": 10, "rna": 20}`` (30 dims).
``regvi-rna``
    ``regvi.RegVI(rna, library_key="batch", n_latent=20, n_hidden=128)``: the RNA-only
    baseline.
``multivi``
    ``scvi.model.MULTIVI`` on a MuData (``setup_mudata(batch_key="batch",
    modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"})``) with
    ``n_hidden=128, n_latent=20, n_layers_encoder=1, n_layers_decoder=1``; latent = the
    joint posterior mean (the mixture of the expression and accessibility posteriors).
    MultiVI's own optimiser defaults stay (AdamW, lr 1e-4, weight decay 1e-3, adversarial
    modality mixing on). Should MultiVI fail, the script falls back to ``peakvi+scvi``
    (PeakVI on ATAC with 10 latent dims next to SCVI on RNA with 10, latents
    concatenated) and records that in the JSON.

Every run trains in its own subprocess (so the peak RSS is per run) with
``torch.set_num_threads(2)``, batch size 128, a 90 / 10 train / validation split, a fixed
number of epochs, no early stopping, validation after every epoch and a linear KL warmup
over ``--kl-warmup`` epochs (default 50, MultiVI's and regvi's default; passed explicitly
to every tool, so all of them use the same KL weight ``epoch / 50``). Seconds per epoch =
wall time of the ``train`` call / epochs run. The child writes the latent posterior mean to
``.npy``. Finally one scib-metrics ``Benchmarker`` scores all latents plus an
"Unintegrated" reference: scanpy PCA of the log-normalised RNA matrix, computed the way
``Benchmarker.prepare`` computes its pre-integration embedding.

Usage
-----
::

    .venv/bin/python benchmarks/bench_multivi.py --epochs 20

The scvi-tools interpreter is ``--scvi-python`` (default ``benchmarks/.venv-scvi/bin/python``,
made by ``benchmarks/setup_scvi_env.sh``).
The script file is also the child entry point (``--child RUN``); at module level it
imports only the standard library, so it runs under either interpreter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _common
from _common import (  # stdlib-only at module level, next to this file
    LATENT_BATCH_SIZE,
    N_THREADS,
    REPO_ROOT,
    SEED,
    TRAIN_SIZE,
    epoch_timer,
    render_table,
    set_threads,
)

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
RNA_FILE = "mop_snareseq2_rna.h5ad"
ATAC_FILE = "mop_snareseq2_atac.h5ad"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_multivi.json"

BATCH_KEY = "batch"
LABEL_KEY = "cell_type"
N_HIDDEN = 128
N_LATENT = 20  # total; the two-modality models split it 10 + 10
N_LAYERS = 1
BATCH_SIZE = 128
VALIDATION_FRACTION = 0.1  # regvi: 1 - TRAIN_SIZE
KL_WARMUP = 50  # epochs; the default of MULTIVI.train, PEAKVI.train and regvi
RUNS = ("regvi-multi", "regvi-poe", "regvi-multi-r20", "regvi-rna", "multivi")
#: The regvi runs on RNA + ATAC.
REGVI_MULTI_RUNS = ("regvi-multi", "regvi-poe", "regvi-multi-r20")
FALLBACK = "peakvi+scvi"
SCVI_RUNS = ("multivi", FALLBACK)
REFERENCE = "multivi"


# --------------------------------------------------------------------------- children


def _scvi_final(model: Any) -> dict[str, float]:
    """Last-epoch values of the scalar histories of an scvi-tools model."""
    final = {}
    for k, df in model.history.items():
        try:
            final[str(k)] = float(df.iloc[-1, 0])
        except (TypeError, ValueError, IndexError):
            continue
    return final


def child_train(
    run: str,
    rna_path: Path,
    atac_path: Path,
    epochs: int,
    warmup: int,
    latent_out: Path,
    max_kl_weight: float | None = None,
    seed: int = SEED,
    modality_dropout: float = 0.0,
    atac_kl_multiplier: float | None = None,
) -> dict[str, Any]:
    """Train one model in this process and save its latent posterior mean.

    Parameters
    ----------
    run
        One of ``RUNS`` or ``FALLBACK``.
    rna_path, atac_path
        Paired RNA and ATAC ``.h5ad`` files (raw counts in ``X``, same cells in the same order).
    epochs
        Number of epochs (fixed, no early stopping).
    warmup
        Linear KL warmup length in epochs.
    latent_out
        ``.npy`` path for the ``(n_cells, N_LATENT)`` latent mean.
    max_kl_weight
        regvi runs: ``train(max_kl_weight=...)``; ``None`` for regvi's default.
    seed
        Seed of the run (torch, numpy, the tool's own seed).
    modality_dropout
        ``regvi-multi`` / ``regvi-poe``: ``RegMultiVI(modality_dropout=...)``.
    atac_kl_multiplier
        ``regvi-multi``: ``RegMultiVI(kl_multipliers={"atac": ...})``; ``None``: not set.

    Returns
    -------
    dict
        Timing, memory, epochs run, model settings and library versions.
    """
    import anndata as ad
    import numpy as np
    import torch

    set_threads(N_THREADS)
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seed the legacy global RNG the libraries may use
    rna = ad.read_h5ad(rna_path)
    atac = ad.read_h5ad(atac_path) if run != "regvi-rna" else None
    if atac is not None and not np.array_equal(rna.obs_names, atac.obs_names):
        raise ValueError("RNA and ATAC files must hold the same cells in the same order")
    rec: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "n_cells": int(rna.n_obs),
        "n_genes": int(rna.n_vars),
        "n_regions": None if atac is None else int(atac.n_vars),
        "kl_warmup_epochs": warmup,
        "seed": seed,
    }
    if run in SCVI_RUNS:
        trained = _train_scvi_tools(run, rna, atac, epochs, warmup, rec, seed)
    elif run in (*REGVI_MULTI_RUNS, "regvi-rna"):
        trained = _train_regvi(
            run,
            rna,
            atac,
            epochs,
            warmup,
            rec,
            max_kl_weight,
            seed,
            modality_dropout,
            atac_kl_multiplier,
        )
    else:
        raise ValueError(f"unknown run {run!r}")

    n_dims = N_LATENT + N_LATENT // 2 if run == "regvi-multi-r20" else N_LATENT
    _common.save_latent(trained.z, (rna.n_obs, n_dims), latent_out)
    rec.update(trained.timing(epochs))
    return rec


def _train_scvi_tools(
    run: str, rna: Any, atac: Any, epochs: int, warmup: int, rec: dict[str, Any], seed: int
) -> _common.TrainedRun:
    """MULTIVI, or the PeakVI + SCVI fallback; adds versions, the model and the final losses
    to ``rec``."""
    import lightning
    import scvi

    scvi.settings.seed = seed
    set_threads(N_THREADS)  # scvi's seed setter may touch torch settings; re-pin
    timer = epoch_timer()
    rec.update({"scvi-tools": scvi.__version__, "lightning": lightning.__version__})
    train = _train_multivi if run == "multivi" else _train_peakvi_scvi
    z, train_s, epochs_run, final, rss_before = train(rna, atac, epochs, warmup, timer, rec)
    rec["final"] = final
    return _common.TrainedRun(z, train_s, epochs_run, list(timer.times), rss_before)


def _train_multivi(
    rna: Any, atac: Any, epochs: int, warmup: int, timer: Any, rec: dict[str, Any]
) -> tuple[Any, float, int, dict[str, float], float | None]:
    """scvi-tools MULTIVI on the paired cells: latent, train seconds, epochs run, final
    values and RSS before training; adds the mudata version and the model to ``rec``."""
    import mudata as md
    import scvi

    rec["mudata"] = md.__version__
    # batch_key is read from the RNA modality's obs (modalities["batch_key"] = "rna")
    mdata = md.MuData({"rna": rna, "atac": atac})
    scvi.model.MULTIVI.setup_mudata(
        mdata,
        batch_key=BATCH_KEY,
        modalities={"rna_layer": "rna", "atac_layer": "atac", "batch_key": "rna"},
    )
    model = scvi.model.MULTIVI(
        mdata,
        n_genes=rna.n_vars,
        n_regions=atac.n_vars,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
        n_layers_encoder=N_LAYERS,
        n_layers_decoder=N_LAYERS,
    )
    rec["model"] = {
        "class": "scvi.model.MULTIVI",
        "setup": "setup_mudata(batch_key='batch', modalities={'rna_layer': 'rna', "
        "'atac_layer': 'atac', 'batch_key': 'rna'})",
        "n_hidden": N_HIDDEN,
        "n_latent": N_LATENT,
        "n_layers_encoder": N_LAYERS,
        "n_layers_decoder": N_LAYERS,
        "train": "MULTIVI.train defaults otherwise: AdamW lr 1e-4, weight_decay 1e-3, "
        "eps 1e-8, adversarial_mixing=True, modality_weights='equal', "
        "modality_penalty='Jeffreys', gene_likelihood='zinb'",
        "latent": "get_latent_representation(modality='joint') posterior mean",
    }
    _, train_s, rss_before = _common.timed(
        lambda: model.train(
            **_common.scvi_train_kwargs(epochs, BATCH_SIZE, timer), n_epochs_kl_warmup=warmup
        )
    )
    epochs_run = len(timer.times) or len(model.history["elbo_train"])
    final = _scvi_final(model)
    z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
    return z, train_s, epochs_run, final, rss_before


def _train_peakvi_scvi(
    rna: Any, atac: Any, epochs: int, warmup: int, timer: Any, rec: dict[str, Any]
) -> tuple[Any, float, int, dict[str, float], float | None]:
    """The fallback for MULTIVI: PeakVI on ATAC + SCVI on RNA, latents concatenated (as
    :func:`_train_multivi`); ``timer`` gets the summed epoch times."""
    import numpy as np
    import scvi

    n_half = N_LATENT // 2
    scvi.model.PEAKVI.setup_anndata(atac, batch_key=BATCH_KEY)
    peakvi = scvi.model.PEAKVI(
        atac,
        n_hidden=N_HIDDEN,
        n_latent=n_half,
        n_layers_encoder=N_LAYERS,
        n_layers_decoder=N_LAYERS,
    )
    scvi.model.SCVI.setup_anndata(rna, batch_key=BATCH_KEY)
    scvi_model = scvi.model.SCVI(
        rna, n_hidden=N_HIDDEN, n_latent=N_LATENT - n_half, n_layers=N_LAYERS
    )
    rec["model"] = {
        "class": "scvi.model.PEAKVI + scvi.model.SCVI (fallback for MULTIVI)",
        "n_hidden": N_HIDDEN,
        "n_latent": {"atac": n_half, "rna": N_LATENT - n_half},
        "latent": "[z_peakvi ; z_scvi] posterior means",
    }
    timer_scvi = epoch_timer()

    def train_both() -> None:
        peakvi.train(
            **_common.scvi_train_kwargs(epochs, BATCH_SIZE, timer), n_epochs_kl_warmup=warmup
        )
        scvi_model.train(
            **_common.scvi_train_kwargs(epochs, BATCH_SIZE, timer_scvi),
            plan_kwargs={"n_epochs_kl_warmup": warmup},
        )

    _, train_s, rss_before = _common.timed(train_both)
    epochs_run = len(timer.times) or epochs
    timer.times = [a + b for a, b in zip(timer.times, timer_scvi.times, strict=False)]
    final = {f"peakvi_{k}": v for k, v in _scvi_final(peakvi).items()}
    final.update({f"scvi_{k}": v for k, v in _scvi_final(scvi_model).items()})
    z = np.concatenate(
        [
            peakvi.get_latent_representation(batch_size=LATENT_BATCH_SIZE),
            scvi_model.get_latent_representation(batch_size=LATENT_BATCH_SIZE),
        ],
        axis=1,
    )
    return z, train_s, epochs_run, final, rss_before


def _train_regvi(
    run: str,
    rna: Any,
    atac: Any,
    epochs: int,
    warmup: int,
    rec: dict[str, Any],
    max_kl_weight: float | None = None,
    seed: int = SEED,
    modality_dropout: float = 0.0,
    atac_kl_multiplier: float | None = None,
) -> _common.TrainedRun:
    """regvi: RegMultiVI on RNA + ATAC (``regvi-multi``: concatenated blocks; ``regvi-poe``:
    product of experts) or RegVI on RNA (``regvi-rna``); adds the model, version, history
    columns and final values to ``rec``."""
    import regvi

    if run in REGVI_MULTI_RUNS:
        poe = run == "regvi-poe"
        half = N_LATENT // 2
        n_latent: Any = N_LATENT if poe else {"atac": half, "rna": N_LATENT - half}
        if run == "regvi-multi-r20":
            n_latent = {"atac": half, "rna": N_LATENT}
        mode = "poe" if poe else "concat"
        kl_mult = {} if atac_kl_multiplier is None or poe else {"atac": atac_kl_multiplier}
        model = regvi.RegMultiVI(
            {"rna": rna, "atac": atac},
            library_key=BATCH_KEY,
            n_latent=n_latent,
            n_hidden=N_HIDDEN,
            n_layers=N_LAYERS,
            latent_mode=mode,
            modality_dropout=modality_dropout,
            kl_multipliers=kl_mult,
        )
        cls = f"regvi.RegMultiVI(latent_mode={mode!r}, modality_dropout={modality_dropout}" + (
            f", kl_multipliers={kl_mult})" if kl_mult else ")"
        )
        latent_desc = (
            "shared z posterior mean (product of the prior and both experts)"
            if poe
            else "joint z = [z_atac ; z_rna] posterior mean"
        )
    else:
        n_latent = N_LATENT
        model = regvi.RegVI(
            rna, library_key=BATCH_KEY, n_latent=N_LATENT, n_hidden=N_HIDDEN, n_layers=N_LAYERS
        )
        cls = "regvi.RegVI"
        latent_desc = "z posterior mean (RNA only)"
    rec["model"] = {
        "class": cls,
        "library_key": BATCH_KEY,
        "n_hidden": N_HIDDEN,
        "n_latent": n_latent,
        "n_layers": N_LAYERS,
        "train": "regvi defaults otherwise: Adam lr 1e-3, weight_decay 1e-6, eps 0.01",
        "max_kl_weight": max_kl_weight,  # None: the default
        "latent": latent_desc,
    }
    hist, train_s, rss_before = _common.timed(
        lambda: model.train(
            max_epochs=epochs,
            batch_size=BATCH_SIZE,
            validation_fraction=VALIDATION_FRACTION,
            early_stopping=False,
            n_epochs_kl_warmup=warmup,
            seed=seed,
            progress_bar=False,
            **({} if max_kl_weight is None else {"max_kl_weight": max_kl_weight}),
        )
    )
    z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
    rec.update(_common.regvi_history_record(hist))
    epoch_times = _common.history_epoch_times(hist)
    return _common.TrainedRun(z, train_s, len(hist), epoch_times, rss_before)


def run_child_main(args: argparse.Namespace) -> int:
    """Entry point of a child process; writes its record as JSON to ``--record``."""
    rec = child_train(
        args.child,
        Path(args.rna),
        Path(args.atac),
        args.epochs,
        args.kl_warmup,
        Path(args.latent_out),
        args.max_kl_weight,
        args.seed,
        args.modality_dropout,
        args.atac_kl_multiplier,
    )
    return _common.write_record(args, rec)


# --------------------------------------------------------------------------- parent


def launch(python: str, child_args: list[str], log: Path, record: Path) -> dict[str, Any]:
    """Run this script as a child under ``python`` (see :func:`_common.launch`)."""
    return _common.launch(__file__, python, child_args, log, record)


def run_scib(rna_path: Path, latents: dict[str, Path], n_jobs: int) -> dict[str, dict[str, float]]:
    """Score all latents plus the "Unintegrated" PCA of the RNA cells (raw counts in
    ``rna_path``) with one scib-metrics ``Benchmarker``: embedding → {metric: value}."""
    return _common.score_latents(rna_path, latents, BATCH_KEY, LABEL_KEY, n_jobs)


def print_table(rows: list[dict[str, Any]], reference: str) -> str:
    """Render the result rows as a fixed-width table (also returned as text).

    s/epoch = wall time of train() / epochs; median = median per-epoch time (train + val);
    /reference = ratio of s/epoch to the MultiVI run (or to its fallback).
    """
    text = render_table(
        rows,
        [
            ("run", "<13", "run"),
            ("s/epoch", "8.2f", "s_per_epoch"),
            ("median", "7.2f", "median_epoch_s"),
            (f"/{reference}", "12.2f", "ratio_to_reference"),
            ("peak MiB", "9.0f", "peak_rss_mib"),
            *_common.SCIB_COLUMNS,
        ],
    )
    print(text)
    return text


def _train_run(
    run: str, python: str, args: argparse.Namespace, paths: dict[str, Path], workdir: Path
) -> tuple[dict[str, Any], Path]:
    """Train one run in a subprocess; returns its record and latent path."""
    print(f"[bench] training {run} ({args.epochs} epochs) ...", flush=True)
    tag = run.replace("+", "_")
    latent = workdir / f"{tag}.npy"
    rec = launch(
        python,
        [
            "--child", run, "--rna", str(paths["rna"]), "--atac", str(paths["atac"]),
            "--epochs", str(args.epochs), "--kl-warmup", str(args.kl_warmup),
            "--latent-out", str(latent), "--seed", str(args.seed),
            *([] if args.max_kl_weight is None else ["--max-kl-weight", str(args.max_kl_weight)]),
            "--modality-dropout", str(args.modality_dropout),
            *([] if args.atac_kl_multiplier is None
              else ["--atac-kl-multiplier", str(args.atac_kl_multiplier)]),
        ],
        workdir / f"{tag}.log",
        workdir / f"{tag}.json",
    )  # fmt: skip
    rec["run"] = run
    if "error" in rec:
        print(f"[bench] {run} FAILED ({rec['error']}); log tail:\n{rec['log_tail']}",
              file=sys.stderr, flush=True)  # fmt: skip
    else:
        print(
            f"[bench] {run}: {rec['s_per_epoch']:.2f} s/epoch over {rec['epochs_run']} epochs, "
            f"peak RSS {rec['peak_rss_mib']:.0f} MiB (child wall {rec['wall_s']:.0f}s)",
            flush=True,
        )
    return rec, latent


def run_parent(args: argparse.Namespace) -> int:
    """Run the full benchmark: all training children, scib, report."""
    t_start = time.perf_counter()
    data_dir = Path(args.data_dir).resolve()
    paths = {"rna": data_dir / RNA_FILE, "atac": data_dir / ATAC_FILE}
    for p in paths.values():
        if not p.exists():
            sys.exit(f"data file not found: {p} (use --data-dir)")
    scvi_python = str(args.scvi_python)
    if "multivi" in args.runs and not Path(scvi_python).exists():
        sys.exit(f"scvi-tools interpreter not found: {scvi_python} (pass --scvi-python)")
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    workdir = _common.workdir_for(args.workdir, "bench_multivi_")
    runs, latents, fallback_used = _train_runs(args, scvi_python, paths, workdir)
    scib: dict[str, dict[str, float]] = {}
    scib_error = None
    scib_s = None
    if not args.skip_scib and latents:
        scib, scib_s, scib_error = _score(args, paths, latents)

    by_run = {r["run"]: r for r in runs}
    reference = FALLBACK if fallback_used else REFERENCE
    rows = _summary_rows(runs, scib, by_run.get(reference, {}).get("s_per_epoch"))
    print()
    table = print_table(rows, reference)

    child_only = ("child", "rna", "atac", "record", "latent_out")
    args_rec = {k: v for k, v in vars(args).items() if k not in child_only}
    result = {
        "benchmark": "regvi RegMultiVI vs scvi-tools MULTIVI (paired RNA + ATAC)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {k: str(v) for k, v in paths.items()},
        "args": args_rec,
        "settings": _settings_record(args, reference, fallback_used),
        "host": _common.host(),
        "versions": _common.versions(scvi_python),
        "summary": rows,
        "runs": runs,
        "scib": scib,
        "scib_s": scib_s,
        "scib_error": scib_error,
        "total_wall_s": time.perf_counter() - t_start,
        "table": table,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\n[bench] wrote {out} (total {result['total_wall_s']:.0f}s)")
    if not args.workdir and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [r["run"] for r in runs if "error" in r and not fallback_used]
    if fallback_used and "error" in by_run.get(FALLBACK, {}):
        failed.append(FALLBACK)
    return 1 if failed or scib_error else 0


def _train_runs(
    args: argparse.Namespace, scvi_python: str, paths: dict[str, Path], workdir: Path
) -> tuple[list[dict[str, Any]], dict[str, Path], str | None]:
    """One training child per ``--runs`` entry (PeakVI + SCVI when MULTIVI fails, unless
    ``--no-fallback``): the records, the latents of the runs that succeeded, and the fallback
    note (``None`` without fallback)."""
    runs: list[dict[str, Any]] = []
    latents: dict[str, Path] = {}
    fallback_used = None
    for run in args.runs:
        python = scvi_python if run in SCVI_RUNS else sys.executable
        rec, latent = _train_run(run, python, args, paths, workdir)
        runs.append(rec)
        if "error" not in rec:
            latents[run] = latent
        elif run == "multivi" and not args.no_fallback:
            fallback_used = f"MULTIVI failed ({rec['error']}); fell back to PEAKVI + SCVI"
            print(f"[bench] {fallback_used}", flush=True)
            fb, fb_latent = _train_run(FALLBACK, python, args, paths, workdir)
            fb["fallback_for"] = "multivi"
            runs.append(fb)
            if "error" not in fb:
                latents[FALLBACK] = fb_latent
    return runs, latents, fallback_used


def _score(
    args: argparse.Namespace, paths: dict[str, Path], latents: dict[str, Path]
) -> tuple[dict[str, dict[str, float]], float | None, str | None]:
    """scib-metrics of the latents on the RNA cells: scores, seconds, error (one is ``None``)."""
    print(f"[bench] scib-metrics on {len(latents)} latents + Unintegrated ...", flush=True)
    t0 = time.perf_counter()
    try:
        scib = run_scib(paths["rna"], latents, args.n_jobs)
    except Exception as err:  # report and keep the timing results
        scib_error = f"{type(err).__name__}: {err}"
        print(f"[bench] scib FAILED: {scib_error}", file=sys.stderr, flush=True)
        return {}, None, scib_error
    scib_s = time.perf_counter() - t0
    print(f"[bench] scib done in {scib_s:.0f}s", flush=True)
    return scib, scib_s, None


def _summary_rows(
    runs: list[dict[str, Any]], scib: dict[str, dict[str, float]], ref_s: float | None
) -> list[dict[str, Any]]:
    """One row per run (speed, memory, ratio to the reference's s/epoch, scib aggregates),
    plus the Unintegrated scib row."""
    rows: list[dict[str, Any]] = []
    for r in runs:
        row: dict[str, Any] = {"run": r["run"], "error": r.get("error")}
        for k in ("s_per_epoch", "median_epoch_s", "min_epoch_s", "peak_rss_mib", "epochs_run"):
            row[k] = r.get(k)
        if row["s_per_epoch"] and ref_s:
            row["ratio_to_reference"] = row["s_per_epoch"] / ref_s
        sc_row = scib.get(r["run"], {})
        row.update({"bio": sc_row.get("Bio conservation"), "batch": sc_row.get("Batch correction"),
                    "total": sc_row.get("Total")})  # fmt: skip
        rows.append(row)
    if "Unintegrated" in scib:
        u = scib["Unintegrated"]
        rows.append({"run": "Unintegrated", "bio": u.get("Bio conservation"),
                     "batch": u.get("Batch correction"), "total": u.get("Total")})  # fmt: skip
    return rows


def _settings_record(
    args: argparse.Namespace, reference: str, fallback_used: str | None
) -> dict[str, Any]:
    """The ``settings`` section of ``bench_multivi.json``."""
    return {
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "train_size": TRAIN_SIZE,
        "validation": "every epoch",
        "early_stopping": False,
        "kl_warmup_epochs": args.kl_warmup,
        "seed": args.seed,
        "torch_threads": N_THREADS,
        "n_hidden": N_HIDDEN,
        "n_latent_total": N_LATENT,
        "n_layers": N_LAYERS,
        "batch_key": BATCH_KEY,
        "label_key": LABEL_KEY,
        "ratio_reference": reference,
        "fallback": fallback_used,
        "scib": None
        if args.skip_scib
        else {
            "min_max_scale": False,
            "metrics": "BioConservation() and BatchCorrection() defaults",
            "n_jobs": args.n_jobs,
            "adata": "RNA cells",
            "unintegrated": "scanpy PCA (arpack, 50 PCs) of log1p(normalize_total 1e4) RNA X",
        },
    }


def _parse_runs(spec: str) -> list[str]:
    """Parse ``--runs``: a comma-separated subset of ``RUNS``."""
    runs = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [r for r in runs if r not in (*RUNS, FALLBACK)]
    if bad or not runs:
        raise argparse.ArgumentTypeError(f"bad --runs {spec!r}; choose from {','.join(RUNS)}")
    return runs


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (parent options and hidden child options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help=f"folder with {RNA_FILE} and {ATAC_FILE}")  # fmt: skip
    p.add_argument("--epochs", type=int, default=20, help="fixed number of epochs (default 20)")
    p.add_argument("--runs", type=_parse_runs, default=list(RUNS),
                   help=f"comma-separated subset of {','.join(RUNS)} (default all)")  # fmt: skip
    p.add_argument("--kl-warmup", type=int, default=KL_WARMUP,
                   help=f"KL warmup epochs for every tool (default {KL_WARMUP})")  # fmt: skip
    p.add_argument("--max-kl-weight", type=float, default=None,
                   help="regvi runs: train(max_kl_weight=...) (default: regvi's default)")  # fmt: skip
    p.add_argument("--modality-dropout", type=float, default=0.0,
                   help="regvi-multi / regvi-poe: RegMultiVI(modality_dropout=...) (default 0)")  # fmt: skip
    p.add_argument("--atac-kl-multiplier", type=float, default=None,
                   help="regvi-multi: RegMultiVI(kl_multipliers={'atac': ...}) (default: unset)")  # fmt: skip
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"seed of every run (default {SEED})")  # fmt: skip
    p.add_argument("--no-fallback", action="store_true",
                   help="do not fall back to PEAKVI + SCVI when MULTIVI fails")  # fmt: skip
    _common.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--child", choices=(*RUNS, FALLBACK), help=argparse.SUPPRESS)
    p.add_argument("--rna", help=argparse.SUPPRESS)
    p.add_argument("--atac", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the parent benchmark or to a child step."""
    return _common.dispatch(build_parser(), run_child_main, run_parent, argv)


if __name__ == "__main__":
    raise SystemExit(main())
