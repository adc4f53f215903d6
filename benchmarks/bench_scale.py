"""Scale benchmark: ``regvi.RegVI`` on up to 1M simulated cells × 2k genes, memory-mapped.

For every size the counts are simulated straight to a memory-mapped CSR directory
(:func:`regvi.simulate.simulate_to_mmap`, chunk by chunk; cached under ``--workdir``), then
every (size, batch size) run trains in its own subprocess with ``torch.set_num_threads``
(default 2):

* setup: ``open_mmap_anndata`` + ``RegVI(adata, library_key="library")`` (validation, library
  prior, data-dependent init) + the minibatch view (per-cell log-factorials); all setup passes
  read the matrix in row chunks;
* one training epoch (``validation_fraction`` 0.01, no early stopping; seconds per epoch =
  the epoch's ``epoch_time_s``, training + validation);
* streaming ``get_latent_representation`` over all cells (batches of 1024);
* peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` of the child) and, per stage, VmRSS split in
  anonymous and file-backed pages (``/proc/self/status``: the memmapped matrix shows as
  ``RssFile``), next to the CSR size on disk (``data`` + ``indices`` + ``indptr``).

The goal is peak RSS ≤ 2 × CSR size at 1M cells; a linear fit of s/epoch against the number of
cells (R², seconds per 100k cells) checks that an epoch scales linearly.

Usage
-----
::

    .venv/bin/python benchmarks/bench_scale.py            # 100k, 300k, 1M; batch 1024 and 128
    .venv/bin/python benchmarks/bench_scale.py --sizes 100000 --batch-sizes 1024

Writes ``benchmarks/results/bench_scale.json`` (after every run, so partial results survive).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import parse_columns, render_table  # next to this file

ROOT = Path(__file__).resolve().parents[1]
#: Simulation settings: ~10% non-zeros over 2k genes (~900 counts per cell), like a 2k-HVG
#: subset of 10x data (simulate's defaults give ~33% at 2k genes).
SIM = {
    "depth_range": (400.0, 1600.0),
    "programme_strength": 5.0,
    "theta": (0.5, 5.0),
    "n_cell_types": 10,
    "n_libraries": 8,
    "seed": 0,
}


def _status() -> dict[str, float]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process in MiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024
    return out


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def data_dir(workdir: Path, n_cells: int, n_genes: int) -> Path:
    return workdir / f"sim_{n_cells}x{n_genes}_seed{SIM['seed']}"


# ---------------------------------------------------------------------------------- children
def child_generate(args: argparse.Namespace) -> dict:
    from regvi.data.mmap import csr_nbytes, read_mmap_meta
    from regvi.simulate import simulate_to_mmap

    logging.basicConfig(level=logging.INFO, format="  [gen] %(message)s", stream=sys.stderr)
    out = Path(args.dir)
    t0 = time.perf_counter()
    simulate_to_mmap(
        out,
        n_cells=args.n_cells,
        n_genes=args.n_genes,
        chunk_cells=args.chunk_cells,
        overwrite=True,
        **SIM,
    )
    meta = read_mmap_meta(out)
    rec = {
        "n_cells": args.n_cells,
        "n_genes": args.n_genes,
        "sim": {k: list(v) if isinstance(v, tuple) else v for k, v in SIM.items()},
        "chunk_cells": args.chunk_cells,
        "generate_s": time.perf_counter() - t0,
        "nnz": meta["nnz"],
        "density": meta["nnz"] / (args.n_cells * args.n_genes),
        "csr_bytes": csr_nbytes(out),
        "generate_peak_rss_mib": _maxrss_mib(),
    }
    (out / "bench_params.json").write_text(json.dumps(rec, indent=1))
    return rec


def child_run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import regvi
    from regvi.data.mmap import csr_nbytes, is_mmap_backed, open_mmap_anndata

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    stages = {"imports": _status()}
    t0 = time.perf_counter()
    adata = open_mmap_anndata(args.dir)
    stages["open"] = _status()
    model = regvi.RegVI(adata, library_key="library")
    model._dataset()  # per-cell constants (log-factorials), built once before training
    setup_s = time.perf_counter() - t0
    assert is_mmap_backed(model._X)
    stages["setup"] = _status()
    t0 = time.perf_counter()
    hist = model.train(
        max_epochs=1,
        batch_size=args.batch_size,
        validation_fraction=0.01,
        early_stopping=False,
        progress_bar=False,
        seed=0,
    )
    train_s = time.perf_counter() - t0
    stages["train"] = _status()
    t0 = time.perf_counter()
    z = model.get_latent_representation(batch_size=1024)
    inference_s = time.perf_counter() - t0
    stages["latent"] = _status()
    assert z.shape == (adata.n_obs, model.config.n_latent) and np.isfinite(z).all()
    csr = csr_nbytes(args.dir)
    peak = _maxrss_mib()
    return {
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "setup_s": setup_s,
        "epoch_s": float(hist["epoch_time_s"].iloc[-1]),
        "train_call_s": train_s,
        "steps_per_epoch": int(np.ceil(len(model.train_indices) / args.batch_size)),
        "inference_s": inference_s,
        "peak_rss_mib": peak,
        "csr_mib": csr / 2**20,
        "ratio": peak * 2**20 / csr,
        "train_loss": float(hist["train_loss"].iloc[-1]),
        "stages_mib": stages,
    }


# ---------------------------------------------------------------------------------- parent
def _run_child(argv: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed with exit code {proc.returncode}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["child_wall_s"] = time.perf_counter() - t0
    return rec


def ensure_data(workdir: Path, n_cells: int, n_genes: int, chunk_cells: int) -> dict:
    d = data_dir(workdir, n_cells, n_genes)
    params = d / "bench_params.json"
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in SIM.items()}
    if params.exists() and (d / "truth.npz").exists():
        rec = json.loads(params.read_text())
        if rec.get("sim") == want and rec.get("n_cells") == n_cells:
            print(f"  cached {d} ({rec['csr_bytes'] / 2**20:.0f} MiB)", flush=True)
            rec["cached"] = True
            return rec
    print(f"  generating {n_cells} × {n_genes} → {d}", flush=True)
    d.mkdir(parents=True, exist_ok=True)
    params.unlink(missing_ok=True)
    argv = ["--child", "generate", "--dir", str(d), "--n-cells", str(n_cells)]
    argv += ["--n-genes", str(n_genes), "--chunk-cells", str(chunk_cells)]
    rec = _run_child(argv, timeout=7200)
    rec["cached"] = False
    print(
        f"  generated in {rec['generate_s']:.0f} s: density {rec['density']:.3f}, "
        f"CSR {rec['csr_bytes'] / 2**20:.0f} MiB",
        flush=True,
    )
    return rec


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    import numpy as np

    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    per_cell = y / x
    return {
        "slope_s_per_100k_cells": float(slope * 1e5),
        "intercept_s": float(intercept),
        "r2": r2,
        "s_per_100k_cells_each": [float(v * 1e5) for v in per_cell],
    }


def table(runs: list[dict]) -> str:
    return render_table(
        runs,
        parse_columns(
            """
                cells         >9     n_cells
                batch         >5     batch_size
                setup s       8.1f   setup_s
                s/epoch       8.1f   epoch_s
                infer s       8.1f   inference_s
                peak RSS MiB  12.0f  peak_rss_mib
                CSR MiB       8.0f   csr_mib
                ratio         6.2f   ratio
                """
        ),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", choices=["generate", "run"])
    p.add_argument("--dir")
    p.add_argument("--n-cells", type=int)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--n-genes", type=int, default=2000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-cells", type=int, default=25_000)
    p.add_argument("--workdir", default="/tmp/regvi_scale")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_scale.json"))
    p.add_argument("--timeout", type=float, default=5400, help="seconds per training child")
    args = p.parse_args()
    if args.child == "generate":
        print(json.dumps(child_generate(args)), flush=True)
        return
    if args.child == "run":
        print(json.dumps(child_run(args)), flush=True)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "threads": args.threads,
        "n_genes": args.n_genes,
        "sim": {k: list(v) if isinstance(v, tuple) else v for k, v in SIM.items()},
        "data": {},
        "runs": [],
        "fits": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    for n in args.sizes:
        result["data"][str(n)] = ensure_data(workdir, n, args.n_genes, args.chunk_cells)
        save()
    for bs in args.batch_sizes:
        for n in args.sizes:
            print(f"run: {n} cells, batch {bs}", flush=True)
            argv = ["--child", "run", "--dir", str(data_dir(workdir, n, args.n_genes))]
            argv += ["--batch-size", str(bs), "--threads", str(args.threads)]
            try:
                rec = _run_child(argv, timeout=args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"  FAILED: {err}", flush=True)
                result["runs"].append({"n_cells": n, "batch_size": bs, "error": str(err)})
                save()
                continue
            print(
                f"  setup {rec['setup_s']:.1f} s, epoch {rec['epoch_s']:.1f} s, "
                f"latent {rec['inference_s']:.1f} s, peak RSS {rec['peak_rss_mib']:.0f} MiB "
                f"= {rec['ratio']:.2f} × CSR",
                flush=True,
            )
            result["runs"].append(rec)
            save()
        ok = [r for r in result["runs"] if r.get("batch_size") == bs and "error" not in r]
        fit = linear_fit([r["n_cells"] for r in ok], [r["epoch_s"] for r in ok])
        if fit is not None:
            result["fits"][str(bs)] = fit
        save()
    ok = [r for r in result["runs"] if "error" not in r]
    print()
    print(table(ok))
    for bs, fit in result["fits"].items():
        print(
            f"batch {bs}: s/epoch ≈ {fit['slope_s_per_100k_cells']:.2f} s per 100k cells "
            f"+ {fit['intercept_s']:.2f} s (R² = {fit['r2']:.4f})"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
