"""Worst seeds at 512/128: over-fitting after the KL warm-up, or the scib KMeans metrics?

Two questions about the seed-to-seed spread of ``preset("large")`` (issues #13, #14):

1. ``train``: does training past the best validation ELBO hurt integration? One run per seed
   with default settings gives BOTH latents: the weights of the best validation-ELBO epoch
   (``restore_best=True``) and of the last epoch (what ``restore_best=False``, the default,
   returns). They are cached next to bench_quality's latents as ``<stem>_best_s<seed>`` and
   ``<stem>_final_s<seed>`` (``stem`` = ``regvi_large`` or ``regvi``) with the run's curves
   (``curves_<size>_s<seed>.csv``: KL_z, active dimensions, library KL, theta per epoch), so
   ``bench_quality.py --score-only`` scores them like any other latent.
2. ``kmeans``: how much of a latent's scib Bio score depends on the KMeans start? scib-metrics'
   ``KMeans NMI`` / ``ARI`` run one KMeans with ``n_clusters`` = number of labels; this refits
   sklearn KMeans on the same latent from ``--starts`` seeds (one start each) and with 20 starts
   (best inertia), and prints the ARI spread per latent.

Usage
-----
::

    .venv/bin/python benchmarks/bench_best_epoch.py train --dataset kang_ctrl --seeds 3,4,5
    .venv/bin/python benchmarks/bench_best_epoch.py train --dataset kang_ctrl --seeds 0,1 \\
        --size default
    .venv/bin/python benchmarks/bench_best_epoch.py kmeans --dataset kang_ctrl \\
        --latents regvi_large_s0,regvi_large_s1,regvi_large_best_s5,regvi_large_final_s5

Writes ``benchmarks/results/bench_best_epoch.json`` (one entry per dataset and command).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import numpy as np
from _common import REPO_ROOT  # next to this file
from bench_quality import CACHE, DATASETS, prepared

OUT = REPO_ROOT / "benchmarks" / "results" / "bench_best_epoch.json"


def train(dataset: str, seeds: list[int], size: str, threads: int) -> list[dict[str, Any]]:
    """Train one run per seed; cache the best-epoch and last-epoch latents and the curves."""
    import anndata as ad
    import lightning.pytorch as pl
    import torch

    import regvi

    class LastState(pl.Callback):
        state: dict[str, Any] | None = None

        def on_train_epoch_end(self, trainer: pl.Trainer, plan: Any) -> None:
            self.state = copy.deepcopy(plan.module.state_dict())

    torch.set_num_threads(threads)
    _, key, _ = DATASETS[dataset]
    stem = "regvi_large" if size == "large" else "regvi"
    rows = []
    for seed in seeds:
        adata = ad.read_h5ad(prepared(dataset))
        sizes = regvi.RegVI.preset("large") if size == "large" else {}
        model = regvi.RegVI(adata, library_key=key, **sizes)
        last = LastState()
        t0 = time.perf_counter()
        model.train(progress_bar=False, seed=seed, restore_best=True, callbacks=[last])
        wall = time.perf_counter() - t0
        z_best = model.get_latent_representation()
        model.module.load_state_dict(last.state)
        z_last = model.get_latent_representation()
        h = model.history
        h.to_csv(CACHE / dataset / f"curves_{size}_s{seed}.csv", index=False)
        best = int(h.loc[h["validation_elbo"].idxmin(), "epoch"])
        row = {"seed": seed, "epochs": len(h), "best_epoch": best, "train_s": round(wall, 1)}
        for tag, z in (("best", z_best), ("final", z_last)):
            name = f"{stem}_{tag}_s{seed}"
            np.save(CACHE / dataset / f"{name}.npy", z.astype(np.float32))
            setting = {"name": f"{stem}_{tag}", "preset": size, "paired": "best vs last epoch"}
            (CACHE / dataset / f"{name}.json").write_text(json.dumps({**row, "setting": setting}))
        print(f"{dataset} seed {seed}: {len(h)} epochs, best {best}, {wall:.0f} s", flush=True)
        rows.append(row)
    return rows


def kmeans_spread(dataset: str, latents: list[str], starts: int) -> list[dict[str, Any]]:
    """ARI / NMI of KMeans(k = number of labels) on each latent, per start and with 20 starts."""
    import anndata as ad
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    _, _, label = DATASETS[dataset]
    y = ad.read_h5ad(prepared(dataset)).obs[label].astype(str).to_numpy()
    k = len(set(y))
    rows = []
    print(f"{'latent':26s} {'ARI per start':34s} {'ARI 20 starts':>14s} {'NMI 20 starts':>14s}")
    for name in latents:
        z = np.load(CACHE / dataset / f"{name}.npy")
        single = [
            adjusted_rand_score(y, KMeans(k, n_init=1, random_state=s).fit(z).labels_)
            for s in range(starts)
        ]
        best = KMeans(k, n_init=20, random_state=0).fit(z).labels_
        row = {
            "latent": name,
            "ari_single_starts": [round(a, 3) for a in single],
            "ari_20_starts": round(adjusted_rand_score(y, best), 3),
            "nmi_20_starts": round(normalized_mutual_info_score(y, best), 3),
        }
        rows.append(row)
        spread = f"{min(single):.2f}-{max(single):.2f}"
        print(f"{name:26s} {spread:34s} {row['ari_20_starts']:14.3f} {row['nmi_20_starts']:14.3f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("train", "kmeans"))
    p.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", choices=("large", "default"), default="large")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latents", default="", help="cached latent names (kmeans)")
    p.add_argument("--starts", type=int, default=5, help="single-start KMeans fits (kmeans)")
    args = p.parse_args()
    if args.command == "train":
        seeds = [int(s) for s in args.seeds.split(",")]
        result: Any = train(args.dataset, seeds, args.size, args.threads)
    else:
        if not args.latents:
            p.error("kmeans needs --latents")
        result = kmeans_spread(args.dataset, args.latents.split(","), args.starts)
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {}
    doc.setdefault(args.dataset, {})[f"{args.command}_{args.size}"] = result
    OUT.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
