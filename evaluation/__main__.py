"""CLI: ``python -m evaluation DATA.h5ad --embedding X_regvi [X_pca ...] --library-key K ...``.

Scores each embedding on the same subsample, prints a table, and writes per-embedding folders
(metrics.json/csv, per_cell.csv, summaries, PNGs) plus, for several embeddings, an scib table
across them (min–max scaled, PNG + CSV).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from evaluation.scib import KMEANS_STARTS


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the CLI."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", type=Path, help=".h5ad with raw counts and the embedding(s) in obsm")
    p.add_argument(
        "--embedding",
        nargs="+",
        required=True,
        help="obsm key(s); 'X_pca' is computed (log1p-normalised PCA) when absent",
    )
    p.add_argument("--library-key", required=True)
    p.add_argument("--label-key", default=None)
    p.add_argument("--dataset-key", default=None)
    p.add_argument("--technical-keys", nargs="*", default=[])
    p.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    p.add_argument("--markers", default=None, help="curated marker CSV, or 'data' (from labels)")
    p.add_argument("--n-subsample", type=int, default=20_000, help="0 = all cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scib", action="store_true")
    p.add_argument("--no-neighbourhood", action="store_true")
    p.add_argument("--no-umap", action="store_true")
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument(
        "--kmeans-starts",
        type=int,
        default=KMEANS_STARTS,
        help="KMeans starts averaged by scib_bio_stable / scib_total_stable "
        f"(default {KMEANS_STARTS})",
    )
    p.add_argument("--out", type=Path, default=Path("evaluation_results"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.kmeans_starts < 1:
        print(
            f"error: --kmeans-starts {args.kmeans_starts}: expected an integer >= 1",
            file=sys.stderr,
        )
        return 2
    if not args.data.is_file():
        print(f"error: data file {args.data} does not exist", file=sys.stderr)
        return 2
    import anndata as ad

    from evaluation.evaluate import check_inputs, evaluate, write_outputs
    from evaluation.reference import unintegrated_pca

    try:
        adata = ad.read_h5ad(args.data)
    except Exception as err:  # truncated / not an h5ad
        print(f"error: cannot read {args.data} as h5ad: {err}", file=sys.stderr)
        return 2
    # the obs keys and marker options that check_inputs and evaluate share
    inputs = {
        "library_key": args.library_key,
        "label_key": args.label_key,
        "dataset_key": args.dataset_key,
        "technical_keys": args.technical_keys,
        "markers": args.markers,
        "neighbourhood": not args.no_neighbourhood,
    }
    try:
        for key in args.embedding:
            if key == "X_pca" and key not in adata.obsm:
                X = adata.X if args.layer is None else adata.layers[args.layer]
                adata.obsm["X_pca"] = unintegrated_pca(X, seed=args.seed)
            check_inputs(adata, key, **inputs)
    except (KeyError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {}
    keys = [
        k for k in (args.label_key, args.library_key, args.dataset_key, *args.technical_keys) if k
    ]
    for key in args.embedding:
        print(f"evaluating {key} ...", flush=True)
        ev = evaluate(
            adata,
            key,
            layer=args.layer,
            n_subsample=args.n_subsample or None,
            seed=args.seed,
            scib=not args.no_scib,
            reference_cache=args.out / ".cache",
            n_jobs=args.n_jobs,
            kmeans_starts=args.kmeans_starts,
            **inputs,
        )
        write_outputs(ev, adata.obs, args.out / key, keys, umap=not args.no_umap)
        results[key] = ev.metrics
    table = pd.DataFrame(results)
    shown = table.loc[[i for i in table.index if not i.startswith("eval_seconds")]]
    with pd.option_context("display.max_rows", 200, "display.float_format", "{:.3f}".format):
        print(shown.to_string())
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "metrics_all.csv", index_label="metric")
    if len(results) > 1 and any(k.startswith("scib_") for k in table.index):
        from evaluation.plots import plot_scib_table
        from evaluation.scib import compare_runs

        scaled = compare_runs(results, min_max_scale=True)
        scaled.to_csv(args.out / "scib_table_scaled.csv")
        compare_runs(results, min_max_scale=False).to_csv(args.out / "scib_table_raw.csv")
        plot_scib_table(scaled, args.out / "scib_table.png")
    print(f"\nwrote results to {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
