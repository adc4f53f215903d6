"""Scoring one neighbour graph: the per-cell table of the neighbourhood metrics
(docs/evaluation.md#neighbourhood-correlation).

:func:`score_graph` computes, for every applicable mask, the per-cell columns listed in
:mod:`evaluation.neighbourhood`. The connectivity-weighted neighbour sums are obtained with as few
sparse products as possible: within each partition of a parent edge set (all edges = same_library
+ between_libraries; between_libraries = cross_library + cross_dataset; all edges = within_<key> +
between_<key> + edges touching a missing value), the largest part is the parent's sum minus the
others. Cells without neighbours in a mask get ``NaN`` explicitly, and near-constant differences
are caught by the relative tolerance of :func:`~evaluation.nc_correlation.standardise_rows`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd

from evaluation.nc_baselines import expected_isolation
from evaluation.nc_correlation import (
    correlate_standardised,
    edge_correlations,
    mirror_permutation,
    neighbour_sums,
    segment_stats,
)
from evaluation.nc_masks import CellGroups, EdgeList, edge_masks

PER_MASK_COLUMNS = (
    "corr_avg",
    "r_mean",
    "r_median",
    "r_weighted",
    "r_std",
    "n",
    "frac",
    "expected_isolated",
)


def _partitions(groups: CellGroups) -> list[tuple[str | None, list[str]]]:
    """``(parent, parts)``: masks whose edges partition the parent's (None = all edges)."""
    parts: list[tuple[str | None, list[str]]] = [(None, ["same_library", "between_libraries"])]
    if groups.dataset is not None:
        parts.append(("between_libraries", ["cross_library", "cross_dataset"]))
    for key in groups.technical:
        parts.append((None, [f"within_{key}", f"between_{key}", f"_missing_{key}"]))
    return parts


def _mask_sums(
    profiles: np.ndarray, edges: EdgeList, groups: CellGroups, emasks: Mapping[str, np.ndarray]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(mask, weighted neighbour sum)`` for every mask in ``emasks``.

    Within each partition of a parent edge set, the largest part is obtained as the parent's sum
    minus the others, so the sparse products touch about half as many edges as one product per
    mask would.
    """
    rows, cols, w = edges.rows, edges.cols, edges.weights

    def direct(em: np.ndarray) -> np.ndarray:
        return neighbour_sums(profiles, rows[em], cols[em], w[em])

    parent_sums: dict[str | None, np.ndarray] = {None: direct(np.ones(rows.size, bool))}
    needed_parents = {parent for parent, _ in _partitions(groups)}
    # with one technical key, cross_technical has exactly the edges of between_<key>
    alias = f"between_{next(iter(groups.technical))}" if len(groups.technical) == 1 else None
    kept: dict[str, np.ndarray] = {}
    for parent, names in _partitions(groups):
        if parent not in parent_sums:
            continue  # the parent mask is not applicable, so neither are its parts
        real = [m for m in names if not m.startswith("_")]
        ems = {**edge_masks(groups, edges, [m for m in real if m not in emasks]), **emasks}
        ems = {m: ems[m] for m in real}
        if names[-1].startswith("_missing_"):
            ems[names[-1]] = ~(ems[names[0]] | ems[names[1]])
        largest = max(ems, key=lambda m: int(ems[m].sum()))
        rest = parent_sums[parent].copy()
        for m in [m for m in ems if m != largest] + [largest]:
            part = rest if m == largest else direct(ems[m])
            if m != largest:
                rest -= part
            if m in needed_parents:
                parent_sums[m] = part
            if m == alias:
                kept[m] = part
            if m in emasks:
                yield m, part
    if "cross_technical" in emasks:
        yield (
            "cross_technical",
            kept.get(alias) if alias in kept else direct(emasks["cross_technical"]),
        )


def score_graph(
    profiles: np.ndarray,
    z: np.ndarray,
    edges: EdgeList,
    groups: CellGroups,
    populations: Mapping[str, np.ndarray],
    symmetric: bool = True,
) -> pd.DataFrame:
    """Per-cell correlation table of one graph (all masks in ``populations``).

    Parameters
    ----------
    profiles
        ``(n_cells, n_markers)`` marker profiles.
    z
        ``(n_cells, n_markers)`` :func:`~evaluation.nc_correlation.standardise_rows` of them.
    edges
        The graph.
    groups
        Coded cell groups.
    populations
        ``{mask: (n_cells,) population size}`` of the applicable masks.
    symmetric
        Try to exploit a symmetric graph structure (halves the per-neighbour work).

    Returns
    -------
    pandas.DataFrame
        ``(n_cells, …)``: ``n_neighbours`` and the per-mask columns of the module docstring.
    """
    n = edges.n_cells
    degree = edges.degree
    mirror = mirror_permutation(edges.rows, edges.cols) if symmetric else None
    r = edge_correlations(z, edges.rows, edges.cols, mirror)
    finite = np.flatnonzero(np.isfinite(r))
    order = finite[np.lexsort((r[finite], edges.rows[finite]))]  # by cell, then r
    emasks = edge_masks(groups, edges, list(populations))
    out: dict[str, np.ndarray] = {"n_neighbours": degree}
    for m, sums in _mask_sums(profiles, edges, groups, emasks):
        em = emasks[m]
        count = np.bincount(edges.rows[em], minlength=n)
        corr = correlate_standardised(z, sums)
        corr[count == 0] = np.nan
        sel = order[em[order]]
        stats = segment_stats(edges.rows[sel], r[sel], edges.weights[sel], n)
        pop = populations[m]
        expected = expected_isolation(pop, n, degree)
        out[f"corr_avg_{m}"] = corr
        for s in ("mean", "median", "weighted", "std"):
            out[f"r_{s}_{m}"] = stats[s]
        out[f"n_{m}"] = count
        out[f"frac_{m}"] = np.divide(count, degree, out=np.full(n, np.nan), where=degree > 0)
        out[f"expected_isolated_{m}"] = np.where(np.nan_to_num(pop) > 0, expected, np.nan)
    order_cols = ["n_neighbours"] + [f"{c}_{m}" for m in populations for c in PER_MASK_COLUMNS]
    return pd.DataFrame(out)[order_cols]
