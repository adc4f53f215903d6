"""Failure modes, composite scores and stratified summaries of the neighbourhood metrics
(docs/evaluation.md#neighbourhood-correlation).

Failure mode of a cell at one level (``library``: cross mask ``cross_library``, or
``between_libraries`` without a dataset key; ``dataset``: cross mask ``cross_dataset``), from
``w`` = ``corr_avg_same_library``, ``c`` = ``corr_avg`` of the cross mask and ``n_c`` its
neighbour count, checked in this order:

1. missing (``NaN``): no other cell is in its cross population (e.g. its library is alone in
   its dataset) -- the level does not apply to it (plots label it ``n/a``);
2. ``"orphan"``: ``n_c == 0`` -- no neighbour from another library / dataset (not integrated);
   judged from the graph alone, so also for cells without marker signal;
3. ``"no_marker_signal"``: the cell's marker profile is constant -- in practice no marker counts
   at all (all markers equal is the rare other case) -- so no correlation with it is defined and
   the rules below cannot judge it. A property of the data, not of the embedding: its share
   (``frac_no_marker_signal_<level>``, and ``frac_no_marker_signal`` over all cells in
   :func:`evaluation.neighbourhood.neighbourhood_metrics`) says how much of the data the
   correlation-based modes leave unjudged;
4. ``"noisy"``: the cell has same-library neighbours but ``w < HIGH_CORR`` (or ``w`` undefined) --
   even its own-library neighbourhood does not share its markers, so its cross-batch placement
   cannot be judged (low-quality cell or locally unstructured embedding);
5. ``"ideal"``: ``c >= max(HIGH_CORR, chance)`` -- mixed across batches with cells that express
   the same markers;
6. ``"false_merge"``: ``c <= chance`` (or ``c`` undefined) -- its cross-batch neighbours are no
   more similar to it than random cells: merged with a different population (over-correction);
7. ``"merged"``: in between (``chance < c < max(HIGH_CORR, chance)``) -- mixed with cross-batch
   cells that share its markers only partly (e.g. related subtypes merged).

``chance`` is the median ``corr_avg`` of the same mask on the degree-matched random graph (mean
over repeats), or ``CHANCE_CORR_FALLBACK`` when no random baseline was computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from evaluation.nc_baselines import isolation_ratio

FAILURE_MODES = ("orphan", "ideal", "merged", "noisy", "false_merge", "no_marker_signal")
HIGH_CORR = 0.5  # corr_avg at or above which a neighbourhood "expresses the same markers"
CHANCE_CORR_FALLBACK = 0.0  # chance-level corr_avg when no random baseline is available

LIB_WEIGHTS = (0.4, 0.3, 0.3)  # H3 (or H7), 1 − clip(H5 (or H9), 0, 2), H11 (or H12)
TOTAL_WEIGHTS = (0.6, 0.4)  # H1, composite_batch


def failure_modes(
    corr_within: np.ndarray,
    n_within: np.ndarray,
    corr_cross: np.ndarray,
    n_cross: np.ndarray,
    population_cross: np.ndarray,
    profile_ok: np.ndarray,
    chance: float = CHANCE_CORR_FALLBACK,
    high: float = HIGH_CORR,
) -> pd.Categorical:
    """Per-cell failure mode at one level (rules in the module docstring).

    Parameters
    ----------
    corr_within, n_within
        ``(n_cells,)`` ``corr_avg_same_library`` and ``n_same_library``.
    corr_cross, n_cross
        ``(n_cells,)`` ``corr_avg`` and neighbour count of the level's cross mask.
    population_cross
        ``(n_cells,)`` size of each cell's cross population (``NaN`` = undefined).
    profile_ok
        ``(n_cells,)`` bool, False for constant marker profiles.
    chance
        Chance-level ``corr_avg`` of the cross mask (``NaN`` → ``CHANCE_CORR_FALLBACK``).
    high
        The "high correlation" threshold.

    Returns
    -------
    pandas.Categorical
        ``(n_cells,)`` with categories ``FAILURE_MODES``; missing where the level does not apply
        (empty cross population).
    """
    chance = CHANCE_CORR_FALLBACK if not np.isfinite(chance) else float(chance)
    ideal_at = max(high, chance)
    applicable = np.nan_to_num(population_cross) > 0
    orphan = applicable & (np.asarray(n_cross) == 0)
    no_signal = applicable & ~orphan & ~np.asarray(profile_ok, bool)
    rest = applicable & ~orphan & ~no_signal
    noisy = rest & (np.asarray(n_within) > 0) & ~(np.asarray(corr_within) >= high)
    judged = rest & ~noisy
    ideal = judged & (np.asarray(corr_cross) >= ideal_at)
    false_merge = judged & ~ideal & ~(np.asarray(corr_cross) > chance)
    merged = judged & ~ideal & ~false_merge
    conditions = [orphan, no_signal, noisy, ideal, false_merge, merged]
    names = ["orphan", "no_marker_signal", "noisy", "ideal", "false_merge", "merged"]
    values = np.select(conditions, names, default="")
    return pd.Categorical(np.where(values == "", None, values), categories=FAILURE_MODES)


def weighted_nanmean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean skipping ``NaN`` values, weights renormalised over the rest.

    Parameters
    ----------
    values, weights
        Equal-length sequences.

    Returns
    -------
    float
        ``NaN`` if every value is ``NaN``.
    """
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any() or w[ok].sum() == 0:
        return np.nan
    return float((v[ok] * w[ok]).sum() / w[ok].sum())


def composite_scores(h: Mapping[str, float]) -> dict[str, float]:
    """Composite scores from the headline numbers.

    ``lib = 0.4 H3 + 0.3 (1 − clip(H5, 0, 2)) + 0.3 H11``; ``ds`` likewise with H7 / H9 / H12;
    ``batch = mean(lib, ds)``; ``total = 0.6 H1 + 0.4 batch``. ``NaN`` components are skipped and
    the remaining weights renormalised.

    H5 / H9 are the isolation ratios ``o / (e + τ)`` of eq. ISO
    (:mod:`evaluation.nc_baselines`), so the isolation term ``1 − clip(H5, 0, 2)`` lies in
    [−1, 1] (+1 = nobody isolated, 0 = as isolated as random / as ``τ``, −1 = twice that or
    worse) and moves by at most ``1 / (n τ)`` when one of ``n`` cells becomes isolated: the
    composite total by at most ``0.4 · 0.3 / (n τ)``.

    Parameters
    ----------
    h
        Headline dict with keys ``H1_…``, ``H3_…``, ``H5_…``, ``H7_…``, ``H9_…``, ``H11_…``,
        ``H12_…`` (as produced by :func:`evaluation.neighbourhood.headline_numbers`).

    Returns
    -------
    dict
        ``composite_lib``, ``composite_ds``, ``composite_batch``, ``composite_total``.
    """

    def get(prefix: str) -> float:
        key = next((k for k in h if k.startswith(prefix + "_")), None)
        return np.nan if key is None else float(h[key])

    def level(corr: str, iso: str, overlap: str) -> float:
        iso_term = 1.0 - np.clip(get(iso), 0.0, 2.0)
        return weighted_nanmean([get(corr), iso_term, get(overlap)], LIB_WEIGHTS)

    lib = level("H3", "H5", "H11")
    ds = level("H7", "H9", "H12")
    batch = weighted_nanmean([lib, ds], [1.0, 1.0])
    total = weighted_nanmean([get("H1"), batch], TOTAL_WEIGHTS)
    return {
        "composite_lib": lib,
        "composite_ds": ds,
        "composite_batch": batch,
        "composite_total": total,
    }


def stratified_summary(
    per_cell: pd.DataFrame, by: Mapping[str, np.ndarray], masks: Sequence[str]
) -> pd.DataFrame:
    """Per-group summary of the per-cell table.

    Parameters
    ----------
    per_cell
        ``(n_cells, …)`` table from :func:`evaluation.neighbourhood.neighbourhood_metrics`.
    by
        ``{column: (n_cells,) labels}`` to group by (cells with a missing label are dropped).
    masks
        Masks present in ``per_cell``.

    Returns
    -------
    pandas.DataFrame
        One row per group: the group column(s), ``n_cells``, and per mask ``median_corr_avg_<m>``,
        ``median_r_mean_<m>``, ``mean_frac_<m>``, ``isolated_<m>`` (observed isolated fraction),
        ``expected_isolated_<m>``, ``isolation_norm_<m>`` (eq. ISO of
        :mod:`evaluation.nc_baselines` on the group's cells); per failure-mode level
        ``frac_<mode>_<level>`` (fraction of the cells with a defined mode); and
        ``frac_no_marker_signal`` (fraction of all the group's cells without marker signal) when
        ``per_cell`` has the boolean ``no_marker_signal`` column.
    """
    cols: dict[str, pd.Series] = {}
    for m in masks:
        cols[f"median_corr_avg_{m}"] = per_cell[f"corr_avg_{m}"]
        cols[f"median_r_mean_{m}"] = per_cell[f"r_mean_{m}"]
        cols[f"mean_frac_{m}"] = per_cell[f"frac_{m}"]
        expected = per_cell[f"expected_isolated_{m}"]
        cols[f"isolated_{m}"] = (per_cell[f"n_{m}"] == 0).astype(float).where(expected.notna())
        cols[f"expected_isolated_{m}"] = expected
    if "no_marker_signal" in per_cell:
        cols["frac_no_marker_signal"] = per_cell["no_marker_signal"].astype(float)
    for col in per_cell.columns:
        if col.startswith("failure_mode_"):
            level = col.removeprefix("failure_mode_")
            fm = per_cell[col]
            for mode in FAILURE_MODES:
                cols[f"frac_{mode}_{level}"] = (fm == mode).astype(float).where(fm.notna())
    frame = pd.DataFrame(cols, index=per_cell.index)
    keys = [
        pd.Series(np.asarray(v, dtype=object), index=per_cell.index, name=k) for k, v in by.items()
    ]
    grouped = frame.groupby(keys, dropna=True, sort=True)
    medians = [c for c in frame.columns if c.startswith("median_")]
    out = pd.concat(
        [
            grouped.size().rename("n_cells"),
            grouped[medians].median(),
            grouped[[c for c in frame.columns if c not in medians]].mean(),
        ],
        axis=1,
    )
    for m in masks:
        out[f"isolation_norm_{m}"] = isolation_ratio(
            out[f"isolated_{m}"], out[f"expected_isolated_{m}"]
        )
    return out.reset_index()
