"""Reference mapping: a query model that shares a trained reference's weights (scArches-style).

:func:`build_query` backs :meth:`regvi.RegVI.load_query_data` and
:meth:`regvi.RegMultiVI.load_query_data`; the parameter growth and the freeze are in
:mod:`regvi.map.grow`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from regvi.checks import check_bool
from regvi.data import CovariateRegistry, get_counts, validate_counts
from regvi.data.modalities import modality_covariates, modality_dict, select_modalities, shared_obs
from regvi.data.registry import MODEL_PURPOSES
from regvi.io import load
from regvi.map.grow import (
    TRAINABLE,
    KeyGrowth,
    QueryFreeze,
    QueryParts,
    align_genes,
    extend_registry,
    grow_module,
    growth_of,
    init_new_categories,
    trainable_masks,
)
from regvi.multimodule import MultiModuleConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- model
@dataclass
class QuerySetup:
    """What :meth:`regvi.RegVI.load_query_data` records on the query model for ``train()``."""

    parts: QueryParts
    fine_tune: tuple[str, ...]
    #: key → categories the query added to the reference's
    added_categories: dict[str, list[str]]

    def trains_anything(self) -> bool:
        """Whether ``train()`` has any entry to fit: a new category's terms or a fine-tuned
        part (a query of only known categories without ``fine_tune`` has none)."""
        if "encoder" in self.fine_tune:
            return True
        masks = trainable_masks(self.parts, self.fine_tune)
        return any(m is None or bool(m.any()) for m in masks.values())

    def freeze(self, module: torch.nn.Module) -> QueryFreeze:
        """Freeze ``module`` to what this query trains (see :class:`QueryFreeze`)."""
        masks = trainable_masks(self.parts, self.fine_tune)
        return QueryFreeze(module, masks, train_encoder="encoder" in self.fine_tune)


def check_fine_tune(fine_tune: str | Sequence[str] | None) -> tuple[str, ...]:
    """``fine_tune`` as a tuple of ``"conditioning"`` / ``"encoder"`` (refused otherwise)."""
    if fine_tune is None:
        return ()
    values = (fine_tune,) if isinstance(fine_tune, str) else tuple(fine_tune)
    bad = [v for v in values if v not in TRAINABLE[1:]]
    if bad:
        raise ValueError(
            f"fine_tune={fine_tune!r}: unknown {bad}; expected some of {list(TRAINABLE[1:])} "
            "(the new categories' technical terms always train)"
        )
    return values


def resolve_reference(reference: Any, expected: type) -> Any:
    """A trained reference model of class ``expected`` (a path or MLflow URI is loaded)."""
    if isinstance(reference, (str, os.PathLike)):
        reference = load(reference)
    if not isinstance(reference, expected):
        raise TypeError(
            f"reference must be a trained {expected.__name__} (or its directory / MLflow URI); "
            f"got {type(reference).__name__}"
        )
    if not reference.is_trained:
        raise ValueError("the reference model is not trained; train it before mapping a query")
    return reference


def build_query(
    cls: type,
    reference: Any,
    data: Any,
    allow_missing_genes: bool = False,
    fine_tune: str | Sequence[str] | None = None,
) -> Any:
    """The query model (a ``cls``) of :meth:`regvi.RegVI.load_query_data` (``data``: an
    AnnData) or :meth:`regvi.RegMultiVI.load_query_data` (a MuData or dict of AnnData)."""
    multimodal = cls.config_class is MultiModuleConfig
    if not multimodal and not isinstance(data, AnnData):
        raise TypeError(f"adata must be an AnnData; got {type(data).__name__}")
    check_bool("allow_missing_genes", allow_missing_genes)
    tune = check_fine_tune(fine_tune)
    reference = resolve_reference(reference, cls)
    build = _multimodal_query if multimodal else _single_query
    model, parts, added = build(cls, reference, data, allow_missing_genes)
    model.query = QuerySetup(parts, tune, added)
    return model


def _single_query(
    cls: type, reference: Any, adata: AnnData, allow_missing_genes: bool
) -> tuple[Any, QueryParts, dict[str, list[str]]]:
    """The single-modal query model, its grown parts and the categories it added."""
    ref_reg = reference.registry
    aligned = align_genes(adata, ref_reg.var_names, ref_reg.layer, allow_missing_genes)
    registry, added = extend_registry(ref_reg, aligned.obs)
    X = get_counts(aligned, registry.layer)
    where = "query adata.X" if registry.layer is None else f"query adata.layers[{registry.layer!r}]"
    summary = validate_counts(X, where, reference.setup_kwargs.get("allow_non_integer", False))
    cov = registry.encode(aligned.obs, MODEL_PURPOSES)
    config = replace(
        reference.config,
        n_cats_decoder=registry.n_categories("nn_conditioning"),
        n_cats_encoder=registry.n_categories("encoder"),
        n_ambient_per_key=registry.n_categories("ambient"),
        n_dispersion_groups=registry.n_categories("dispersion")[0],
        n_library_groups=registry.n_categories("library_size")[0],
        n_scaling_per_key=registry.n_categories("feature_scaling"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(reference.seed)
        module = cls.module_from_config(config)
    growth = {
        p: growth_of(ref_reg, registry, ref_reg.keys_for(p)) for p in ("nn_conditioning", "encoder")
    }
    parts = grow_module(reference.module, module, growth)
    n_old = {p: ref_reg.n_categories(p) for p in MODEL_PURPOSES}
    init_new_categories(
        module, X, cov, n_old, reference.setup_kwargs.get("dispersion_init", "prior")
    )
    module.eval()
    model = cls.assemble(
        registry, config, module, dict(reference.setup_kwargs), is_trained=reference.is_trained
    )
    model.adata, model._X, model._covariates, model.count_summary = aligned, X, cov, summary
    logger.info("query: new categories %s", {k: len(v) for k, v in added.items()})
    return model, parts, added


def _query_modalities(
    data: Any, reference: Any, allow_missing_genes: bool
) -> tuple[dict[str, AnnData], list[str]]:
    """Query modality → AnnData for every reference modality; absent ones as zero counts.

    Returns the dict and the names of the modalities the query lacks (its cells then miss
    them, as cells without a modality do in training).
    """
    given = modality_dict(data)
    unknown = sorted(set(given) - set(reference.modalities))
    if unknown:
        raise KeyError(
            f"query modalities {unknown} are not in the reference (modalities "
            f"{reference.modalities})"
        )
    if not given:
        raise ValueError(f"the query holds no modality; expected some of {reference.modalities}")
    present = select_modalities(given, None) if len(given) > 1 else dict(given)
    index = next(iter(present.values())).obs_names
    if not index.is_unique:
        dup = index[index.duplicated()][:5].tolist()
        raise ValueError(f"query obs_names are not unique (e.g. {dup})")
    out: dict[str, AnnData] = {}
    absent = []
    for m in reference.modalities:
        if m in present:
            out[m] = align_genes(
                present[m], reference.var_names[m], reference.layers.get(m), allow_missing_genes
            )
            continue
        absent.append(m)
        empty = sp.csr_matrix((len(index), len(reference.var_names[m])), dtype=np.float32)
        layer = reference.layers.get(m)
        a = AnnData(obs=pd.DataFrame(index=index), var=pd.DataFrame(index=reference.var_names[m]))
        if layer is None:
            a.X = empty
        else:
            a.layers[layer] = empty
        out[m] = a
    return out, absent


def _multimodal_query(
    cls: type, reference: Any, data: Any, allow_missing_genes: bool
) -> tuple[Any, QueryParts, dict[str, list[str]]]:
    """The multimodal query model, its grown parts and the categories it added."""
    given = data if not isinstance(data, Mapping) else dict(data)
    mods, absent = _query_modalities(given, reference, allow_missing_genes)
    ref_reg = reference.registry
    keys = ref_reg.categorical_keys() + ref_reg.keys_for("continuous")
    present_mods = {m: a for m, a in mods.items() if m not in absent}
    wanted = [k for k in keys if any(k in a.obs.columns for a in present_mods.values())]
    obs_source = given if not isinstance(given, Mapping) else present_mods
    obs = shared_obs(obs_source, present_mods, sorted(set(wanted)))
    registry, added = extend_registry(ref_reg, obs)
    Xs, summaries = {}, {}
    for m, a in mods.items():
        X = get_counts(a, reference.layers.get(m))
        if m not in absent:
            allow = reference.setup_kwargs.get("allow_non_integer", {}).get(m, False)
            summaries[m] = validate_counts(X, f"query modality {m!r} counts", allow)
        Xs[m] = X
    cov = registry.encode(obs, MODEL_PURPOSES)
    old_cfg = reference.config
    configs, growth, n_old = {}, {}, {}
    for m in old_cfg.modalities:
        off = set(old_cfg.disabled_covariates.get(m, ()))

        def groups(purpose: str, reg: CovariateRegistry, off: set[str] = off) -> list[int]:
            return [] if purpose in off else reg.n_categories(purpose)

        configs[m] = replace(
            old_cfg.configs[m],
            n_cats_decoder=groups("nn_conditioning", registry),
            n_cats_encoder=groups("encoder", registry),
            n_ambient_per_key=groups("ambient", registry) or [1],
            n_dispersion_groups=(groups("dispersion", registry) or [1])[0],
            n_library_groups=(groups("library_size", registry) or [1])[0],
            n_scaling_per_key=groups("feature_scaling", registry),
        )
        growth[m] = {
            p: KeyGrowth(groups(p, ref_reg), groups(p, registry))
            for p in ("nn_conditioning", "encoder")
        }
        n_old[m] = {
            "ambient": groups("ambient", ref_reg) or [1],
            "dispersion": groups("dispersion", ref_reg) or [1],
            "library_size": groups("library_size", ref_reg) or [1],
        }
    config = replace(old_cfg, configs=configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(reference.seed)
        module = cls.module_from_config(config)
    parts = QueryParts()
    for m in config.modalities:
        grown = grow_module(reference.module.mods[m], module.mods[m], growth[m], f"mods.{m}.")
        parts.technical.update(grown.technical)
        parts.conditioning.update(grown.conditioning)
        parts.encoder_columns.update(grown.encoder_columns)
        if m not in absent:
            cov_m = modality_covariates(cov, old_cfg.disabled_covariates.get(m, []))
            dispersion_init = reference.setup_kwargs.get("dispersion_init", "prior")
            init_new_categories(module.mods[m], Xs[m], cov_m, n_old[m], dispersion_init)
    module.eval()
    model = cls.assemble(
        registry,
        config,
        module,
        dict(reference.setup_kwargs),
        var_names=reference.var_names,
        layers=reference.layers,
        is_trained=reference.is_trained,
    )
    model._Xs, model._covariates, model._obs, model.mdata = Xs, cov, obs, mods
    model.count_summary = summaries
    return model, parts, added
