"""Purpose-based covariate keys → a registry of categories for training and inference
(docs/model.md#covariate-purposes).

A :class:`CovariateRegistry` records which ``adata.obs`` column serves which purpose, the
categories seen at setup and the standardisation of continuous covariates. It is plain data
(JSON-serialisable), saved next to the model weights, and used to encode new data at inference
with clear errors for missing keys, NaNs and unseen categories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

#: Purposes whose categories enter the model (as parameter groups or network inputs).
MODEL_PURPOSES = (
    "ambient",
    "dispersion",
    "library_size",
    "feature_scaling",
    "nn_conditioning",
    "encoder",
)


def _as_list(keys: str | Sequence[str] | None, name: str) -> list[str] | None:
    if keys is None:
        return None
    if isinstance(keys, str):
        return [keys]
    keys = list(keys)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"{name} must contain obs column names (str); got {k!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}={keys} lists a key more than once")
    return keys


def _single(key: str | None, name: str) -> str | None:
    if key is not None and not isinstance(key, str):
        raise TypeError(f"{name} must be a single obs column name (str); got {key!r}")
    return key


@dataclass(frozen=True)
class CovariateKeys:
    """Which ``adata.obs`` columns serve which covariate purpose
    (docs/model.md#covariate-purposes): the one definition of the covariate-key arguments of
    :meth:`CovariateRegistry.from_anndata`, :class:`regvi.RegVI`, :class:`regvi.RegMultiVI`
    and a sweep config's ``data`` section.

    Values are kept as given; :meth:`resolve` checks them and resolves the fan-out.

    Attributes
    ----------
    library_key, batch_key
        The finest technical unit (``batch_key`` is its alias); alone it fans out to the
        ambient, dispersion, library-size and decoder-conditioning groups.
    ambient_covariate_keys, dispersion_key, library_size_key
        The three purpose keys given one by one, instead of ``library_key``.
    feature_scaling_covariate_keys, nn_conditioning_covariate_keys, encoder_covariate_keys
        The keys of per-feature scaling and of the decoder's and the encoders' one-hot inputs.
    continuous_covariate_keys
        Continuous covariates.
    dataset_key, technical_covariate_keys, labels_key
        Metric-only keys.
    layer
        Layer holding counts (``None`` for ``X``).

    Each is the argument of the same name of :class:`regvi.RegVI`, documented there (defaults,
    fan-out, what the model does with it).
    """

    library_key: str | None = None
    batch_key: str | None = None
    ambient_covariate_keys: str | Sequence[str] | None = None
    dispersion_key: str | None = None
    library_size_key: str | None = None
    feature_scaling_covariate_keys: str | Sequence[str] | None = None
    nn_conditioning_covariate_keys: str | Sequence[str] | None = None
    encoder_covariate_keys: str | Sequence[str] | None = None
    continuous_covariate_keys: str | Sequence[str] | None = None
    dataset_key: str | None = None
    technical_covariate_keys: str | Sequence[str] | None = None
    labels_key: str | None = None
    layer: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The key arguments, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> CovariateKeys:
        """The keys from keyword arguments (a TypeError names unknown ones)."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown covariate key argument(s) {unknown}; expected some of {list(cls.names())}"
            )
        return cls(**kwargs)

    @classmethod
    def split(
        cls, options: Mapping[str, Any], **explicit: Any
    ) -> tuple[CovariateKeys, dict[str, Any]]:
        """The covariate keys among a constructor's keyword ``options`` plus its ``explicit``
        key parameters (``library_key``, ``layer``), and the options that are no key.

        The one place where :class:`regvi.RegVI` and :class:`regvi.RegMultiVI` turn their
        covariate-key arguments into keys; the rest are model options, checked by the model.
        """
        names = set(cls.names())
        keys = {k: v for k, v in options.items() if k in names}
        rest = {k: v for k, v in options.items() if k not in names}
        return cls(**keys, **explicit), rest

    def as_kwargs(self) -> dict[str, Any]:
        """The keys as keyword arguments (inverse of :meth:`from_kwargs`)."""
        return {name: getattr(self, name) for name in self.names()}

    def columns(self) -> list[str]:
        """The obs columns named by any key (all but ``layer``), sorted and unique."""
        wanted = [
            v
            for k, v in self.as_kwargs().items()
            if k != "layer"
            for v in ([v] if isinstance(v, str) else list(v or []))
        ]
        return sorted(set(wanted))

    def resolve(self) -> dict[str, list[str]]:
        """Purpose → obs keys, with the ``library_key`` fan-out and the defaults applied.

        ``library_key`` alone fans out to the ambient, dispersion and library-size groups and,
        unless ``nn_conditioning_covariate_keys`` is given (``[]`` for none: a batch-free
        decoder), to decoder conditioning; feature scaling and the encoder keys default to the
        decoder-conditioning keys; ``batch_key`` is an alias. Combining it with an
        explicit ambient / dispersion / library-size key is an error; without it, all three must
        be given.
        """
        library_key, ambient, dispersion_key, library_size_key = self._library_groups()
        nn_cond = _as_list(self.nn_conditioning_covariate_keys, "nn_conditioning_covariate_keys")
        if nn_cond is None:  # default: the decoder is conditioned on the library(-size) key
            nn_cond = [library_size_key]
        scaling = _as_list(self.feature_scaling_covariate_keys, "feature_scaling_covariate_keys")
        if scaling is None:
            # default = decoder-conditioning keys (docs/model.md#covariate-purposes)
            scaling = list(nn_cond)
        encoder = _as_list(self.encoder_covariate_keys, "encoder_covariate_keys")
        if encoder is None:
            # default = decoder-conditioning keys: the encoder sees what the decoder is told
            # (docs/model.md#covariate-purposes); [] for none
            encoder = list(nn_cond)
        continuous = _as_list(self.continuous_covariate_keys, "continuous_covariate_keys")
        return {
            "library": [library_key] if library_key else [],
            "ambient": ambient or [],
            "dispersion": [dispersion_key] if dispersion_key else [],
            "library_size": [library_size_key] if library_size_key else [],
            "feature_scaling": scaling,
            "nn_conditioning": nn_cond,
            "encoder": encoder or [],
            "continuous": continuous or [],
            "dataset": [dk] if (dk := _single(self.dataset_key, "dataset_key")) else [],
            "technical": _as_list(self.technical_covariate_keys, "technical_covariate_keys") or [],
            "labels": [lk] if (lk := _single(self.labels_key, "labels_key")) else [],
        }

    def _library_groups(self) -> tuple[str | None, list[str] | None, str | None, str | None]:
        """``(library key, ambient keys, dispersion key, library-size key)`` after the fan-out."""
        library_key = _single(self.library_key, "library_key")
        batch_key = _single(self.batch_key, "batch_key")
        if library_key is not None and batch_key is not None and library_key != batch_key:
            raise ValueError(
                f"library_key={library_key!r} and its alias batch_key={batch_key!r} disagree; "
                "give only one of them"
            )
        library_key = library_key or batch_key
        ambient = _as_list(self.ambient_covariate_keys, "ambient_covariate_keys")
        dispersion_key = _single(self.dispersion_key, "dispersion_key")
        library_size_key = _single(self.library_size_key, "library_size_key")
        explicit = {
            "ambient_covariate_keys": ambient,
            "dispersion_key": dispersion_key,
            "library_size_key": library_size_key,
        }
        if library_key is not None:
            given = [k for k, v in explicit.items() if v is not None]
            if given:
                raise ValueError(
                    f"library_key={library_key!r} already sets the ambient, dispersion and "
                    f"library-size groups; do not also give {', '.join(given)} (either use "
                    "library_key alone, or give all three purpose keys without it)"
                )
            return library_key, [library_key], library_key, library_key
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"without library_key (or batch_key), {', '.join(missing)} must be given; "
                "pass library_key=<finest technical unit> to set all three at once"
            )
        return library_key, ambient, dispersion_key, library_size_key


#: The covariate-key arguments (:class:`CovariateKeys` fields; the data section of a sweep
#: config).
REGISTRY_ARGS: tuple[str, ...] = CovariateKeys.names()


@dataclass
class CovariateRegistry:
    """Which obs keys serve which purpose, with recorded categories.

    Attributes
    ----------
    purposes
        Purpose → list of obs keys (``ambient``, ``dispersion``, ``library_size``,
        ``feature_scaling``, ``nn_conditioning``, ``encoder``, ``continuous``, ``dataset``,
        ``technical``, ``labels``, ``library``).
    categories
        obs key → ordered list of category names (as strings) seen at setup.
    continuous_stats
        obs key → ``[mean, std]`` used to standardise that continuous covariate.
    var_names
        Feature names at setup, in order.
    layer
        Layer holding counts (``None`` for ``X``).
    """

    purposes: dict[str, list[str]]
    categories: dict[str, list[str]] = field(default_factory=dict)
    continuous_stats: dict[str, list[float]] = field(default_factory=dict)
    var_names: list[str] = field(default_factory=list)
    layer: str | None = None

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_anndata(
        cls, adata: AnnData, keys: CovariateKeys | None = None, **key_kwargs: Any
    ) -> CovariateRegistry:
        """Resolve the key fan-out (:meth:`CovariateKeys.resolve`) and record categories.

        The keys come as a :class:`CovariateKeys` or as its fields' keyword arguments
        (``library_key=...``), not both.
        """
        if keys is None:
            keys = CovariateKeys.from_kwargs(key_kwargs)
        elif key_kwargs:
            raise TypeError(f"give keys or keyword arguments, not both (got {sorted(key_kwargs)})")
        purposes = keys.resolve()
        obs = adata.obs
        _check_columns(obs, purposes)
        reg = cls(purposes=purposes, var_names=[str(v) for v in adata.var_names], layer=keys.layer)
        reg._record_categories(obs)
        reg._record_continuous(obs)
        if purposes["dataset"]:
            reg._validate_dataset(obs)
        return reg

    def _record_categories(self, obs: pd.DataFrame) -> None:
        """Categories of every categorical key, in the column's order (else sorted)."""
        for key in self.categorical_keys():
            col = obs[key]
            _check_no_nan(col, key)
            if isinstance(col.dtype, pd.CategoricalDtype):
                present = set(col.astype(str))
                cats = [str(c) for c in col.cat.categories if str(c) in present]
            else:
                cats = sorted(pd.unique(col.astype(str)))
            self.categories[key] = cats

    def _record_continuous(self, obs: pd.DataFrame) -> None:
        """Mean and standard deviation (1 when constant) of every continuous covariate."""
        for key in self.purposes["continuous"]:
            col = obs[key]
            if not pd.api.types.is_numeric_dtype(col):
                raise TypeError(
                    f"continuous covariate {key!r} has dtype {col.dtype}; expected numbers"
                )
            values = col.to_numpy(dtype=np.float64)
            n_bad = int(np.count_nonzero(~np.isfinite(values)))
            if n_bad:
                raise ValueError(f"continuous covariate {key!r} has {n_bad} NaN/inf values")
            std = float(values.std())
            self.continuous_stats[key] = [float(values.mean()), std if std > 0 else 1.0]

    def _validate_dataset(self, obs: pd.DataFrame) -> None:
        dataset_key = self.purposes["dataset"][0]
        lib_keys = self.purposes["library"] or self.purposes["library_size"]
        lib_key = lib_keys[0]
        pairs = obs[[lib_key, dataset_key]].astype(str).drop_duplicates()
        counts = pairs.groupby(lib_key)[dataset_key].nunique()
        bad = counts[counts > 1]
        if len(bad):
            offenders = {
                lib: sorted(pairs.loc[pairs[lib_key] == lib, dataset_key]) for lib in bad.index
            }
            shown = "; ".join(f"{lib!r} in {ds}" for lib, ds in list(offenders.items())[:10])
            raise ValueError(
                f"dataset_key={dataset_key!r}: every {lib_key!r} level must belong to exactly one "
                f"dataset, but {len(bad)} belong to several: {shown}"
            )

    # ------------------------------------------------------------------ queries
    def categorical_keys(self) -> list[str]:
        """All categorical keys (every purpose except continuous), sorted, unique."""
        return sorted({k for p, keys in self.purposes.items() if p != "continuous" for k in keys})

    def keys_for(self, purpose: str) -> list[str]:
        """obs keys registered for ``purpose``."""
        return list(self.purposes.get(purpose, []))

    def n_categories(self, purpose: str) -> list[int]:
        """Number of categories of each key of ``purpose``."""
        return [len(self.categories[k]) for k in self.purposes.get(purpose, [])]

    # ------------------------------------------------------------------ inference
    def check_var_names(self, adata: AnnData) -> None:
        """Raise if ``adata``'s features differ from those at setup (names and order)."""
        new = [str(v) for v in adata.var_names]
        if new == self.var_names:
            return
        old_set, new_set = set(self.var_names), set(new)
        missing = [g for g in self.var_names if g not in new_set]
        extra = [g for g in new if g not in old_set]
        if not missing and not extra:
            raise ValueError(
                "adata has the model's features in a different order; reorder with "
                "adata[:, model_var_names] before use"
            )
        raise ValueError(
            f"adata has {len(new)} features but the model was set up with {len(self.var_names)}: "
            f"{len(missing)} model features missing (e.g. {missing[:5]}), {len(extra)} unknown "
            f"features (e.g. {extra[:5]}). Subset/reorder adata to the model's var_names."
        )

    def encode(
        self,
        obs: pd.DataFrame,
        purposes: Sequence[str] = MODEL_PURPOSES,
        category_fallback: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Encode obs columns into integer codes (and standardised continuous values).

        Parameters
        ----------
        obs
            Cell metadata holding the registered keys.
        purposes
            Which purposes to encode; each becomes an ``(n_cells, n_keys)`` int64 array.
        category_fallback
            Optional ``{key: reference_category}``: unseen categories of ``key`` are mapped to
            the reference instead of raising.

        Returns
        -------
        dict
            Purpose → codes, plus ``"continuous"`` → ``(n_cells, n_continuous)`` float32.
        """
        category_fallback = dict(category_fallback or {})
        codes_by_key: dict[str, np.ndarray] = {}
        needed = {k for p in purposes for k in self.purposes.get(p, [])}
        for key in sorted(needed):
            if key not in obs.columns:
                raise KeyError(f"obs has no column {key!r}, which the model was set up with")
            col = obs[key]
            _check_no_nan(col, key)
            cats = self.categories[key]
            codes = pd.Categorical(col.astype(str), categories=cats).codes.astype(np.int64)
            unseen_mask = codes < 0
            if unseen_mask.any():
                unseen = sorted(pd.unique(col.astype(str)[unseen_mask]))
                if key in category_fallback:
                    ref = category_fallback[key]
                    if ref not in cats:
                        raise ValueError(
                            f"category_fallback[{key!r}]={ref!r} is not a known category of "
                            f"{key!r}; known: {cats[:10]}"
                        )
                    codes[unseen_mask] = cats.index(ref)
                else:
                    raise ValueError(
                        f"obs[{key!r}] has categories not seen at setup: {unseen[:10]} "
                        f"({int(unseen_mask.sum())} cells). Known categories: {cats[:10]}. "
                        f"Pass category_fallback={{{key!r}: <known category>}} to map them."
                    )
            codes_by_key[key] = codes
        n = len(obs)
        out: dict[str, np.ndarray] = {}
        for p in purposes:
            keys = self.purposes.get(p, [])
            out[p] = (
                np.stack([codes_by_key[k] for k in keys], axis=1)
                if keys
                else np.zeros((n, 0), dtype=np.int64)
            )
        cont_keys = self.purposes.get("continuous", [])
        cont = np.zeros((n, len(cont_keys)), dtype=np.float32)
        for j, key in enumerate(cont_keys):
            if key not in obs.columns:
                raise KeyError(f"obs has no column {key!r}, which the model was set up with")
            values = obs[key].to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"continuous covariate {key!r} has NaN/inf values")
            mean, std = self.continuous_stats[key]
            cont[:, j] = (values - mean) / std
        out["continuous"] = cont
        return out

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable representation."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CovariateRegistry:
        """Inverse of :meth:`to_dict`."""
        expected = {"purposes", "categories", "continuous_stats", "var_names", "layer"}
        unknown = set(d) - expected
        if unknown or "purposes" not in d:
            raise ValueError(
                f"not a regvi registry: unexpected fields {sorted(unknown)} or no 'purposes'"
            )
        return cls(**{k: d[k] for k in expected if k in d})


def _check_columns(obs: pd.DataFrame, purposes: Mapping[str, list[str]]) -> None:
    """Raise a KeyError naming every key of ``purposes`` that ``obs`` lacks (and its purposes)."""
    all_keys = sorted({k for keys in purposes.values() for k in keys})
    missing_keys = [k for k in all_keys if k not in obs.columns]
    if missing_keys:
        users = {k: [p for p, keys in purposes.items() if k in keys] for k in missing_keys}
        detail = "; ".join(f"{k!r} (for {', '.join(v)})" for k, v in users.items())
        raise KeyError(f"adata.obs has no column {detail}. Available columns: {list(obs.columns)}")


def _check_no_nan(col: pd.Series, key: str) -> None:
    n_nan = int(col.isna().sum())
    if n_nan:
        raise ValueError(
            f"obs[{key!r}] has {n_nan} missing (NaN) values; every cell needs a category"
        )
