"""Batch size × learning-rate scaling: what large batches cost in model quality, and save in time.

On Kang 2018 PBMC (4,000 HVGs, batch ``condition``, labels ``cell_type``; the same input as
``bench_scvi.py``), ``regvi.RegVI`` trains for a fixed number of epochs at batch sizes 128 …
2048, each with the base lr (1e-3) and with ``scale_lr_with_batch_size=True`` (lr = 1e-3 ·
B / 128). Every run reports seconds per epoch (median), the final and best validation ELBO
(per cell, lower is better) and scib-metrics Bio / Batch / Total of the latent posterior
mean (one ``Benchmarker`` over all runs plus the PCA reference).

A fixed epoch budget is the fair comparison for the trade-off: a batch of 1024 takes 8× fewer
optimizer steps per epoch than 128, so without scaling the lr it converges more slowly per
epoch; with the linear rule it should recover most of the quality at a lower cost per epoch.

Usage
-----
::

    .venv/bin/python benchmarks/bench_batch_lr.py                  # ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_batch_lr.py --epochs 10 --batch-sizes 128,1024

Writes ``benchmarks/results/bench_batch_lr.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scvi as bs  # stdlib-only at module level
from _common import render_table

OUT = bs.REPO_ROOT / "benchmarks" / "results" / "bench_batch_lr.json"


def run_one(adata, batch_size: int, scaled: bool, args: argparse.Namespace, latent_path: Path):
    import numpy as np
    import torch

    import regvi

    torch.manual_seed(0)
    model = regvi.RegVI(
        adata,
        library_key=bs.BATCH_KEY,
        labels_key=bs.LABEL_KEY,
        n_hidden=args.n_hidden,
        n_latent=args.n_latent,
    )
    t0 = time.perf_counter()
    hist = model.train(
        max_epochs=args.epochs,
        batch_size=batch_size,
        lr=args.lr,
        scale_lr_with_batch_size=scaled,
        n_epochs_kl_warmup=args.kl_warmup,
        early_stopping=False,
        progress_bar=False,
        seed=0,
    )
    train_s = time.perf_counter() - t0
    z = model.get_latent_representation()
    np.save(latent_path, z)
    return {
        "batch_size": batch_size,
        "scale_lr": scaled,
        "lr": args.lr * batch_size / 128 if scaled else args.lr,
        "epochs": len(hist),
        "train_s": train_s,
        "median_epoch_s": float(hist["epoch_time_s"].median()),
        "final_validation_elbo": float(hist["validation_elbo"].iloc[-1]),
        "best_validation_elbo": float(hist["validation_elbo"].min()),
        "final_train_loss": float(hist["train_loss"].iloc[-1]),
        "finite": bool(np.isfinite(hist["validation_elbo"]).all()),
    }


def table(rows: list[dict]) -> str:
    base = next((r["median_epoch_s"] for r in rows if r["batch_size"] == 128), None)

    def scib(metric: str):
        return lambda r: r.get("scib", {}).get(metric, float("nan"))

    return render_table(
        rows,
        [
            ("batch", ">5", "batch_size"),
            ("lr", "8.4f", "lr"),
            ("scaled", ">6", lambda r: str(r["scale_lr"])),
            ("s/epoch", "8.2f", "median_epoch_s"),
            ("× vs 128", "8.2f", lambda r: base / r["median_epoch_s"] if base else float("nan")),
            ("val ELBO", "9.1f", "final_validation_elbo"),
            ("best ELBO", "9.1f", "best_validation_elbo"),
            ("Bio", "6.3f", scib("Bio conservation")),
            ("Batch", "6.3f", scib("Batch correction")),
            ("Total", "6.3f", scib("Total")),
        ],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(bs.DEFAULT_DATA))
    p.add_argument(
        "--batch-sizes", type=bs.parse_ints, default=bs.parse_ints("128,256,512,1024,2048")
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--kl-warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--n-latent", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--workdir", default=None, help="keep the prepared input here")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()

    import anndata as ad
    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        prep = work / "kang_prep.h5ad"
        if not prep.exists():
            print(f"preparing {prep}", flush=True)
            bs.child_prep("kang", Path(args.data), prep)
        adata = ad.read_h5ad(prep)
        runs, latents = [], {}
        grid = [(b, s) for b in args.batch_sizes for s in ((False,) if b == 128 else (False, True))]
        for b, scaled in grid:
            name = f"b{b}_{'scaled' if scaled else 'base'}"
            print(f"run {name}", flush=True)
            latents[name] = work / f"{name}.npy"
            rec = run_one(adata, b, scaled, args, latents[name])
            rec["name"] = name
            runs.append(rec)
            print(
                f"  {rec['median_epoch_s']:.2f} s/epoch, val ELBO {rec['final_validation_elbo']:.1f}",
                flush=True,
            )
        print("scib-metrics ...", flush=True)
        scib = bs.run_scib(prep, latents, args.n_jobs)
        for r in runs:
            r["scib"] = scib.get(r["name"], {})
    text = table(runs)
    print(text)
    unintegrated = scib.get("Unintegrated", {})
    print(f"PCA (unintegrated) Total {unintegrated.get('Total', float('nan')):.3f}")
    result = {
        "benchmark": "batch size x lr scaling, regvi on Kang 4k HVGs",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"platform": platform.platform(), "threads": args.threads},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "runs": runs,
        "unintegrated": unintegrated,
        "table": text,
        "total_wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
