"""Label-free neighbourhood-correlation metrics (docs/evaluation.md#neighbourhood-correlation).

Do a cell's kNN neighbours in the latent space express the same marker genes as the cell -- within
its own library, across libraries of a dataset, across datasets, across technical groups? Counts
are normalised per cell by the total over ALL genes (not logged), then subset to the markers; the
graph is the shared kNN connectivity matrix (``Neighbours.connectivities(50)``), self removed,
weights kept. Masks are described in :mod:`evaluation.nc_masks`, failure modes in
:mod:`evaluation.nc_summary`.

Per-cell columns (``NeighbourhoodResult.per_cell``, one row per cell, for each applicable mask
``<m>``): ``corr_avg_<m>`` (r between the cell and the connectivity-weighted mean profile of its
neighbours in ``<m>``), ``r_mean_<m>``, ``r_median_<m>``, ``r_weighted_<m>`` (connectivity-
weighted mean), ``r_std_<m>`` (ddof = 0) of the r to individual neighbours (neighbours with a
constant profile skipped), ``n_<m>``, ``frac_<m>`` (= ``n_<m> / n_neighbours``),
``expected_isolated_<m>`` (``(1 − p)^k``, ``NaN`` where the population is empty); plus
``n_neighbours``, ``no_marker_signal`` (bool: constant marker profile, in practice no marker
counts, so every correlation of the cell is ``NaN``) and ``failure_mode_library`` /
``failure_mode_dataset`` (categorical, see :mod:`evaluation.nc_summary`).

Headline keys (``NeighbourhoodResult.headline``; always present, ``NaN`` when not applicable).
"lib cross mask" = ``cross_library``, or ``between_libraries`` when no dataset key is given (all
cells are then one dataset):

- ``H1_median_corr_same_library``: median ``corr_avg_same_library``
- ``H2_median_spread_same_library``: median of the per-cell std of r to same-library neighbours
- ``H3_median_corr_cross_library``: median ``corr_avg`` of the lib cross mask (cells with ≥ 1 such
  neighbour)
- ``H4_gap_cross_library`` = H1 − H3
- ``H5_isolation_norm_cross_library``: isolation ratio of the lib cross mask, observed isolated
  fraction / (expected + ``τ``) (eq. ISO of :mod:`evaluation.nc_baselines`, ``τ`` = 0.01)
- ``H7_median_corr_cross_dataset``, ``H8_gap_cross_dataset`` (= H1 − H7),
  ``H9_isolation_norm_cross_dataset``
- ``H11_overlap_cross_library``, ``H12_overlap_cross_dataset``: overlap of the 50-bin histograms
  on [−1, 1] of ``corr_avg_same_library`` and of the cross ``corr_avg``
- ``H14_median_corr_cross_technical``
- ``composite_lib``, ``composite_ds``, ``composite_batch``, ``composite_total`` (see
  :func:`evaluation.nc_summary.composite_scores`)

(The spec defines no H6, H10 or H13.) Every key above also appears as ``random_<key>``: the same
number on a degree-matched random graph (mean over ``n_random_repeats``). Per applicable mask
there are also ``median_corr_avg_<m>``, ``median_r_mean_<m>``, ``isolated_<m>``,
``expected_isolated_<m>``, ``isolation_norm_<m>`` (and their ``random_`` versions), and per level
``frac_<mode>_<level>`` (fraction of the level's applicable cells in each failure mode, including
``no_marker_signal``). ``frac_no_marker_signal`` is the fraction of all cells without marker
signal (defined whether or not any failure-mode level applies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from evaluation.nc_baselines import degree_matched_random_graph, histogram_overlap, isolation_norm
from evaluation.nc_correlation import marker_profiles, standardise_rows
from evaluation.nc_masks import cell_groups, edge_list, mask_populations
from evaluation.nc_score import score_graph
from evaluation.nc_summary import (
    FAILURE_MODES,
    composite_scores,
    failure_modes,
    stratified_summary,
)

HEADLINE_KEYS = (
    "H1_median_corr_same_library",
    "H2_median_spread_same_library",
    "H3_median_corr_cross_library",
    "H4_gap_cross_library",
    "H5_isolation_norm_cross_library",
    "H7_median_corr_cross_dataset",
    "H8_gap_cross_dataset",
    "H9_isolation_norm_cross_dataset",
    "H11_overlap_cross_library",
    "H12_overlap_cross_dataset",
    "H14_median_corr_cross_technical",
    "composite_lib",
    "composite_ds",
    "composite_batch",
    "composite_total",
)


@dataclass
class NeighbourhoodResult:
    """Output of :func:`neighbourhood_metrics`.

    Attributes
    ----------
    per_cell
        ``(n_cells, …)`` per-cell table (columns in the module docstring).
    headline
        Flat ``{name: float}`` (keys in the module docstring).
    summaries
        ``{"library" | "dataset" | <technical key>: DataFrame}`` per-group summaries
        (:func:`evaluation.nc_summary.stratified_summary`).
    masks
        The applicable masks, in canonical order.
    """

    per_cell: pd.DataFrame
    headline: dict[str, float]
    summaries: dict[str, pd.DataFrame] = field(default_factory=dict)
    masks: tuple[str, ...] = ()


def _median(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else np.nan


def cross_masks(masks: Sequence[str], has_dataset: bool) -> dict[str, str | None]:
    """The cross mask of each failure-mode / headline level.

    Parameters
    ----------
    masks
        Applicable masks.
    has_dataset
        Whether a dataset key was given.

    Returns
    -------
    dict
        ``{"library": mask or None, "dataset": mask or None}``.
    """
    lib = "cross_library" if has_dataset else "between_libraries"
    return {
        "library": lib if lib in masks else None,
        "dataset": "cross_dataset" if "cross_dataset" in masks else None,
    }


def headline_numbers(
    per_cell: pd.DataFrame, populations: Mapping[str, np.ndarray], has_dataset: bool
) -> dict[str, float]:
    """Headline numbers H1–H14, composites and per-mask summaries of one per-cell table.

    Parameters
    ----------
    per_cell
        Output of :func:`score_graph`.
    populations
        ``{mask: (n_cells,) population size}``.
    has_dataset
        Whether a dataset key was given.

    Returns
    -------
    dict
        Flat ``{name: float}``, keys as in the module docstring (without failure modes).
    """
    masks = list(populations)
    cross = cross_masks(masks, has_dataset)

    def col(prefix: str, m: str | None) -> np.ndarray:
        key = f"{prefix}_{m}"
        return per_cell[key].to_numpy() if m is not None and key in per_cell else np.array([])

    iso = {}
    h: dict[str, float] = {}
    for m in masks:
        observed, expected, norm = isolation_norm(
            per_cell[f"n_{m}"].to_numpy(),
            per_cell[f"expected_isolated_{m}"].to_numpy(),
            populations[m],
        )
        iso[m] = norm
        h[f"median_corr_avg_{m}"] = _median(col("corr_avg", m))
        h[f"median_r_mean_{m}"] = _median(col("r_mean", m))
        h[f"isolated_{m}"] = observed
        h[f"expected_isolated_{m}"] = expected
        h[f"isolation_norm_{m}"] = norm
    within = "same_library" if "same_library" in masks else None
    same = col("corr_avg", within)
    lib, ds = cross["library"], cross["dataset"]
    h1 = _median(same)
    h3 = _median(col("corr_avg", lib))
    h7 = _median(col("corr_avg", ds))
    tech = "cross_technical" if "cross_technical" in masks else None
    head = {
        "H1_median_corr_same_library": h1,
        "H2_median_spread_same_library": _median(col("r_std", within)),
        "H3_median_corr_cross_library": h3,
        "H4_gap_cross_library": h1 - h3,
        "H5_isolation_norm_cross_library": iso.get(lib, np.nan),
        "H7_median_corr_cross_dataset": h7,
        "H8_gap_cross_dataset": h1 - h7,
        "H9_isolation_norm_cross_dataset": iso.get(ds, np.nan),
        "H11_overlap_cross_library": histogram_overlap(same, col("corr_avg", lib)),
        "H12_overlap_cross_dataset": histogram_overlap(same, col("corr_avg", ds)),
        "H14_median_corr_cross_technical": _median(col("corr_avg", tech)),
    }
    head.update(composite_scores(head))
    return {**head, **h}


def neighbourhood_metrics(
    counts,
    connectivities,
    marker_idx: np.ndarray,
    library: Sequence,
    dataset: Sequence | None = None,
    technical: Mapping[str, Sequence] | None = None,
    seed: int = 0,
    n_random_repeats: int = 1,
) -> NeighbourhoodResult:
    """Neighbourhood-correlation metrics of one embedding's kNN graph.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts (scipy sparse or dense).
    connectivities
        ``(n_cells, n_cells)`` kNN connectivities on the latent space (e.g.
        ``compute_neighbours(emb).connectivities(50)``); self loops are ignored.
    marker_idx
        ``(n_markers,)`` column indices of the marker genes (≥ 2).
    library
        ``(n_cells,)`` library labels (required).
    dataset
        ``(n_cells,)`` dataset labels, or None.
    technical
        ``{key: (n_cells,) labels}`` technical covariates, or None.
    seed
        Seed of the random baseline graphs (repeat ``i`` uses ``seed + i``).
    n_random_repeats
        Degree-matched random graphs to score (0 = none; ``random_`` keys are then ``NaN``).

    Returns
    -------
    NeighbourhoodResult
    """
    profiles = marker_profiles(counts, marker_idx)
    n = profiles.shape[0]
    edges = edge_list(connectivities)
    if edges.n_cells != n:
        raise ValueError(f"connectivities is {edges.n_cells}×{edges.n_cells} for {n} cells")
    groups = cell_groups(library, dataset, technical)
    if groups.n_cells != n:
        raise ValueError(f"library has {groups.n_cells} entries for {n} cells")
    clash = {"library", "libraries", "dataset"} & set(groups.technical)
    if clash:
        raise ValueError(f"technical keys must not be named {sorted(clash)}")
    has_dataset = groups.dataset is not None
    populations = mask_populations(groups)
    z = standardise_rows(profiles)
    per_cell = score_graph(profiles, z, edges, groups, populations)
    headline = headline_numbers(per_cell, populations, has_dataset)

    random_runs = []
    for rep in range(n_random_repeats):
        graph = degree_matched_random_graph(connectivities, seed=seed + rep)
        rand = score_graph(profiles, z, edge_list(graph), groups, populations, symmetric=False)
        random_runs.append(headline_numbers(rand, populations, has_dataset))
    if random_runs:
        random_head = {k: _nanmean([run[k] for run in random_runs]) for k in random_runs[0]}
    else:
        random_head = dict.fromkeys(HEADLINE_KEYS, np.nan)

    profile_ok = np.isfinite(z[:, 0])  # constant profiles are NaN rows
    per_cell["no_marker_signal"] = ~profile_ok
    headline["frac_no_marker_signal"] = float(np.mean(~profile_ok)) if n else np.nan
    for level, m in cross_masks(list(populations), has_dataset).items():
        if m is None or "same_library" not in populations:
            continue
        modes = failure_modes(
            per_cell["corr_avg_same_library"].to_numpy(),
            per_cell["n_same_library"].to_numpy(),
            per_cell[f"corr_avg_{m}"].to_numpy(),
            per_cell[f"n_{m}"].to_numpy(),
            populations[m],
            profile_ok,
            chance=random_head.get(f"median_corr_avg_{m}", np.nan),
        )
        per_cell[f"failure_mode_{level}"] = modes
        defined = modes.notna()
        for mode in FAILURE_MODES:
            headline[f"frac_{mode}_{level}"] = (
                float(np.mean(modes[defined] == mode)) if defined.any() else np.nan
            )
    headline.update({f"random_{k}": v for k, v in random_head.items()})

    masks = list(populations)
    by_library = (
        {"library": library} if dataset is None else {"dataset": dataset, "library": library}
    )
    summaries = {"library": stratified_summary(per_cell, by_library, masks)}
    if dataset is not None:
        summaries["dataset"] = stratified_summary(per_cell, {"dataset": dataset}, masks)
    for key, values in (technical or {}).items():
        summaries[str(key)] = stratified_summary(per_cell, {str(key): values}, masks)
    return NeighbourhoodResult(per_cell, headline, summaries, tuple(masks))


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else np.nan
