"""Benchmark regvi against scvi-tools ``SCVI`` on the Kang et al. 2018 IFN-β PBMC data.

The benchmark compares speed (seconds per epoch), peak memory (peak RSS of the
training process) and integration quality (scib-metrics) at equal architecture.

Pipeline
--------
1. **Preprocessing** (once, shared): 4,000 HVGs with
   ``sc.pp.highly_variable_genes(flavor="seurat_v3", n_top_genes=4000, batch_key="condition")``
   on the raw counts; ``X`` stays raw counts. The result is written to a temporary
   ``.h5ad`` that every run reads.
2. **Training**: every (tool, architecture) pair runs in its own subprocess so the
   peak RSS is per run. regvi runs with the current interpreter, scvi-tools with
   ``--scvi-python`` (a separate virtualenv, see ``benchmarks/setup_scvi_env.sh``).
   Both use ``torch.set_num_threads(2)``, batch size 128, a fixed number of epochs,
   no early stopping and validation on 10 % of the cells after every epoch.
   Seconds per epoch = wall time of the ``train`` call / epochs run. The child
   writes the latent posterior mean to ``.npy``.
3. **scib-metrics**: one ``Benchmarker`` over all latents plus an "Unintegrated"
   PCA reference (scanpy PCA of the log-normalised HVG matrix, computed exactly
   the way ``Benchmarker.prepare`` computes its pre-integration embedding).

Usage
-----
::

    benchmarks/setup_scvi_env.sh                      # once: scvi-tools venv
    .venv/bin/python benchmarks/bench_scvi.py --epochs 20

The script file is also the child entry point (``--child {regvi,scvi,prep}``);
at module level it imports only the standard library, so it runs under either
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"
DEFAULT_SCVI_PYTHON = REPO_ROOT / "benchmarks" / ".venv-scvi" / "bin" / "python"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_scvi.json"

BATCH_KEY = "condition"
LABEL_KEY = "cell_type"
N_TOP_GENES = 4000
BATCH_SIZE = 128
TRAIN_SIZE = 0.9
N_THREADS = 2
LATENT_BATCH_SIZE = 1024
SEED = 0
TOOLS = ("regvi", "scvi")


@dataclass(frozen=True)
class Arch:
    """Encoder/decoder architecture shared by both tools.

    Attributes
    ----------
    n_hidden
        Width of the hidden layer.
    n_latent
        Dimension of the latent space.
    n_layers
        Number of hidden layers.
    """

    n_hidden: int
    n_latent: int
    n_layers: int = 1

    @property
    def name(self) -> str:
        """Short identifier, e.g. ``h128_l10``."""
        return f"h{self.n_hidden}_l{self.n_latent}"


def parse_archs(spec: str) -> list[Arch]:
    """Parse an architecture list such as ``"128x10,512x128"``.

    Parameters
    ----------
    spec
        Comma-separated ``n_hiddenxn_latent`` pairs.

    Returns
    -------
    list of Arch
        The parsed architectures (``n_layers=1``).
    """
    archs = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            hidden, latent = item.split("x")
            archs.append(Arch(int(hidden), int(latent)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"bad architecture {item!r}; expected e.g. 128x10,512x128"
            ) from err
    if not archs:
        raise argparse.ArgumentTypeError("no architecture given")
    return archs


# --------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int | None:
    """Read a ``kB`` field (``VmHWM``, ``VmRSS``) from ``/proc/self/status``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB.

    Returns
    -------
    float
        ``VmHWM`` where available, else ``ru_maxrss`` (KiB on Linux).
    """
    hwm = _proc_status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return hwm / 1024.0


def current_rss_mib() -> float | None:
    """Current resident set size of this process in MiB (``None`` if unknown)."""
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024.0


# --------------------------------------------------------------------------- children


def _set_threads() -> None:
    """Pin torch to ``N_THREADS`` intra-op threads and one inter-op thread."""
    import torch

    torch.set_num_threads(N_THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an imported library
        pass


def child_prep(data: Path, out: Path) -> dict[str, Any]:
    """Select HVGs on raw counts and write the shared input ``.h5ad``.

    Parameters
    ----------
    data
        Raw-count input ``.h5ad`` (``X`` is int CSR counts).
    out
        Where to write the HVG-subset ``.h5ad`` (``X`` stays raw counts).

    Returns
    -------
    dict
        Shape of the input and of the output.
    """
    import anndata as ad
    import numpy as np
    import scanpy as sc

    adata = ad.read_h5ad(data)
    n_obs, n_vars = adata.shape
    sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=N_TOP_GENES, batch_key=BATCH_KEY
    )
    adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    x = adata.X
    values = x.data if hasattr(x, "data") else np.asarray(x)
    if not np.all(values == np.round(values)):
        raise ValueError("X is expected to hold raw integer counts")
    adata.write_h5ad(out)
    return {
        "n_cells": int(n_obs),
        "n_genes_input": int(n_vars),
        "n_genes_hvg": int(adata.n_vars),
        "scanpy": sc.__version__,
        "anndata": ad.__version__,
    }


def child_train(tool: str, prep: Path, arch: Arch, epochs: int, latent_out: Path) -> dict[str, Any]:
    """Train one model in this process and save its latent posterior mean.

    Parameters
    ----------
    tool
        ``"regvi"`` or ``"scvi"``.
    prep
        Shared preprocessed ``.h5ad``.
    arch
        Architecture to train.
    epochs
        Number of epochs (fixed, no early stopping).
    latent_out
        ``.npy`` path for the ``(n_cells, n_latent)`` latent mean.

    Returns
    -------
    dict
        Timing, memory, epochs run and library versions.
    """
    import anndata as ad
    import numpy as np
    import torch

    _set_threads()
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - seed the legacy global RNG the libraries may use
    adata = ad.read_h5ad(prep)
    rec: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}

    if tool == "scvi":
        import lightning
        import scvi

        scvi.settings.seed = SEED
        _set_threads()  # scvi's seed setter may touch torch settings; re-pin

        class EpochTimer(lightning.pytorch.Callback):
            """Wall time per epoch, training plus validation."""

            def __init__(self) -> None:
                self.times: list[float] = []
                self._t0 = 0.0

            def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
                self._t0 = time.perf_counter()

            def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
                # Lightning 2.x runs the validation loop before this hook.
                self.times.append(time.perf_counter() - self._t0)

        timer = EpochTimer()
        scvi.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
        model = scvi.model.SCVI(
            adata, n_hidden=arch.n_hidden, n_latent=arch.n_latent, n_layers=arch.n_layers
        )
        rss_before = current_rss_mib()
        t0 = time.perf_counter()
        model.train(
            max_epochs=epochs,
            batch_size=BATCH_SIZE,
            early_stopping=False,
            train_size=TRAIN_SIZE,
            check_val_every_n_epoch=1,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            callbacks=[timer],
        )
        train_s = time.perf_counter() - t0
        epochs_run = len(model.history["elbo_train"])
        n_val = len(model.history.get("elbo_validation", []))
        final = {
            k: float(model.history[k].iloc[-1, 0])
            for k in ("elbo_train", "elbo_validation", "reconstruction_loss_validation")
            if k in model.history
        }
        epoch_times = timer.times
        z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
        rec.update(
            {
                "scvi-tools": scvi.__version__,
                "lightning": lightning.__version__,
                "n_validation_epochs": n_val,
                "final": final,
            }
        )
    elif tool == "regvi":
        import regvi

        model = regvi.RegVI(
            adata,
            library_key=BATCH_KEY,
            n_hidden=arch.n_hidden,
            n_latent=arch.n_latent,
            n_layers=arch.n_layers,
        )
        rss_before = current_rss_mib()
        t0 = time.perf_counter()
        hist = model.train(max_epochs=epochs, batch_size=BATCH_SIZE, early_stopping=False)
        train_s = time.perf_counter() - t0
        epochs_run = len(hist)
        epoch_times = (
            [float(t) for t in hist["epoch_time_s"]] if "epoch_time_s" in hist.columns else []
        )
        final = {}
        if len(hist):
            last = hist.iloc[-1]
            for k, v in last.items():
                try:
                    final[str(k)] = float(v)
                except (TypeError, ValueError):
                    continue
        z = model.get_latent_representation(batch_size=LATENT_BATCH_SIZE)
        rec.update(
            {
                "regvi": getattr(regvi, "__version__", "unknown"),
                "history_columns": [str(c) for c in hist.columns],
                "final": final,
            }
        )
    else:
        raise ValueError(f"unknown tool {tool!r}")

    z = np.asarray(z, dtype=np.float32)
    if z.shape != (adata.n_obs, arch.n_latent):
        raise ValueError(f"latent has shape {z.shape}, expected {(adata.n_obs, arch.n_latent)}")
    if not np.isfinite(z).all():
        raise ValueError("latent contains non-finite values")
    np.save(latent_out, z)
    rec.update(
        {
            "train_s": train_s,
            "epochs_requested": epochs,
            "epochs_run": int(epochs_run),
            "s_per_epoch": train_s / max(int(epochs_run), 1),
            "epoch_times_s": epoch_times,
            "median_epoch_s": float(np.median(epoch_times)) if epoch_times else None,
            "min_epoch_s": float(np.min(epoch_times)) if epoch_times else None,
            "rss_before_train_mib": rss_before,
            "peak_rss_mib": peak_rss_mib(),
        }
    )
    return rec


def run_child_main(args: argparse.Namespace) -> int:
    """Entry point of a child process; writes its record as JSON to ``--record``."""
    if args.child == "prep":
        rec = child_prep(Path(args.data), Path(args.prep))
    else:
        arch = Arch(args.n_hidden, args.n_latent, args.n_layers)
        rec = child_train(args.child, Path(args.prep), arch, args.epochs, Path(args.latent_out))
    rec["python"] = sys.executable
    Path(args.record).write_text(json.dumps(rec, indent=2))
    return 0


# --------------------------------------------------------------------------- parent


def _has_module(python: str, module: str) -> bool:
    """Whether ``module`` is importable by interpreter ``python``."""
    res = subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, text=True, check=False
    )
    return res.returncode == 0


def _child_env() -> dict[str, str]:
    """Environment for child processes: thread caps, quiet logs."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(N_THREADS)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch(python: str, child_args: list[str], log: Path, record: Path) -> dict[str, Any]:
    """Run this script as a child under ``python`` and collect its JSON record.

    Parameters
    ----------
    python
        Interpreter to run the child with.
    child_args
        Arguments after the script path.
    log
        File receiving the child's stdout and stderr.
    record
        JSON file the child writes on success.

    Returns
    -------
    dict
        The child's record, or ``{"error": ..., "log_tail": ...}`` on failure.
    """
    cmd = [python, str(Path(__file__).resolve()), *child_args, "--record", str(record)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO_ROOT, check=False
        )
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not record.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-60:])
        return {"error": f"exit code {proc.returncode}", "log_tail": tail, "wall_s": wall}
    rec = json.loads(record.read_text())
    rec["wall_s"] = wall
    return rec


def run_scib(prep: Path, latents: dict[str, Path], n_jobs: int) -> dict[str, dict[str, float]]:
    """Score all latents with one scib-metrics ``Benchmarker``.

    Parameters
    ----------
    prep
        Shared preprocessed ``.h5ad`` (raw counts).
    latents
        Mapping embedding name → ``.npy`` path.
    n_jobs
        Jobs for the neighbour search.

    Returns
    -------
    dict
        Embedding name → {metric: value}, including ``Bio conservation``,
        ``Batch correction`` and ``Total`` (unscaled), and the "Unintegrated" PCA row.
    """
    import anndata as ad
    import numpy as np
    import scanpy as sc
    from scib_metrics.benchmark import Benchmarker

    adata = ad.read_h5ad(prep)
    # Benchmarker expects a normalised, non-integrated X for its PCA reference.
    adata.X = adata.X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    # Same call Benchmarker.prepare() makes when no pre-integrated key is given; stored
    # under "Unintegrated" as well so that the PCA reference gets its own row.
    sc.tl.pca(adata, svd_solver="arpack", mask_var=None)
    adata.obsm["Unintegrated"] = adata.obsm["X_pca"]
    keys = ["Unintegrated"]
    for name, path in latents.items():
        adata.obsm[name] = np.load(path)
        keys.append(name)
    bm = Benchmarker(
        adata,
        batch_key=BATCH_KEY,
        label_key=LABEL_KEY,
        embedding_obsm_keys=keys,
        pre_integrated_embedding_obsm_key="X_pca",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    df = df.loc[df.index != "Metric Type"]
    return {str(emb): {str(k): float(v) for k, v in row.items()} for emb, row in df.iterrows()}


def _versions(scvi_python: str) -> dict[str, str | None]:
    """Library versions in this interpreter (regvi side) and in the scvi venv."""
    from importlib import metadata

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": ver("torch"),
        "regvi": ver("regvi"),
        "scib-metrics": ver("scib-metrics"),
        "scanpy": ver("scanpy"),
        "anndata": ver("anndata"),
        "lightning": ver("lightning"),
    }
    code = (
        "import json; from importlib import metadata as m; "
        "print(json.dumps({p: m.version(p) for p in ('scvi-tools', 'torch', 'lightning')}))"
    )
    res = subprocess.run([scvi_python, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode == 0:
        other = json.loads(res.stdout.strip().splitlines()[-1])
        out["scvi-tools"] = other["scvi-tools"]
        out["torch_scvi_venv"] = other["torch"]
        out["lightning_scvi_venv"] = other["lightning"]
    return out


def _fmt(v: Any, spec: str) -> str:
    """Format a number, or a right-aligned ``-`` of the same width when missing."""
    width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> str:
    """Render the result rows as a fixed-width table (also returned as text)."""
    header = (
        f"{'tool':<13} {'arch':<10} {'s/epoch':>8} {'median':>7} {'min':>6} {'regvi/scvi':>10} "
        f"{'min r/s':>7} {'peak MiB':>9} "
        f"{'Bio':>6} {'Batch':>6} {'Total':>6}"
    )
    lines = [header, "-" * len(header)]
    # s/epoch = wall time of train() / epochs; median = median per-epoch time (train + val);
    # min = fastest epoch (robust to CPU contention from other processes);
    # regvi/scvi = ratio of s/epoch at equal architecture; min r/s = ratio of min.
    for r in rows:
        lines.append(
            f"{r['tool']:<13} {r['arch']:<10} {_fmt(r.get('s_per_epoch'), '8.2f')} "
            f"{_fmt(r.get('median_epoch_s'), '7.2f')} {_fmt(r.get('min_epoch_s'), '6.2f')} "
            f"{_fmt(r.get('ratio_regvi_over_scvi'), '10.2f')} "
            f"{_fmt(r.get('ratio_min_epoch_s_regvi_over_scvi'), '7.2f')} "
            f"{_fmt(r.get('peak_rss_mib'), '9.0f')} "
            f"{_fmt(r.get('bio'), '6.3f')} {_fmt(r.get('batch'), '6.3f')} {_fmt(r.get('total'), '6.3f')}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def run_parent(args: argparse.Namespace) -> int:
    """Run the full benchmark: preprocessing, all training children, scib, report."""
    data = Path(args.data).resolve()
    if not data.exists():
        sys.exit(f"data file not found: {data} (use --data)")
    scvi_python = str(args.scvi_python)
    if "scvi" in args.tools and not Path(scvi_python).exists():
        sys.exit(
            f"scvi-tools interpreter not found: {scvi_python}\n"
            f"create it with:  bash benchmarks/setup_scvi_env.sh  (or pass --scvi-python)"
        )
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="bench_scvi_"))
    print(f"[bench] workdir {workdir}", flush=True)
    prep = workdir / "prep.h5ad"

    # seurat_v3 HVGs need scikit-misc; use whichever interpreter has it.
    prep_python = sys.executable
    if not _has_module(prep_python, "skmisc"):
        if Path(scvi_python).exists() and _has_module(scvi_python, "skmisc"):
            print("[bench] scikit-misc missing here; preprocessing with the scvi venv", flush=True)
            prep_python = scvi_python
        else:
            sys.exit("flavor='seurat_v3' needs scikit-misc (pip install scikit-misc)")
    t0 = time.perf_counter()
    prep_rec = launch(
        prep_python,
        ["--child", "prep", "--data", str(data), "--prep", str(prep)],
        workdir / "prep.log",
        workdir / "prep.json",
    )
    if "error" in prep_rec:
        print(prep_rec["log_tail"], file=sys.stderr)
        sys.exit(f"preprocessing failed ({prep_rec['error']})")
    print(
        f"[bench] preprocessed {prep_rec['n_cells']} cells x {prep_rec['n_genes_hvg']} HVGs "
        f"in {time.perf_counter() - t0:.0f}s",
        flush=True,
    )

    pythons = {"regvi": sys.executable, "scvi": scvi_python}
    runs: list[dict[str, Any]] = []
    latents: dict[str, Path] = {}
    for arch in args.archs:
        for tool in args.tools:
            name = f"{tool}_{arch.name}"
            print(f"[bench] training {name} ({args.epochs} epochs) ...", flush=True)
            latent = workdir / f"{name}.npy"
            rec = launch(
                pythons[tool],
                [
                    "--child", tool, "--prep", str(prep), "--epochs", str(args.epochs),
                    "--n-hidden", str(arch.n_hidden), "--n-latent", str(arch.n_latent),
                    "--n-layers", str(arch.n_layers), "--latent-out", str(latent),
                ],
                workdir / f"{name}.log",
                workdir / f"{name}.json",
            )  # fmt: skip
            rec.update({"tool": tool, "arch": arch.name, "n_hidden": arch.n_hidden,
                        "n_latent": arch.n_latent, "n_layers": arch.n_layers, "name": name})  # fmt: skip
            if "error" in rec:
                print(f"[bench] {name} FAILED ({rec['error']}); log tail:\n{rec['log_tail']}",
                      file=sys.stderr, flush=True)  # fmt: skip
            else:
                latents[name] = latent
                print(
                    f"[bench] {name}: {rec['s_per_epoch']:.2f} s/epoch over {rec['epochs_run']} "
                    f"epochs, peak RSS {rec['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
            runs.append(rec)

    scib: dict[str, dict[str, float]] = {}
    scib_error = None
    if not args.skip_scib and latents:
        print(f"[bench] scib-metrics on {len(latents)} latents + Unintegrated ...", flush=True)
        t0 = time.perf_counter()
        try:
            scib = run_scib(prep, latents, args.n_jobs)
            print(f"[bench] scib done in {time.perf_counter() - t0:.0f}s", flush=True)
        except Exception as err:  # report and keep the timing results
            scib_error = f"{type(err).__name__}: {err}"
            print(f"[bench] scib FAILED: {scib_error}", file=sys.stderr, flush=True)

    by_key = {(r["tool"], r["arch"]): r for r in runs}
    rows: list[dict[str, Any]] = []
    for r in runs:
        row: dict[str, Any] = {"tool": r["tool"], "arch": r["arch"], "error": r.get("error")}
        row["s_per_epoch"] = r.get("s_per_epoch")
        row["median_epoch_s"] = r.get("median_epoch_s")
        row["min_epoch_s"] = r.get("min_epoch_s")
        row["peak_rss_mib"] = r.get("peak_rss_mib")
        if r["tool"] == "regvi":
            other = by_key.get(("scvi", r["arch"]), {})
            if row["s_per_epoch"] and other.get("s_per_epoch"):
                row["ratio_regvi_over_scvi"] = row["s_per_epoch"] / other["s_per_epoch"]
            for stat in ("median_epoch_s", "min_epoch_s"):
                if row[stat] and other.get(stat):
                    row[f"ratio_{stat}_regvi_over_scvi"] = row[stat] / other[stat]
        sc_row = scib.get(r["name"], {})
        row.update({"bio": sc_row.get("Bio conservation"), "batch": sc_row.get("Batch correction"),
                    "total": sc_row.get("Total")})  # fmt: skip
        rows.append(row)
    if "Unintegrated" in scib:
        u = scib["Unintegrated"]
        rows.append({"tool": "Unintegrated", "arch": "pca50", "bio": u.get("Bio conservation"),
                     "batch": u.get("Batch correction"), "total": u.get("Total")})  # fmt: skip
    print()
    table = print_table(rows)

    scib_settings = {
        "min_max_scale": False,
        "n_jobs": args.n_jobs,
        "unintegrated": "scanpy PCA (arpack, 50 PCs) of log1p(normalize_total 1e4) HVG X",
    }
    result = {
        "benchmark": "regvi vs scvi-tools SCVI",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": str(data),
        "preprocessing": {
            "hvg": {"flavor": "seurat_v3", "n_top_genes": N_TOP_GENES, "batch_key": BATCH_KEY},
            "X": "raw counts",
            **prep_rec,
        },
        "settings": {
            "epochs": args.epochs,
            "batch_size": BATCH_SIZE,
            "train_size": TRAIN_SIZE,
            "validation": "every epoch",
            "early_stopping": False,
            "torch_threads": N_THREADS,
            "batch_key": BATCH_KEY,
            "label_key": LABEL_KEY,
            "archs": [a.name for a in args.archs],
            "scib": None if args.skip_scib else scib_settings,
        },
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": _versions(scvi_python),
        "summary": rows,
        "runs": runs,
        "scib": scib,
        "scib_error": scib_error,
        "table": table,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\n[bench] wrote {out}")
    if not args.workdir and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [r["name"] for r in runs if "error" in r]
    return 1 if failed or scib_error else 0


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface (parent options and hidden child options)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="input .h5ad (raw counts)")
    p.add_argument("--epochs", type=int, default=20, help="fixed number of epochs (default 20)")
    p.add_argument("--archs", type=parse_archs, default=parse_archs("128x10,512x128"),
                   help="comma-separated n_hiddenxn_latent (default 128x10,512x128)")  # fmt: skip
    p.add_argument("--tools", default="regvi,scvi",
                   type=lambda s: [t for t in s.split(",") if t in TOOLS],
                   help="subset of regvi,scvi to run (default both)")  # fmt: skip
    p.add_argument("--scvi-python", default=str(DEFAULT_SCVI_PYTHON),
                   help="interpreter of the scvi-tools venv (benchmarks/setup_scvi_env.sh)")  # fmt: skip
    p.add_argument("--skip-scib", action="store_true", help="skip the scib-metrics evaluation")
    p.add_argument("--n-jobs", type=int, default=2, help="scib neighbour-search jobs")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    p.add_argument("--workdir", default=None, help="keep intermediate files here")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the temp workdir")
    # child-only options
    p.add_argument("--child", choices=("prep", *TOOLS), help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--latent-out", help=argparse.SUPPRESS)
    p.add_argument("--n-hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-latent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-layers", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the parent benchmark or to a child step."""
    args = build_parser().parse_args(argv)
    if args.child:
        return run_child_main(args)
    return run_parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
