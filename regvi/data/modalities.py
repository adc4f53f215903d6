"""Paired modalities as data: modality → AnnData dicts, shared cell metadata, and the covariate
codes each modality sees (used by :class:`regvi.RegMultiVI` and reference mapping)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

#: purposes that group cells (switched off for a modality: one group for all its cells)
GROUP_PURPOSES = ("ambient", "dispersion", "library_size", "feature_scaling")


def modality_dict(data: Any) -> dict[str, AnnData]:
    try:
        from mudata import MuData
    except ImportError:  # pragma: no cover - mudata is a dependency
        MuData = ()  # type: ignore[assignment]
    if isinstance(data, MuData):
        mods = dict(data.mod)
    elif isinstance(data, Mapping):
        mods = dict(data)
    else:
        raise TypeError(
            f"RegMultiVI needs a MuData or a dict of AnnData (modality → AnnData); got "
            f"{type(data).__name__}"
        )
    for m, a in mods.items():
        if not isinstance(m, str) or not m:
            raise TypeError(f"modality names must be non-empty strings; got {m!r}")
        if not isinstance(a, AnnData):
            raise TypeError(f"modality {m!r} is a {type(a).__name__}; expected an AnnData")
    return mods


def select_modalities(data: Any, modalities: Sequence[str] | None) -> dict[str, AnnData]:
    """Modality → AnnData, sorted by name, checked to hold the same cells in the same order.

    Raises a clear error for an unknown / missing modality, fewer than two modalities, duplicate
    cell names, or modalities whose ``obs_names`` differ (naming cells and modalities).
    """
    mods = modality_dict(data)
    if modalities is None:
        names = sorted(mods)
    else:
        if isinstance(modalities, str):
            modalities = [modalities]
        missing = [m for m in modalities if m not in mods]
        if missing:
            raise KeyError(
                f"modalities {missing} not in the data; available modalities: {sorted(mods)}"
            )
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities={list(modalities)} lists a modality more than once")
        names = sorted(modalities)
    if len(names) < 2:
        raise ValueError(
            f"RegMultiVI needs at least 2 modalities; got {names} (use regvi.RegVI for one)"
        )
    ref_name = names[0]
    ref = mods[ref_name].obs_names
    if not ref.is_unique:
        dup = ref[ref.duplicated()][:5].tolist()
        raise ValueError(f"modality {ref_name!r} has duplicate obs_names, e.g. {dup}")
    for m in names[1:]:
        other = mods[m].obs_names
        if len(other) == len(ref) and (other == ref).all():
            continue
        only_ref = ref.difference(other)
        only_other = other.difference(ref)
        if len(only_ref) == 0 and len(only_other) == 0:
            raise ValueError(
                f"modalities {ref_name!r} and {m!r} hold the same cells in a different order; "
                "RegMultiVI needs paired cells in the same order (reorder one modality with "
                "adata[other.obs_names])"
            )
        raise ValueError(
            f"modalities {ref_name!r} ({len(ref)} cells) and {m!r} ({len(other)} cells) have "
            f"different obs_names: {len(only_ref)} cells only in {ref_name!r} (e.g. "
            f"{only_ref[:3].tolist()}), {len(only_other)} only in {m!r} (e.g. "
            f"{only_other[:3].tolist()}). Paired data needs the same cells in every modality "
            "(subset to the shared cells, e.g. mudata.pp.intersect_obs)"
        )
    return {m: mods[m] for m in names}


def shared_obs(data: Any, mods: Mapping[str, AnnData], keys: Sequence[str]) -> pd.DataFrame:
    """Cell metadata holding ``keys``, from the MuData's global obs or the modalities' obs.

    A key present in several modalities must have the same values in each.
    """
    index = next(iter(mods.values())).obs_names
    out = pd.DataFrame(index=index)
    global_obs = getattr(data, "obs", None) if not isinstance(data, Mapping) else None
    for key in keys:
        if global_obs is not None and key in global_obs.columns:
            out[key] = global_obs.loc[index, key].to_numpy()
            continue
        holders = [m for m, a in mods.items() if key in a.obs.columns]
        if not holders:
            available = sorted({c for a in mods.values() for c in a.obs.columns})
            raise KeyError(
                f"no modality's obs has column {key!r} (looked in {list(mods)}); available "
                f"columns: {available[:20]}"
            )
        first = mods[holders[0]].obs[key]
        for m in holders[1:]:
            other = mods[m].obs[key]
            if not (first.astype(str).to_numpy() == other.astype(str).to_numpy()).all():
                raise ValueError(
                    f"obs column {key!r} differs between modalities {holders[0]!r} and {m!r}; "
                    "covariates are per cell and must agree across modalities"
                )
        out[key] = first.to_numpy()
        if isinstance(first.dtype, pd.CategoricalDtype):
            out[key] = pd.Categorical(out[key], categories=first.cat.categories)
    return out


def modality_covariates(
    cov: Mapping[str, np.ndarray], disabled: Sequence[str]
) -> dict[str, np.ndarray]:
    """Covariate codes as one modality sees them (switched-off purposes → one group / none)."""
    out = dict(cov)
    for purpose in disabled:
        if purpose in GROUP_PURPOSES:
            out[purpose] = np.zeros((len(cov[purpose]), 1), dtype=np.int64)
        else:  # continuous, nn_conditioning, encoder: no inputs
            out[purpose] = cov[purpose][:, :0]
    return out
