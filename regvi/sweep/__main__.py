"""CLI: ``python -m regvi.sweep CONFIG [--resume] [--dry-run] [--list-metrics] [--address ADDR]``.

``--dry-run`` checks the config (metric names included) and the data (keys, layers, counts;
obs/var and the matrix's metadata only, see :mod:`regvi.sweep.data_check`), prints the resolved
search and exits. ``--list-metrics`` prints the metrics the configured trials report.

Exit status: 0 done; 2 refused (bad config, data or output folder; nothing written); 3 stopped
because storage filled up mid-sweep (free space, then ``--resume``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from regvi.sweep.config import SweepConfig
    from regvi.sweep.summary import SweepResult


def _parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(prog="python -m regvi.sweep", description=__doc__)
    p.add_argument("config", type=Path, help="sweep YAML (see sweeps/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config and the data (without loading it), print the resolved search, exit",
    )
    p.add_argument(
        "--list-metrics",
        action="store_true",
        help="print the metrics the configured trials report (objective names) and exit",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)"
    )
    p.add_argument("--trials", type=int, default=None, help="override budget.trials")
    return p


def _load(args: argparse.Namespace) -> SweepConfig | None:
    """The validated config (``--trials`` applied), or ``None`` after printing its error."""
    from regvi.sweep.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, check_metrics=not args.list_metrics)
        if args.trials is not None:
            cfg.trials = args.trials
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return None
    return cfg


def _print_plan(cfg: SweepConfig) -> None:
    """Print the sweep's budget, objective, algorithm, resources and search space."""
    from regvi.sweep.space import describe

    print(
        f"sweep {cfg.name!r}: {cfg.trials} trials, objective "
        f"{dict(zip(cfg.objective_metrics, cfg.objective_modes, strict=True))}, "
        f"{cfg.search_algorithm} + {cfg.scheduler['name']}, "
        f"{cfg.workers} worker(s) × {cfg.cpus_per_worker:g} CPU / {cfg.gpus_per_worker:g} GPU"
    )
    print("search space:\n" + describe(cfg))


def _dry_run(cfg: SweepConfig) -> int:
    """Check the data files and print them and the resolved config; returns the exit status."""
    from regvi.sweep.config import ConfigError
    from regvi.sweep.data_check import check_data_files

    try:
        found = check_data_files(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("data:\n" + found.describe())
    print(json.dumps(cfg.resolved(), indent=2, default=str))
    return 0


def _print_result(cfg: SweepConfig, result: SweepResult) -> None:
    """Print a finished sweep's trial counts, best trial and where to look at it in MLflow."""
    from regvi.sweep.config import redact_uri

    print(
        f"\nsweep finished: {result.n_completed} completed, {result.n_pruned} pruned by ASHA, "
        f"{result.n_failed} failed"
    )
    if result.best_trial_id:
        obj = cfg.objective_metrics[0]
        print(f"best trial {result.best_trial_id}: {obj} = {result.best_metrics.get(obj)}")
    print(
        f"MLflow: {redact_uri(result.tracking_uri)}  (experiment {cfg.experiment!r}, parent run {result.parent_run_id})"
    )
    # MLflow 3.x opens experiments on its GenAI overview unless the link asks for model training
    runs_page = f"#/experiments/{result.experiment_id}?workflowType=machine_learning"
    if result.tracking_uri.startswith("sqlite"):
        print(
            f"open the UI with:  mlflow ui --backend-store-uri {result.tracking_uri} --host 127.0.0.1"
        )
        print(f"the trials:  http://127.0.0.1:5000/{runs_page}")
    elif result.tracking_uri.startswith(("http://", "https://")):
        print(f"the trials:  {redact_uri(result.tracking_uri).rstrip('/')}/{runs_page}")
    if cfg.register_model and result.best_trial_id:
        print(f"load the best model:  regvi.load('models:/{cfg.register_model}@champion')")


def _run(cfg: SweepConfig, args: argparse.Namespace) -> int:
    """Run (or resume) the sweep and print its result; returns the exit status."""
    from regvi.sweep.runner import run_sweep
    from regvi.sweep.storage import StorageFullError

    try:
        result = run_sweep(cfg, resume=args.resume, address=args.address)
    except StorageFullError as err:  # stopped mid-sweep; resumable once space is freed
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_result(cfg, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the sweep CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    cfg = _load(args)
    if cfg is None:
        return 2
    if args.list_metrics:
        from regvi.sweep.metric_names import describe_metrics

        print(describe_metrics(cfg))
        return 0
    _print_plan(cfg)
    if args.dry_run:
        return _dry_run(cfg)
    return _run(cfg, args)


if __name__ == "__main__":
    raise SystemExit(main())
