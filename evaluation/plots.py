"""PNG plots for evaluation: UMAPs, correlation histograms, scib table across runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

#: Legend entry of missing obs values (e.g. a failure-mode level that does not apply).
MISSING_LABEL = "n/a"


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG by suffix) and close it; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def category_labels(values: pd.Series) -> pd.Categorical:
    """Legend categories of an obs column: values as strings, missing ones as ``"n/a"``.

    Parameters
    ----------
    values
        ``(n_cells,)`` obs column (any dtype). For ``failure_mode_<level>`` columns a missing
        value means the level does not apply to the cell (no cross population); cells without
        marker signal have their own mode, ``"no_marker_signal"``.

    Returns
    -------
    pandas.Categorical
        ``(n_cells,)`` string categories, never ``"nan"`` for a missing value.
    """
    values = pd.Series(values).astype(object)
    return pd.Categorical(values.where(values.notna(), MISSING_LABEL).astype(str))


def plot_embedding(
    coords: np.ndarray,
    obs: pd.DataFrame,
    keys: Sequence[str],
    path: str | Path,
    title: str = "UMAP",
) -> Path:
    """Scatter of 2-d ``coords`` coloured by each obs key (categorical), one panel per key.

    Missing values are drawn as the category ``"n/a"`` (see :func:`category_labels`)."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.6), squeeze=False)
    order = np.random.default_rng(0).permutation(len(coords))  # no category drawn on top
    for ax, key in zip(axes[0], keys, strict=True):
        cats = category_labels(obs[key])
        cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
        colors = cmap(cats.codes[order] % cmap.N)
        ax.scatter(coords[order, 0], coords[order, 1], c=colors, s=2, linewidths=0, rasterized=True)
        handles = [
            plt.Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=c)
            for i, c in enumerate(cats.categories)
        ]
        ax.legend(
            handles=handles,
            fontsize=6,
            markerscale=0.8,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
        ax.set_title(f"{title}: {key}")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def umap_2d(latent: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-d UMAP of a latent (scanpy neighbours + UMAP, on the latent as float32).

    The one UMAP of the project: evaluation, the sweep, the quickstart and
    :mod:`regvi.plotting` (reference mapping) use it.
    """
    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(X=np.zeros((latent.shape[0], 1), dtype=np.float32))
    tmp.obsm["X_latent"] = np.asarray(latent, dtype=np.float32)
    sc.pp.neighbors(tmp, use_rep="X_latent", n_neighbors=n_neighbors, random_state=seed)
    sc.tl.umap(tmp, random_state=seed)
    return np.asarray(tmp.obsm["X_umap"])


#: Former name of :func:`umap_2d` (``regvi.quickstart``, ``regvi.sweep.evaluator``).
umap_coords = umap_2d


def plot_correlation_histograms(
    per_cell: pd.DataFrame, path: str | Path, bins: int = 50
) -> Path | None:
    """Histogram of per-cell neighbourhood correlation (``corr_avg_<mask>``) for every mask."""
    cols = [c for c in per_cell.columns if c.startswith("corr_avg_") and per_cell[c].notna().any()]
    if not cols:
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    edges = np.linspace(-1, 1, bins + 1)
    for c in cols:
        v = per_cell[c].dropna().to_numpy()
        ax.hist(
            v,
            bins=edges,
            histtype="step",
            linewidth=1.5,
            density=True,
            label=f"{c[9:]} (median {np.median(v):.2f}, n={len(v)})",
        )
    ax.set_xlabel("Pearson r: cell vs weighted mean of its neighbours (markers)")
    ax.set_ylabel("density")
    ax.set_title("Neighbourhood correlation per mask")
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_scib_table(table: pd.DataFrame, path: str | Path) -> Path:
    """scib results across runs: circles sized/coloured by metric value, bars for aggregates.

    ``table`` is :func:`evaluation.scib.compare_runs` output (rows = runs, sorted by total).
    """
    path = Path(path)
    aggregates = [c for c in ("bio", "batch", "total") if c in table.columns]
    metrics = [c for c in table.columns if c not in aggregates]
    n_rows, n_cols = len(table), len(metrics) + len(aggregates)
    fig, ax = plt.subplots(figsize=(1.0 * n_cols + 2.5, 0.5 * n_rows + 1.6))
    cmap = plt.get_cmap("PRGn")
    for j, col in enumerate(metrics + aggregates):
        for i, run in enumerate(table.index):
            v = float(table.loc[run, col])
            y = n_rows - 1 - i
            if col in aggregates:
                ax.barh(
                    y,
                    0.8 * max(v, 0),
                    left=j - 0.4,
                    height=0.5,
                    color=plt.get_cmap("YlGnBu")(0.3 + 0.7 * v),
                )
            else:
                ax.scatter(
                    j, y, s=60 + 400 * max(v, 0), color=cmap(v), edgecolor="k", linewidth=0.3
                )
            ax.text(j, y - 0.38, f"{v:.2f}", ha="center", va="top", fontsize=6)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels(
        [c.replace("_", " ") for c in metrics + aggregates], rotation=45, ha="right", fontsize=7
    )
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(list(table.index)[::-1], fontsize=7)
    ax.set_xlim(-0.7, n_cols - 0.3)
    ax.set_ylim(-0.8, n_rows - 0.4)
    ax.axvline(len(metrics) - 0.5, color="grey", lw=0.5)
    ax.set_title(f"scib metrics ({table.attrs.get('scaling', 'raw')})", fontsize=9)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return save_figure(fig, path, dpi=130)


def plot_umaps(
    coords: np.ndarray,
    obs: pd.DataFrame,
    keys: Sequence[str],
    out_dir: str | Path,
    title: str = "UMAP",
) -> Mapping[str, Path]:
    """One combined PNG with a panel per available key (label / library / dataset / failure)."""
    keys = [k for k in keys if k in obs.columns]
    path = Path(out_dir) / "umap.png"
    return {"umap": plot_embedding(coords, obs, keys, path, title=title)}
