"""Map a query AnnData onto a trained reference model, transfer labels, log it in MLflow.

``python -m regvi.map --model MODEL --query new.h5ad --out mapped.h5ad [--reference atlas.h5ad]``

Steps: load the reference model (a directory, ``runs:/ID/model`` or ``models:/NAME@alias``);
build the query model with :meth:`regvi.RegVI.load_query_data` (new categories get their own
technical terms, the reference's weights stay as they are); train only those new terms (a few
epochs, early stopping); encode the query cells. With ``--reference`` (the atlas AnnData, with
labels in ``--labels-key``) the reference cells are encoded too and labels are transferred by a
kNN vote (:func:`regvi.map.labels.transfer_labels`); without it there is no label transfer,
only the latent. The output is the query AnnData with ``obsm["X_regvi"]`` (and
``obs["<key>_transferred"]``, ``obs["<key>_confidence"]``), written atomically.

Every input is checked before any training and before anything is written; a refused input
exits with status 2 and a message naming the argument, file or key.

Exit status: 0 done; 2 refused (bad input, nothing written); 1 failed while mapping.

This module is the command line (:func:`build_parser`, :func:`main`); the work is in
:mod:`regvi.map.mapping` (:func:`map_query`), :mod:`regvi.map.inputs` (argument and file
checks), :mod:`regvi.map.plan` (what is checked before training), :mod:`regvi.map.tracking`
(MLflow) and :mod:`regvi.map.plots` (the UMAP). Their public names are importable from here too.
"""

from __future__ import annotations

import argparse
import logging
import os  # noqa: F401  (regvi.map.cli.os stays: callers patch cli.os.access)
import sys
from collections.abc import Sequence
from typing import Any

from regvi.map.inputs import (
    UNKNOWN,
    MappingInputError,
    parse_fine_tune,
    write_h5ad_atomic,
)
from regvi.map.mapping import (
    DEFAULT_EPOCHS,
    DEFAULT_PATIENCE,
    LATENT_KEY,
    MappingResult,
    map_query,
)
from regvi.map.plots import MAX_PLOT_CELLS, umap_plot
from regvi.map.tracking import (
    DEFAULT_EXPERIMENT,
    TAG_KIND,
    TAG_MODEL_NAME,
    TAG_MODEL_URI,
    TAG_MODEL_VERSION,
    TAG_RUN_ID,
    model_lineage,
    redact,
)

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_PATIENCE",
    "LATENT_KEY",
    "MAX_PLOT_CELLS",
    "TAG_KIND",
    "TAG_MODEL_NAME",
    "TAG_MODEL_URI",
    "TAG_MODEL_VERSION",
    "TAG_RUN_ID",
    "UNKNOWN",
    "MappingInputError",
    "MappingResult",
    "build_parser",
    "main",
    "map_query",
    "model_lineage",
    "parse_fine_tune",
    "umap_plot",
    "write_h5ad_atomic",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m regvi.map`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m regvi.map",
        description=(
            "Map new cells onto a trained regvi reference model: only the new categories' "
            "technical terms train (ambient, dispersion, feature scaling; their library-size "
            "prior is set from the query's counts), the query is encoded with the reference's "
            "encoder, and with --reference its labels are transferred by a kNN vote. Exit "
            "status: 0 done, 2 bad input (nothing written), 1 failed."
        ),
    )
    _add_data_arguments(p)
    _add_mapping_arguments(p)
    _add_run_arguments(p)
    return p


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the query, the output, the reference and their label columns."""
    p.add_argument(
        "--model",
        required=True,
        help="reference model: a directory, runs:/ID/model, models:/NAME@alias or models:/NAME/VER",
    )
    p.add_argument("--query", required=True, help="query .h5ad (raw counts, the model's obs keys)")
    p.add_argument(
        "--out", required=True, help="output .h5ad (the query + obsm['X_regvi'], labels)"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the atlas .h5ad the model was trained on, with labels; needed for label transfer "
        "(without it the output holds the latent only, no transferred labels)",
    )
    p.add_argument(
        "--labels-key",
        default="cell_type",
        help="label column of the reference's obs (default: cell_type); used with --reference",
    )
    p.add_argument(
        "--query-labels-key",
        default=None,
        help="the query's own label column, to score the transfer (accuracy, macro-F1, confusion)",
    )
    p.add_argument(
        "--train-epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"most query training epochs, early stopping on (default {DEFAULT_EPOCHS}; 0: none)",
    )


def _add_mapping_arguments(p: argparse.ArgumentParser) -> None:
    """Query training and kNN label transfer."""
    p.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help=f"early-stopping patience in epochs (default {DEFAULT_PATIENCE})",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size")
    p.add_argument(
        "--fine-tune",
        default=None,
        help="also train: conditioning (new categories' one-hot weights) and/or encoder "
        "(comma-separated); default none",
    )
    p.add_argument(
        "--allow-missing-genes",
        action="store_true",
        help="fill reference genes the query lacks with zero counts instead of refusing",
    )
    p.add_argument("--n-neighbors", type=int, default=15, help="kNN label transfer (default 15)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help=f"confidence below which a cell is called {UNKNOWN!r} (default 0.5)",
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """MLflow, saving, seed and device."""
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite mlflow.db by --out)",
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log a mapping run")
    p.add_argument("--save-model", default=None, help="also save the query model to this directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --save-model")
    p.add_argument("--seed", type=int, default=0, help="seed (training, plots)")
    p.add_argument(
        "--accelerator", default="cpu", choices=("cpu", "gpu", "auto"), help="training device"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m regvi.map``; returns the exit status (0 done, 2 bad input, 1 failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        result = map_query(**_map_query_arguments(args))
    except MappingInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # reported, not a traceback for users
        logger.debug("mapping failed", exc_info=True)
        print(f"error: mapping failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    _report(result)
    return 0


def _map_query_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`map_query`'s keyword arguments from the command line (``--no-*`` flags negated)."""
    kwargs = dict(vars(args))
    kwargs["log_mlflow"] = not kwargs.pop("no_mlflow")
    kwargs["progress_bar"] = not kwargs.pop("no_progress")
    return kwargs


def _report(result: MappingResult) -> None:
    """What was mapped, written and logged (stdout)."""
    new = ", ".join(f"{k}: {len(v)}" for k, v in result.added_categories.items()) or "none"
    print(f"mapped {result.n_query_cells} cells (new categories {new}) -> {result.out}")
    m = result.metrics
    if "mean_confidence" in m:
        line = f"labels: mean confidence {m['mean_confidence']:.3f}, unknown {m['fraction_unknown']:.1%}"
        if "accuracy" in m:
            line += f", accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
        print(line)
    if result.model_dir is not None:
        print(f"query model saved to {result.model_dir}")
    if result.run_id is not None:
        print(f"MLflow run {result.run_id} ({redact(str(result.tracking_uri))})")
