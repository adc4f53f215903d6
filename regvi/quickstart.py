"""Train regvi on the bundled Kang 2018 PBMC subset and write model, curves and UMAPs.

Usage::

    python -m regvi.quickstart [--out regvi_runs/quickstart_model] [--max-epochs 100] [--preset default]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import regvi
from evaluation.plots import plot_embedding, umap_coords
from regvi.plotting import plot_training_curves


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(
        description="regvi quickstart on bundled real data (Kang 2018 PBMC)"
    )
    p.add_argument("--out", type=Path, default=Path("regvi_runs/quickstart_model"))
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--preset", choices=list(regvi.RegVI.PRESETS), default="default")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for small models)"
    )
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} exists and is not empty; choose another folder")
    torch.set_num_threads(args.threads)
    adata = regvi.datasets.kang_pbmc_small()
    print(
        f"data: bundled Kang 2018 PBMC subset, {adata.n_obs} cells x {adata.n_vars} genes, "
        f"library_key='condition'"
    )
    model = regvi.RegVI(
        adata, library_key="condition", labels_key="cell_type", **regvi.RegVI.preset(args.preset)
    )
    t0 = time.perf_counter()
    history = model.train(max_epochs=args.max_epochs, batch_size=128)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model")
    z = model.get_latent_representation(store_key="X_regvi")
    plot_training_curves(history, args.out / "training_curves.png")
    plot_embedding(
        umap_coords(z),
        adata.obs,
        ["cell_type", "condition"],
        args.out / "umap.png",
        title="regvi latent",
    )
    summary = {
        "epochs": len(history),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / max(len(history), 1), 3),
        "final_validation_elbo": float(history["validation_elbo"].iloc[-1]),
        "n_active_dims": int(history["validation_n_active_dims"].iloc[-1]),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nresults in {args.out.resolve()}:")
    for name in ("model/", "training_curves.png", "umap.png", "summary.json"):
        print(f"  {args.out / name}")
    print(f"load the model with: regvi.load('{args.out / 'model'}')")


if __name__ == "__main__":
    main()
