"""Fixed, seeded, stratified evaluation subsample (so trials are scored on the same cells)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def stratified_subsample(
    obs: pd.DataFrame, strata_keys: Sequence[str], n: int | None = 20_000, seed: int = 0
) -> np.ndarray:
    """Indices of a stratified subsample of ``n`` cells (all cells when ``n`` is None or ≥ n_obs).

    Each stratum (combination of ``strata_keys``, e.g. label × library) gets a share proportional
    to its size (largest-remainder rounding), at least one cell where possible; within a stratum
    cells are drawn uniformly with ``seed``. The result is sorted, so it does not depend on the
    order strata are visited.

    Parameters
    ----------
    obs
        Cell metadata.
    strata_keys
        Columns defining strata (missing columns raise ``KeyError``).
    n
        Target number of cells.
    seed
        Random seed.
    """
    n_obs = len(obs)
    if n is None or n >= n_obs:
        return np.arange(n_obs)
    if n < 1:
        raise ValueError(f"subsample size n={n}; expected a positive integer or None")
    missing = [k for k in strata_keys if k not in obs.columns]
    if missing:
        raise KeyError(f"subsample strata keys {missing} not in obs columns {list(obs.columns)}")
    if strata_keys:
        labels = obs[list(strata_keys)].astype(str).agg("|".join, axis=1).to_numpy()
    else:
        labels = np.zeros(n_obs, dtype=str)
    names, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    quota = sizes * n / n_obs
    take = np.floor(quota).astype(int)
    remainder = n - take.sum()
    if remainder > 0:
        take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
    # guarantee at least one cell per stratum when the budget allows
    empty = (take == 0) & (sizes > 0)
    while empty.any() and take.sum() < n + empty.sum():
        donor = int(np.argmax(take))
        if take[donor] <= 1:
            break
        receiver = int(np.flatnonzero(empty)[0])
        take[donor] -= 1
        take[receiver] = 1
        empty[receiver] = False
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(inverse == s), size=min(take[s], sizes[s]), replace=False)
        for s in range(len(names))
    ]
    return np.sort(np.concatenate(chosen))
