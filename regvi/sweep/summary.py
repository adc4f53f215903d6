"""After a sweep: results table, scib table, Pareto front, parameter importance, best model."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from evaluation.plots import save_figure
from regvi.sweep.config import SweepConfig
from regvi.sweep.tracking import TAG_PARENT, _retry, client


@dataclass
class SweepResult:
    """What a finished sweep produced."""

    sweep_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    best_trial_id: str | None
    best_metrics: dict[str, float]
    n_completed: int
    n_failed: int
    n_pruned: int


def trial_table(uri: str, experiment_id: str, parent_id: str) -> pd.DataFrame:
    """One row per child run: trial id, status, params, final metrics (MLflow is the record)."""
    c = client(uri)
    runs = c.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'", max_results=10_000
    )
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "trial_id": r.data.tags.get("regvi.trial_id"),
            "status": r.data.tags.get("regvi.status", r.info.status.lower()),
            "model_uri": r.data.tags.get("regvi.model_uri"),
        }
        row.update({f"param.{k}": v for k, v in r.data.params.items()})
        row.update(r.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Boolean mask of non-dominated rows of ``points`` (maximise every column)."""
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(points >= points[i], axis=1) & np.any(points > points[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def bio_column(table: pd.DataFrame) -> str:
    """The Bio score the Pareto plot uses: ``scib_bio_stable`` (KMeans NMI / ARI averaged over
    starts, the Bio inside the ``scib_total_stable`` objective) where trials logged it, else
    the Benchmarker's single-start ``scib_bio``."""
    if "scib_bio_stable" in table.columns and table["scib_bio_stable"].notna().any():
        return "scib_bio_stable"
    return "scib_bio"


def plot_pareto(table: pd.DataFrame, path: Path) -> Path | None:
    """scib bio vs batch per completed trial, Pareto front highlighted (Bio: :func:`bio_column`)."""
    bio = bio_column(table)
    if not {bio, "scib_batch"} <= set(table.columns):
        return None
    t = table.dropna(subset=[bio, "scib_batch"])
    if t.empty:
        return None
    pts = t[["scib_batch", bio]].to_numpy(float)
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(pts[~front, 0], pts[~front, 1], c="grey", s=25, label="trial")
    order = np.argsort(pts[front, 0])
    ax.plot(pts[front, 0][order], pts[front, 1][order], "o-", c="tab:red", label="Pareto front")
    for (x, y), tid in zip(pts, t["trial_id"], strict=True):
        ax.annotate(str(tid)[-5:], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("scib batch correction")
    ax.set_ylabel(
        "scib bio conservation" + (" (KMeans over starts)" if bio == "scib_bio_stable" else "")
    )
    ax.set_title("Bio vs batch across trials")
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def plot_importance(importance: dict[str, float], path: Path) -> Path | None:
    """Horizontal bar chart of Optuna parameter importances."""
    if not importance:
        return None
    names = list(importance)[::-1]
    fig, ax = plt.subplots(figsize=(5, 0.4 * len(names) + 1.2))
    ax.barh(
        [n.replace("params/", "") for n in names], [importance[n] for n in names], color="tab:blue"
    )
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title("Parameter importance")
    return save_figure(fig, path, dpi=120)


def summarise(
    cfg: SweepConfig, grid_results, uri: str, experiment_id: str, parent_id: str, sweep_dir: Path
) -> SweepResult:
    """Log the sweep summary to the parent run, register the best model; return SweepResult."""
    c = client(uri)
    table = trial_table(uri, experiment_id, parent_id)
    completed = table[table["status"] == "completed"] if len(table) else table
    metric, mode = cfg.objective_metrics[0], cfg.objective_modes[0]
    best = None
    if len(completed) and metric in completed:
        ranked = completed.dropna(subset=[metric]).sort_values(metric, ascending=mode == "min")
        best = ranked.iloc[0] if len(ranked) else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table.to_csv(tmp / "trials.csv", index=False)
        scib_cols = [k for k in table.columns if k.startswith("scib_")]
        if len(completed) > 1 and scib_cols:
            from evaluation.plots import plot_scib_table
            from evaluation.scib import compare_runs

            runs = {
                str(r["trial_id"]): {k: r[k] for k in scib_cols if pd.notna(r[k])}
                for _, r in completed.iterrows()
            }
            scaled = compare_runs(runs, min_max_scale=True)
            scaled.to_csv(tmp / "scib_table_scaled.csv")
            plot_scib_table(scaled, tmp / "scib_table.png")
        plot_pareto(completed, tmp / "pareto_bio_batch.png")
        importance = _importance(cfg, sweep_dir)
        if importance:
            (tmp / "param_importance.json").write_text(json.dumps(importance, indent=2))
            plot_importance(importance, tmp / "param_importance.png")
        _retry(lambda: c.log_artifacts(parent_id, str(tmp), "summary"))
    c.log_metric(parent_id, "n_trials_completed", float(len(completed)))
    c.log_metric(
        parent_id,
        "n_trials_failed",
        float((table["status"] == "failed").sum()) if len(table) else 0.0,
    )
    best_metrics: dict[str, float] = {}
    best_id = None
    if best is not None:
        best_id = str(best["trial_id"])
        best_metrics = {
            k: float(v)
            for k, v in best.items()
            if isinstance(v, int | float | np.floating) and pd.notna(v)
        }
        c.set_tag(parent_id, "best_trial_id", best_id)
        c.set_tag(parent_id, "best_run_id", best["run_id"])
        c.log_metric(parent_id, f"best_{metric}", float(best[metric]))
        if cfg.register_model and best.get("model_uri"):
            mv = _retry(
                lambda: _register(uri, best["model_uri"], cfg.register_model, best["run_id"])
            )
            c.set_tag(
                parent_id, "registered_model", f"models:/{cfg.register_model}@champion (v{mv})"
            )
    _retry(lambda: c.set_terminated(parent_id, "FINISHED"))
    n_failed = int((table["status"] == "failed").sum()) if len(table) else 0
    n_pruned = int((table["status"] == "pruned").sum()) if len(table) else 0
    return SweepResult(
        sweep_dir,
        uri,
        experiment_id,
        parent_id,
        best_id,
        best_metrics,
        len(completed),
        n_failed,
        n_pruned,
    )


def _register(uri: str, model_uri: str, name: str, run_id: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mv = mlflow.register_model(model_uri, name, tags={"run_id": run_id})
    client(uri).set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


def _importance(cfg: SweepConfig, sweep_dir: Path) -> dict[str, float]:
    if cfg.search_algorithm == "grid" or cfg.multi_objective:
        return {}
    import optuna

    try:
        study = optuna.load_study(
            study_name=cfg.name, storage=f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
        )
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < 2 or len(cfg.params) < 1:
            return {}
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception:  # importance needs ≥2 distinct completed trials; never fail the sweep
        return {}
