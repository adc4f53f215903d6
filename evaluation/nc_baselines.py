"""Baselines for the neighbourhood-correlation metrics
(docs/evaluation.md#neighbourhood-correlation).

- :func:`degree_matched_random_graph`: every cell keeps its number of neighbours and its row of
  connectivity weights, but the neighbours are drawn uniformly at random (without replacement,
  never itself), seeded. Scoring it like the real graph gives the chance level of every metric.
- :func:`expected_isolation`: analytic probability that a cell with ``k_i`` neighbours has none
  in a mask whose population is a fraction ``p_i`` of the other cells: ``(1 − p_i) ** k_i``.
- :func:`isolation_norm`: observed isolated fraction over the expected one regularised by an
  isolation tolerance, ``o / (e + τ)`` (eq. ISO below; below 1 = better than random).
- :func:`histogram_overlap`: overlap of two normalised histograms (50 bins on [−1, 1]).

Isolation ratio (eq. ISO). With ``o`` the observed fraction of cells that have no neighbour in a
mask and ``e`` the mean of :func:`expected_isolation` over the same cells (the fraction a random
graph of the same degrees would isolate)::

    isolation_norm = o / (e + τ),    τ = ISOLATION_TOLERANCE = 0.01

The spec's plain ratio ``o / e`` is singular for common populations: ``e = (1 − p)^k`` is about
1e-15 for ``p = 1/2, k = 50``, so a single isolated cell turns ``o / e`` from 0 into 1e12 and the
composite term ``1 − clip(o / e, 0, 2)`` from +1 into −1. Adding the tolerance to the expected
fraction only (a floor on the denominator, not a pseudo-count on both sides):

- keeps ``o = 0 → 0`` (term +1), so an embedding that isolates nobody scores as before;
- tends to ``o / e`` where ``e ≫ τ`` (rare populations: the spec's "relative to random" reading);
- tends to ``o / τ`` where ``e ≪ τ``: the isolated fraction in units of one percent of the cells
  (1 % isolated = chance level, ≥ 2 % = the clipped worst case);
- is Lipschitz in ``o`` with constant ``1 / τ``: one more isolated cell among ``n`` moves it by at
  most ``1 / (n τ)`` (0.005 for the default 20 000-cell evaluation subsample).

A pseudo-count on both sides, ``(o + τ) / (e + τ)``, would be as smooth but would map "nobody
isolated, nobody expected" to 1 (chance level), moving every well-integrated embedding's term
from +1 to 0; the floor keeps that case at +1.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MAX_REDRAW_ROUNDS = 10_000
#: ``τ`` of eq. ISO: an isolated fraction this large counts as chance level even where random
#: neighbours would isolate nobody (one percent of the cells).
ISOLATION_TOLERANCE = 0.01


def _duplicate_edges(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(n_edges,)`` True for every repeat (all but the first) of a (row, col) pair."""
    order = np.lexsort((cols, rows))
    r, c = rows[order], cols[order]
    dup = np.zeros(rows.size, dtype=bool)
    dup[order[1:]] = (r[1:] == r[:-1]) & (c[1:] == c[:-1])
    return dup


def degree_matched_random_graph(connectivities, seed: int = 0) -> sp.csr_matrix:
    """A random graph with the same per-row neighbour count and weights.

    Parameters
    ----------
    connectivities
        ``(n_cells, n_cells)`` sparse neighbour weights, self removed.
    seed
        Seed of the random targets.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(n_cells, n_cells)``: row ``i`` has the same stored weights as row ``i`` of the input,
        on distinct random columns ``!= i`` (not symmetric).
    """
    W = sp.csr_matrix(connectivities, dtype=np.float64)
    W.setdiag(0)
    W.eliminate_zeros()
    n = W.shape[0]
    degree = np.diff(W.indptr)
    if degree.max(initial=0) > n - 1:
        raise ValueError("a row has more neighbours than there are other cells")
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n, dtype=np.int64), degree)

    def draw(r: np.ndarray) -> np.ndarray:
        c = rng.integers(0, max(n - 1, 1), size=r.size)
        return c + (c >= r)  # skip self

    cols = draw(rows)
    active = np.flatnonzero(degree > 0)
    for _ in range(MAX_REDRAW_ROUNDS):  # rounds of redrawing repeated targets, not cells
        edge_sel = (
            np.flatnonzero(np.isin(rows, active)) if active.size < n else np.arange(rows.size)
        )
        dup = _duplicate_edges(rows[edge_sel], cols[edge_sel])
        if not dup.any():
            break
        redo = edge_sel[dup]
        cols[redo] = draw(rows[redo])
        active = np.unique(rows[redo])
    else:
        raise RuntimeError("could not draw distinct random neighbours")
    out = sp.csr_matrix((W.data.copy(), cols, W.indptr.copy()), shape=(n, n))
    out.sort_indices()
    return out


def expected_isolation(population: np.ndarray, n_cells: int, degree: np.ndarray) -> np.ndarray:
    """Probability that none of a cell's neighbours falls in the mask's population.

    Parameters
    ----------
    population
        ``(n_cells,)`` number of other cells in the mask's population (may be ``NaN``).
    n_cells
        Total number of cells; ``p_i = population_i / (n_cells − 1)``.
    degree
        ``(n_cells,)`` number of neighbours ``k_i``.

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` ``(1 − p_i) ** k_i``.
    """
    p = np.asarray(population, dtype=np.float64) / max(n_cells - 1, 1)
    return np.clip(1.0 - p, 0.0, 1.0) ** np.asarray(degree, dtype=np.float64)


def isolation_ratio(observed, expected, tolerance: float = ISOLATION_TOLERANCE):
    """Eq. ISO of the module docstring: ``observed / (expected + tolerance)``.

    Parameters
    ----------
    observed
        Observed isolated fraction(s) ``o`` in [0, 1] (float, array or Series; ``NaN`` passes
        through).
    expected
        Expected isolated fraction(s) ``e`` in [0, 1] under random neighbours, same shape.
    tolerance
        ``τ`` > 0: the isolated fraction that counts as chance level where ``e ≈ 0``.

    Returns
    -------
    float or array-like
        ``o / (e + τ)`` (0 = nobody isolated; about 1 = as isolated as random or ``τ``).
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    return observed / (expected + tolerance)


def isolation_norm(
    n_in_mask: np.ndarray,
    expected: np.ndarray,
    population: np.ndarray,
    tolerance: float = ISOLATION_TOLERANCE,
) -> tuple[float, float, float]:
    """Observed vs expected fraction of cells with no neighbour in a mask (eq. ISO).

    Only cells whose population is non-empty (``population > 0``) count: a cell that cannot have
    such a neighbour is isolated by construction and says nothing about the embedding.

    Parameters
    ----------
    n_in_mask
        ``(n_cells,)`` neighbours in the mask.
    expected
        ``(n_cells,)`` output of :func:`expected_isolation`.
    population
        ``(n_cells,)`` population sizes.
    tolerance
        ``τ`` of eq. ISO (see :func:`isolation_ratio`).

    Returns
    -------
    tuple of float
        ``(o, e, o / (e + τ))``: observed and expected isolated fractions and the isolation
        ratio; all ``NaN`` when no cell qualifies.
    """
    use = np.nan_to_num(np.asarray(population, dtype=np.float64), nan=0.0) > 0
    if not use.any():
        return np.nan, np.nan, np.nan
    observed = float(np.mean(np.asarray(n_in_mask)[use] == 0))
    exp = float(np.mean(np.asarray(expected)[use]))
    return observed, exp, float(isolation_ratio(observed, exp, tolerance))


def histogram_overlap(
    a: np.ndarray, b: np.ndarray, bins: int = 50, value_range: tuple[float, float] = (-1.0, 1.0)
) -> float:
    """Overlap ``sum_b min(P_a(b), P_b(b))`` of two normalised histograms.

    Parameters
    ----------
    a, b
        1-d samples (non-finite values ignored).
    bins
        Number of equal-width bins on ``value_range``.
    value_range
        Histogram range.

    Returns
    -------
    float
        In [0, 1] (1 = identical histograms); ``NaN`` if either sample is empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return np.nan
    ha, _ = np.histogram(a, bins=bins, range=value_range)
    hb, _ = np.histogram(b, bins=bins, range=value_range)
    if ha.sum() == 0 or hb.sum() == 0:
        return np.nan
    return float(np.minimum(ha / ha.sum(), hb / hb.sum()).sum())
