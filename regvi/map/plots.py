"""The plots of a mapping: the UMAP of reference and query cells (by source and by label) and,
with the query's own labels, the confusion of the transferred ones."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from regvi.map.inputs import UNKNOWN, MappingSettings
from regvi.map.tracking import redact

if TYPE_CHECKING:
    from regvi.map.plan import Plan

#: most cells in the UMAP plot (reference and query subsampled in proportion)
MAX_PLOT_CELLS = 50_000

_REFERENCE_VS_QUERY = {"reference": (0.72, 0.72, 0.72, 1.0), "query": (0.84, 0.15, 0.16, 1.0)}


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    """A colour per label (tab10, tab20, else hsv); :data:`UNKNOWN` is near black."""
    import matplotlib

    names = [v for v in labels if v != UNKNOWN]
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours: dict[str, Any] = {}
    for i, v in enumerate(names):
        colours[v] = (
            cmap(i % cmap.N) if len(names) <= 20 else matplotlib.colormaps["hsv"](i / len(names))
        )
    colours[UNKNOWN] = (0.15, 0.15, 0.15, 1.0)
    return colours


def _strings(values: Sequence[Any], index: np.ndarray, missing: str | None = None) -> np.ndarray:
    """``values[index]`` as strings (missing values as ``missing`` when given)."""
    picked = np.asarray(values, dtype=object)[index]
    return np.asarray(
        [missing if missing is not None and pd.isna(v) else str(v) for v in picked], dtype=object
    )


def _cell_labels(
    query_labels: Sequence[Any] | None,
    reference_labels: Sequence[Any] | None,
    qi: np.ndarray,
    ri: np.ndarray,
) -> np.ndarray | None:
    """The plotted cells' labels, reference first (``None`` when neither side has labels)."""
    if query_labels is None and reference_labels is None:
        return None
    q_lab = (
        _strings(query_labels, qi)
        if query_labels is not None
        else np.full(len(qi), "query (no label)", dtype=object)
    )
    r_lab = (
        _strings(reference_labels, ri, missing="unlabelled")
        if reference_labels is not None and len(ri)
        else np.zeros(0, dtype=object)
    )
    return np.concatenate([r_lab, q_lab])


def _scatter(ax: Any, xy: np.ndarray, order: np.ndarray, colours: list[Any], size: float) -> None:
    ax.scatter(xy[order, 0], xy[order, 1], c=colours, s=size, linewidths=0, rasterized=True)


def _source_panel(
    ax: Any,
    xy: np.ndarray,
    order: np.ndarray,
    size: float,
    qi: np.ndarray,
    ri: np.ndarray,
    has_reference: bool,
    query_groups: Sequence[Any] | None,
    group_name: str,
) -> None:
    """Reference vs query, or without a reference the query cells by ``query_groups``."""
    from matplotlib.lines import Line2D

    if has_reference:
        src = np.where(np.r_[np.zeros(len(ri), bool), np.ones(len(qi), bool)], "query", "reference")
        colours = _REFERENCE_VS_QUERY
        counts = {"reference": len(ri), "query": len(qi)}
        ax.set_title("reference vs query")
    else:
        src = np.asarray([str(v) for v in np.asarray(query_groups, dtype=object)[qi]])
        colours = _palette(sorted(set(src)))
        counts = {k: int((src == k).sum()) for k in colours if (src == k).any()}
        ax.set_title(f"query cells by {group_name}")
    _scatter(ax, xy, order, [colours[s] for s in src[order]], size)
    handles = [
        Line2D([], [], marker="o", ls="", color=colours[k], label=f"{k} (n={counts[k]})")
        for k in counts
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)


def _label_panel(
    ax: Any, xy: np.ndarray, order: np.ndarray, size: float, labels: np.ndarray
) -> None:
    """Reference labels and the query's transferred ones (:data:`UNKNOWN` last)."""
    from matplotlib.lines import Line2D

    names = sorted({str(v) for v in labels}, key=lambda v: (v == UNKNOWN, v))
    colours = _palette(names)
    _scatter(ax, xy, order, [colours[v] for v in labels[order]], size)
    ax.set_title("label (reference: annotated, query: transferred)")
    handles = [Line2D([], [], marker="o", ls="", color=colours[k], label=k) for k in names[:40]]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
        fontsize=9 if len(names) <= 20 else 6,
        ncol=1 if len(names) <= 20 else 2,
    )


def umap_plot(
    query_latent: np.ndarray,
    path: str | os.PathLike,
    *,
    reference_latent: np.ndarray | None = None,
    reference_labels: Sequence[Any] | None = None,
    query_labels: Sequence[Any] | None = None,
    query_groups: Sequence[Any] | None = None,
    group_name: str = "group",
    max_cells: int = MAX_PLOT_CELLS,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """UMAP of reference and query cells: by source (reference / query) and by label.

    Parameters
    ----------
    query_latent
        ``(n_query, d)`` latent of the query cells.
    path
        The PNG to write.
    reference_latent, reference_labels
        The reference cells' latent and labels (the first panel then shows reference vs query).
    query_labels
        The query's labels (transferred), shown with the reference's in the second panel.
    query_groups
        Without a reference: a query grouping (e.g. its library) for the first panel.
    group_name
        What ``query_groups`` is (the first panel's title).
    max_cells
        Most cells plotted; reference and query are subsampled in proportion.
    seed
        Seed of the subsample and of UMAP.
    title
        Figure title.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from matplotlib.figure import Figure

    from regvi.plotting import umap_2d

    rng = np.random.default_rng(seed)
    n_q = query_latent.shape[0]
    n_r = 0 if reference_latent is None else reference_latent.shape[0]
    share = min(1.0, max_cells / max(n_q + n_r, 1))
    qi = _subsample(n_q, max(1, int(n_q * share)), rng)
    ri = _subsample(n_r, int(n_r * share), rng) if n_r else np.arange(0)
    parts = [np.asarray(query_latent)[qi]]
    if n_r:
        parts.insert(0, np.asarray(reference_latent)[ri])
    latent = np.concatenate(parts).astype(np.float32)
    n_neighbors = int(min(15, max(2, latent.shape[0] - 1)))
    xy = umap_2d(latent, seed=seed, n_neighbors=n_neighbors)
    size = float(np.clip(30000 / latent.shape[0], 0.3, 12.0))
    order = rng.permutation(latent.shape[0])
    labels = _cell_labels(query_labels, reference_labels, qi, ri)

    n_panels = 2 if labels is not None else 1
    fig = Figure(figsize=(6.4 * n_panels + 2.2 * n_panels, 6.0), dpi=130)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    _source_panel(axes[0], xy, order, size, qi, ri, n_r > 0, query_groups, group_name)
    if labels is not None:
        _label_panel(axes[1], xy, order, size, labels)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    shown = f"{len(qi)} of {n_q} query" + (f", {len(ri)} of {n_r} reference" if n_r else "")
    fig.suptitle((title + "\n" if title else "") + f"{shown} cells", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def mapping_plots(
    folder: Path,
    plan: Plan,
    s: MappingSettings,
    latent: np.ndarray,
    ref_latent: np.ndarray | None,
    table: pd.DataFrame | None,
    added: dict[str, list[str]],
) -> Iterator[Path]:
    """Draw into ``folder``, one by one: the UMAP (the query by its first new covariate, or all
    as ``query``), then with query labels the confusion plot."""
    group_key = next(iter(added), None)
    groups = (
        plan.query.obs[group_key].astype(str).to_numpy()
        if group_key is not None
        else np.full(plan.query.n_obs, "query", dtype=object)
    )
    yield umap_plot(
        latent,
        folder / "umap_reference_query.png",
        reference_latent=ref_latent,
        reference_labels=plan.reference_labels.to_numpy() if ref_latent is not None else None,
        query_labels=table["label"].to_numpy() if table is not None else None,
        query_groups=groups,
        group_name=group_key or "source",
        max_cells=s.max_plot_cells,
        seed=s.seed,
        title=f"query {plan.query_path.name} mapped onto {redact(plan.model_text)}",
    )
    if table is not None and plan.query_labels is not None:
        from regvi.map.labels import confusion_plot

        yield confusion_plot(
            plan.query_labels, table["label"], folder / "confusion.png", unknown_label=UNKNOWN
        )
