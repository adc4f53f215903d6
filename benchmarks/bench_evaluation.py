"""Evaluation cost and sanity: regvi vs PCA on Kang 2018 PBMC, and a 100k-cell embedding.

1. Kang (13,999 cells, 4,000 HVGs, batch = ``condition``): train regvi (128/10, fixed epochs),
   then score ``X_pca`` and ``X_regvi`` with ``python -m evaluation`` (scib + neighbourhood
   metrics with the curated immune markers) and time the full per-trial evaluation.
2. The same latent scored by scib-metrics' default ``Benchmarker`` (its own PCA + pynndescent
   kNN, all cells) — the cost our shared-kNN path is compared with.
3. 100k simulated cells: ``evaluate()`` on its default 20k stratified subsample, and the default
   Benchmarker on the same 20k cells.

Prints a table and writes ``benchmarks/results/bench_evaluation.json``; CLI outputs (tables,
PNGs) go to ``benchmarks/results/evaluation_kang/``.

    .venv/bin/python benchmarks/bench_evaluation.py [--epochs 30] [--skip-100k]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kang2018_ifnb_pbmc.h5ad"
MARKERS = REPO.parent / "shared" / "data" / "markers" / "immune_marker_genes.csv"
OUT = REPO / "benchmarks" / "results"


def default_benchmarker(adata, emb_key: str, batch_key: str, label_key: str) -> float:
    """Seconds for scib-metrics' default Benchmarker (prepare + benchmark) on one embedding."""
    from scib_metrics.benchmark import Benchmarker

    t = time.perf_counter()
    bm = Benchmarker(
        adata,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=[emb_key],
        n_jobs=2,
        progress_bar=False,
    )
    bm.prepare()
    bm.benchmark()
    return time.perf_counter() - t


def kang(epochs: int, rows: list[dict]) -> None:
    import anndata as ad
    import scanpy as sc
    import torch

    import regvi
    from evaluation.__main__ import main as cli
    from evaluation.reference import log1p_normalise, unintegrated_pca

    torch.set_num_threads(2)
    adata = ad.read_h5ad(DATA)
    norm = adata.copy()
    norm.X = log1p_normalise(adata.X)
    sc.pp.highly_variable_genes(norm, n_top_genes=4000, flavor="seurat", batch_key="condition")
    adata = adata[:, norm.var["highly_variable"].to_numpy()].copy()
    model = regvi.RegVI(adata, library_key="condition", labels_key="cell_type")
    t = time.perf_counter()
    model.train(max_epochs=epochs, early_stopping=False, progress_bar=False)
    rows.append(
        {
            "case": "kang",
            "step": f"regvi train ({epochs} epochs)",
            "seconds": time.perf_counter() - t,
        }
    )
    model.get_latent_representation(store_key="X_regvi")
    adata.obsm["X_pca"] = unintegrated_pca(adata.X)
    path = OUT / "kang_eval_input.h5ad"
    adata.write_h5ad(path)
    out = OUT / "evaluation_kang"
    t = time.perf_counter()
    cli(
        [
            str(path),
            "--embedding",
            "X_pca",
            "X_regvi",
            "--library-key",
            "condition",
            "--label-key",
            "cell_type",
            "--markers",
            str(MARKERS),
            "--n-jobs",
            "2",
            "--out",
            str(out),
        ]
    )
    rows.append(
        {
            "case": "kang",
            "step": "CLI: 2 embeddings, scib + neighbourhood + plots",
            "seconds": time.perf_counter() - t,
        }
    )
    for key in ("X_pca", "X_regvi"):
        m = json.loads((out / key / "metrics.json").read_text())["metrics"]
        secs = sum(v for k, v in m.items() if k.startswith("eval_seconds_"))
        rows.append(
            {
                "case": "kang",
                "step": f"evaluate({key}) metrics only",
                "seconds": secs,
                "scib_total": m.get("scib_total"),
                "scib_batch": m.get("scib_batch"),
                "scib_bio": m.get("scib_bio"),
                "nc_composite_total": m.get("nc_composite_total"),
            }
        )
    rows.append(
        {
            "case": "kang",
            "step": "scib Benchmarker default (X_regvi, all cells)",
            "seconds": default_benchmarker(adata, "X_regvi", "condition", "cell_type"),
        }
    )
    path.unlink()


def large(rows: list[dict]) -> None:
    import regvi
    from evaluation.evaluate import evaluate
    from evaluation.reference import unintegrated_pca
    from evaluation.subsample import stratified_subsample

    adata = regvi.simulate(n_cells=100_000, n_genes=500, n_cell_types=15, n_libraries=10, seed=0)
    del adata.uns["truth"]
    t = time.perf_counter()
    adata.obsm["X_emb"] = unintegrated_pca(adata.X, n_comps=30)
    rows.append(
        {"case": "sim100k", "step": "PCA embedding (30 d)", "seconds": time.perf_counter() - t}
    )
    t = time.perf_counter()
    ev = evaluate(adata, "X_emb", "library", "cell_type", markers="data", n_jobs=2)
    rows.append(
        {
            "case": "sim100k",
            "step": "evaluate() on 20k subsample (scib + neighbourhood)",
            "seconds": time.perf_counter() - t,
            "scib_total": ev.metrics.get("scib_total"),
            "nc_composite_total": ev.metrics.get("nc_composite_total"),
        }
    )
    idx = stratified_subsample(adata.obs, ["cell_type", "library"], 20_000, 0)
    sub = adata[idx].copy()
    rows.append(
        {
            "case": "sim100k",
            "step": "scib Benchmarker default on the same 20k",
            "seconds": default_benchmarker(sub, "X_emb", "library", "cell_type"),
        }
    )


def main() -> None:
    """Run the benchmark."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--skip-100k", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    OUT.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    kang(args.epochs, rows)
    if not args.skip_100k:
        large(rows)
    print(f"\n{'case':<8} {'step':<58} {'seconds':>8}  scib_total  nc_total")
    for r in rows:
        st = r.get("scib_total")
        nc = r.get("nc_composite_total")
        print(
            f"{r['case']:<8} {r['step']:<58} {r['seconds']:8.1f}  "
            f"{'' if st is None else f'{st:.3f}':>10}  {'' if nc is None else f'{nc:.3f}':>8}"
        )
    from importlib.metadata import version

    (OUT / "bench_evaluation.json").write_text(
        json.dumps(
            {"rows": rows, "versions": {p: version(p) for p in ("scib-metrics", "regvi", "jax")}},
            indent=2,
            default=float,
        )
    )


if __name__ == "__main__":
    main()
