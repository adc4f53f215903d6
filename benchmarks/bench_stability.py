"""Seed stability at high capacity: does any seed of a default 512/128 model collapse?

Trains ``regvi.RegVI`` with default settings (only ``library_key`` set, ``preset`` sizes) on
each shared real dataset for several seeds, and scores every latent with the evaluation
package's scib metrics (scib-metrics, same cells for every run). Prints one row per run, the
mean ± sd and the worst seed per dataset × setting, and writes JSON with every run's training
curve summary (KL_z, active dimensions, library KL, theta, best epoch), so a collapsed run can
be told apart by its curves.

Usage
-----
::

    .venv/bin/python benchmarks/bench_stability.py                       # ~1 h on 2 cores
    .venv/bin/python benchmarks/bench_stability.py --datasets sim_strong  # simulated stress test
    .venv/bin/python benchmarks/bench_stability.py --datasets mop --seeds 0,1 \\
        --set default --set '{"name": "restore", "train": {"restore_best": true}}'

``--set`` adds a setting to compare: a JSON object with ``name`` and optional ``model`` /
``train`` keyword arguments (``default`` is the plain defaults; a model option overrides the
``--preset`` size of the same name; ``"$library"``, as a value or a list item, stands for the
dataset's library key, e.g. ``{"nn_conditioning_covariate_keys": ["$library"]}``). Writes
``benchmarks/results/bench_stability.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import REPO_ROOT, regvi_model_kwargs  # next to this file

REPO = REPO_ROOT
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "results" / "bench_stability.json"

#: dataset → (file, library key, label key)
DATASETS = {
    "mop": ("mop_snareseq2_rna.h5ad", "batch", "cell_type"),
    "kang_ctrl": ("kang2018_muscat_ctrl.h5ad", "donor", "cell_type"),
    "kang_sample": ("kang2018_ifnb_pbmc.h5ad", "sample", "cell_type"),
}
#: ``regvi.simulate`` arguments of ``sim_strong`` (see :func:`load`)
SIM_STRONG = {
    "n_cells": 12_000,
    "n_genes": 1_500,
    "n_cell_types": 15,
    "n_libraries": 12,
    "depth_range": (300.0, 6000.0),
    "n_technologies": 3,
    "feature_scaling_sd": 1.0,
    "programme_strength": 1.5,
    "seed": 7,
}


def load(name: str, n_top_genes: int = 2000):
    """The dataset with raw counts; Kang PBMC reduced to its ``n_top_genes`` HVGs.

    ``sim_strong`` is simulated: 12,000 cells, 15 types, 12 libraries of 3 technologies with a
    strong per-gene technology bias (log-normal sd 1) and 20× depth range — a stress test for
    strong technical batches (library key ``library``, labels ``cell_type``).
    """
    import anndata as ad
    import scanpy as sc

    if name == "sim_strong":
        import regvi

        adata = regvi.simulate(**SIM_STRONG)
        adata.obs["library"] = adata.obs["library"].astype(str).astype("category")
        return adata, "library", "cell_type"
    file, key, label = DATASETS[name]
    adata = ad.read_h5ad(SHARED / file)
    if adata.n_vars > 4000:
        norm = adata.copy()
        sc.pp.normalize_total(norm, target_sum=1e4)
        sc.pp.log1p(norm)
        sc.pp.highly_variable_genes(norm, n_top_genes=n_top_genes, batch_key=key)
        adata = adata[:, norm.var["highly_variable"].to_numpy()].copy()
    adata.obs[key] = adata.obs[key].astype(str).astype("category")
    return adata, key, label


def run_one(adata, key: str, label: str, setting: dict[str, Any], seed: int, args) -> dict:
    import regvi
    from evaluation.evaluate import evaluate

    # the preset's sizes, overridden by the setting's model options ("$library" resolved)
    kwargs = regvi_model_kwargs(setting, key, preset=setting.get("preset", args.preset))
    model = regvi.RegVI(adata, library_key=key, **kwargs)
    t = time.perf_counter()
    train = {"max_epochs": args.max_epochs, "progress_bar": False, "seed": seed}
    history = model.train(**{**train, **setting.get("train", {})})
    wall = time.perf_counter() - t
    adata.obsm["X_regvi"] = model.get_latent_representation()
    ev = evaluate(
        adata,
        "X_regvi",
        library_key=key,
        label_key=label,
        neighbourhood=False,
        n_subsample=args.n_subsample,
        seed=0,
        reference_cache=REPO / "benchmarks" / "results" / ".cache",
    )
    es = model.early_stopping
    last = history.iloc[-1]
    curve = history[
        [
            "epoch",
            "kl_weight",
            "validation_elbo",
            "validation_kl_z",
            "validation_n_active_dims",
            "validation_kl_library",
            "validation_theta_mean",
            "validation_reconstruction",
        ]
    ]
    return {
        "seed": seed,
        "epochs": len(history),
        "best_epoch": int(es.best_epoch) if es is not None else None,
        "train_s": round(wall, 1),
        "final_active_dims": float(last["validation_n_active_dims"]),
        "final_kl_z": float(last["validation_kl_z"]),
        "final_validation_elbo": float(last["validation_elbo"]),
        "scib_bio": ev.metrics.get("scib_bio"),
        "scib_batch": ev.metrics.get("scib_batch"),
        "scib_total": ev.metrics.get("scib_total"),
        "curve_every_5": curve.iloc[::5].round(4).to_dict(orient="list"),
    }


def summarise(rows: list[dict]) -> dict[str, Any]:
    totals = np.array([r["scib_total"] for r in rows], dtype=float)
    worst = rows[int(np.nanargmin(totals))]
    return {
        "n": len(rows),
        "scib_total_mean": float(np.nanmean(totals)),
        "scib_total_sd": float(np.nanstd(totals, ddof=1)) if len(rows) > 1 else 0.0,
        "scib_bio_mean": float(np.nanmean([r["scib_bio"] for r in rows])),
        "scib_batch_mean": float(np.nanmean([r["scib_batch"] for r in rows])),
        "worst_seed": worst["seed"],
        "worst_scib_total": worst["scib_total"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mop,kang_ctrl")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--preset", default="large")
    p.add_argument("--max-epochs", type=int, default=400)
    p.add_argument("--n-subsample", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=None, help="'default' or a JSON setting")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    settings = [
        {"name": "default"} if s == "default" else json.loads(s) for s in (args.set or ["default"])
    ]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "preset": args.preset,
        "runs": {},
    }
    print(
        f"{'dataset':<12} {'setting':<14} {'seed':>4} {'ep':>4} {'best':>4} {'act':>4} "
        f"{'KLz':>7} {'bio':>6} {'batch':>6} {'total':>6} {'s':>6}",
        flush=True,
    )
    for name in args.datasets.split(","):
        adata, key, label = load(name)
        for setting in settings:
            rows = []
            for seed in seeds:
                r = run_one(adata, key, label, setting, seed, args)
                rows.append(r)
                print(
                    f"{name:<12} {setting['name']:<14} {seed:>4} {r['epochs']:>4} "
                    f"{r['best_epoch'] or -1:>4} {r['final_active_dims']:>4.0f} "
                    f"{r['final_kl_z']:>7.2f} {r['scib_bio']:>6.3f} {r['scib_batch']:>6.3f} "
                    f"{r['scib_total']:>6.3f} {r['train_s']:>6.0f}",
                    flush=True,
                )
                results["runs"].setdefault(f"{name}/{setting['name']}", {"setting": setting})
                results["runs"][f"{name}/{setting['name']}"]["rows"] = rows
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
            s = summarise(rows)
            results["runs"][f"{name}/{setting['name']}"]["summary"] = s
            print(
                f"{name:<12} {setting['name']:<14} mean total {s['scib_total_mean']:.3f} ± "
                f"{s['scib_total_sd']:.3f} (bio {s['scib_bio_mean']:.3f}, batch "
                f"{s['scib_batch_mean']:.3f}); worst seed {s['worst_seed']}: "
                f"{s['worst_scib_total']:.3f}",
                flush=True,
            )
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
