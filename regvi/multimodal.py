"""User API of multimodal regvi: :class:`RegMultiVI` (paired RNA + ATAC, or any 2+ modalities).

Data flow: MuData (or a dict of AnnData with identical cells) → one shared covariate registry
over the cell metadata + per-modality counts → :class:`regvi.multimodule.RegMultiVIModule`
(one single-modal module per modality, joint latent) → the shared training loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from regvi.attribution import ModalityAttribution, check_target, modality_attribution
from regvi.base import (
    BaseModel,
    ExpressionOptions,
    InferenceOptions,
    Unpack,
    inference_options,
)
from regvi.checks import check_bool, check_choice, check_float
from regvi.data import CovariateRegistry, MultiCountBatches, get_counts, make_loader
from regvi.data.counts import validate_counts
from regvi.data.modalities import (  # re-exported: regvi.multimodal.select_modalities etc.
    modality_covariates as modality_covariates,
)
from regvi.data.modalities import (
    select_modalities as select_modalities,
)
from regvi.data.modalities import (
    shared_obs as shared_obs,
)
from regvi.data.registry import MODEL_PURPOSES, CovariateKeys
from regvi.io import register_model_class
from regvi.module import ModuleConfig, check_module_options
from regvi.multimodule import (
    LATENT_MODES,
    SWITCHABLE_PURPOSES,
    MultiModuleConfig,
    RegMultiVIModule,
    check_kl_multipliers,
    check_modality_dropout,
    check_poe_sizes,
)

#: Latent dimensions per modality unless given (the joint latent is their sum; RegVI's single
#: latent defaults to 20, see docs/model.md).
MODALITY_N_LATENT = 10
#: Size of the ONE shared latent with ``latent_mode="poe"`` unless given (RegVI's default).
POE_N_LATENT = 20

#: Per-modality defaults by kind of modality (docs/model.md#multimodal-model); other names
#: get ``"other"``.
MODALITY_DEFAULTS: Mapping[str, dict[str, Any]] = {
    "rna": {"use_ambient": True, "use_feature_scaling": False},
    "atac": {
        "use_ambient": False,
        "use_feature_scaling": True,
        "library_centring_sensitivity": 0.2,
    },
    "other": {"use_ambient": False, "use_feature_scaling": True},
}
_RNA_NAMES = ("rna", "gex", "gene", "expression")
_ATAC_NAMES = ("atac", "peak", "chromatin", "accessibility")


def modality_kind(name: str) -> str:
    """``"rna"``, ``"atac"`` or ``"other"``, from the modality name (case-insensitive)."""
    low = name.lower()
    if any(t in low for t in _ATAC_NAMES):
        return "atac"
    if any(t in low for t in _RNA_NAMES):
        return "rna"
    return "other"


def _per_modality(name: str, value: Any, modalities: Sequence[str]) -> dict[str, Any]:
    """Scalar → the same for every modality; dict → checked for unknown modalities."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(modalities))
        if unknown:
            raise KeyError(
                f"{name} has settings for unknown modalities {unknown}; modalities: "
                f"{list(modalities)}"
            )
        return dict(value)
    return {m: value for m in modalities}


def _check_per_modality_options(
    options: Mapping[str, Any],
    allow_non_integer: Any,
    lr_multipliers: Mapping[str, Any] | None,
) -> None:
    """Type-check options given as a scalar or a dict by modality, before any data is read."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            for m, v in value.items():
                try:
                    check_module_options({name: v})
                except (TypeError, ValueError) as err:
                    raise type(err)(f"{err} (modality {m!r})") from None
        else:
            check_module_options({name: value})
    if isinstance(allow_non_integer, Mapping):
        for m, v in allow_non_integer.items():
            check_bool(f"allow_non_integer[{m!r}]", v)
    else:
        check_bool("allow_non_integer", allow_non_integer)
    if lr_multipliers is not None:
        if not isinstance(lr_multipliers, Mapping):
            raise TypeError(f"lr_multipliers={lr_multipliers!r}; expected a dict modality → factor")
        for m, v in lr_multipliers.items():
            check_float(f"lr_multipliers[{m!r}]", v, positive=True)


def _check_disabled_covariates(
    disabled_covariates: Mapping[str, Sequence[str]] | None, names: Sequence[str]
) -> dict[str, list[str]]:
    """Modality → switched-off purposes, checked for unknown modalities and purposes."""
    disabled = {m: list(v) for m, v in (disabled_covariates or {}).items()}
    for m, purposes in disabled.items():
        if m not in names:
            raise KeyError(f"disabled_covariates names unknown modality {m!r}; have {names}")
        if isinstance(purposes, str):
            raise TypeError(f"disabled_covariates[{m!r}] must be a list of purposes")
        bad = sorted(set(purposes) - set(SWITCHABLE_PURPOSES))
        if bad:
            raise ValueError(
                f"disabled_covariates[{m!r}] has unknown purposes {bad}; expected some of "
                f"{list(SWITCHABLE_PURPOSES)}"
            )
    return disabled


def _validated_counts(
    mods: Mapping[str, AnnData], layers: Mapping[str, str | None], allow: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Modality → counts and modality → count summary, validated before anything is built."""
    Xs, summaries = {}, {}
    for m, a in mods.items():
        layer_m = layers.get(m)
        X = get_counts(a, layer_m)
        where = f"modality {m!r} " + ("X" if layer_m is None else f"layers[{layer_m!r}]")
        summaries[m] = validate_counts(X, where, bool(allow.get(m, False)))
        Xs[m] = X
    return Xs, summaries


def _module_configs(
    mods: Mapping[str, AnnData],
    registry: CovariateRegistry,
    sizes: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    disabled: Mapping[str, Sequence[str]],
    latent_mode: str = "concat",
) -> dict[str, ModuleConfig]:
    """Modality → module config: defaults by modality kind, then the options and sizes given
    (scalars or dicts by modality), with the modality's covariate switches applied. Every
    decoder reads the joint latent: the sum of the blocks (``"concat"``) or the one shared z
    (``"poe"``)."""
    names = list(mods)
    sizes = {k: _per_modality(k, v, names) for k, v in sizes.items()}
    options = {k: _per_modality(k, v, names) for k, v in model_kwargs.items()}
    n_lat = {m: sizes["n_latent"].get(m, MODALITY_N_LATENT) for m in names}
    for m, v in n_lat.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"n_latent[{m!r}]={v!r}; expected a positive integer")
    check_poe_sizes(latent_mode, n_lat)
    total_latent = max(n_lat.values()) if latent_mode == "poe" else sum(n_lat.values())
    configs = {}
    for m in names:
        off = set(disabled.get(m, ()))

        def groups(purpose: str, off: set[str] = off) -> list:
            return [] if purpose in off else registry.n_categories(purpose)

        kw: dict[str, Any] = dict(MODALITY_DEFAULTS[modality_kind(m)])
        kw.update({k: v[m] for k, v in options.items() if m in v})
        kw.update({k: v[m] for k, v in sizes.items() if m in v})
        kw["n_latent"] = n_lat[m]  # RegMultiVI's own default (10), not RegVI's
        configs[m] = ModuleConfig(
            n_genes=mods[m].n_vars,
            n_continuous=0 if "continuous" in off else len(registry.keys_for("continuous")),
            n_cats_decoder=groups("nn_conditioning"),
            n_cats_encoder=groups("encoder"),
            n_ambient_per_key=groups("ambient") or [1],
            n_dispersion_groups=(groups("dispersion") or [1])[0],
            n_library_groups=(groups("library_size") or [1])[0],
            n_scaling_per_key=groups("feature_scaling"),
            n_latent_decoder=total_latent,
            **kw,
        )
    return configs


@register_model_class
class RegMultiVI(BaseModel):
    """Multimodal regvi: per-modality encoders, joint latent, one decoder per modality
    (docs/model.md#multimodal-model).

    Parameters
    ----------
    mdata
        MuData, or a dict modality → AnnData, with identical ``obs_names`` (paired cells).
        Counts in ``X`` (or ``layer``); a cell with no counts in a modality is treated as
        missing that modality.
    modalities
        Modalities to use (default: all). They are sorted alphabetically, which fixes the latent
        order: RNA + ATAC gives z = [z_atac ; z_rna].
    library_key, batch_key, ambient_covariate_keys, ...
        Purpose-based covariate keys as in :class:`regvi.RegVI`, looked up in the MuData's
        global obs, else in the modalities' obs (which must agree).
    layer
        Layer with counts: one name, or a dict modality → layer.
    allow_non_integer
        Accept non-integer counts (bool, or dict by modality).
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes, a scalar or a dict by modality (defaults 128 / 10 / 1 / 0.1; with
        ``latent_mode="poe"`` ``n_latent`` is the size of the shared latent, default 20).
    latent_mode
        ``"concat"`` (default): each modality's encoder gives its own latent block and the
        joint latent is z = [z_m1 ; z_m2 ; ...]. ``"poe"``: one shared latent whose posterior
        is the product of the prior and every observed modality's Gaussian encoder (a product
        of experts, docs/model.md#product-of-experts); no per-modality blocks, so no Jacobian
        modality attribution.
    modality_dropout
        Training only: probability that a cell with 2+ observed modalities has one of them
        (uniformly chosen) hidden from the encoders while all are still reconstructed, so each
        modality's latent learns to predict the others (docs/model.md#modality-dropout).
        Default 0 (off).
    data_init, dispersion_init
        As in :class:`regvi.RegVI` (shared by all modalities).
    disabled_covariates
        Modality → purposes to switch off for it, from ``ambient``, ``dispersion``,
        ``library_size``, ``feature_scaling`` (one group), ``nn_conditioning``, ``encoder``,
        ``continuous`` (no input).
    lr_multipliers
        Modality → factor on the learning rate of that modality's parameters.
    kl_multipliers
        Modality → factor on the KL weight of that modality's latent block in the training
        loss (``latent_mode="concat"`` only), e.g. ``{"atac": 0.5}`` lets the ATAC block carry
        information at half the price (docs/model.md#per-modality-kl-weight). Default: 1 each.
    **options
        The covariate keys other than ``library_key`` (keyword arguments, as in
        :class:`regvi.RegVI`), and any :class:`regvi.module.ModuleConfig` option, a scalar or a
        dict by modality.
        Defaults by modality kind (from the name): RNA ambient on, feature scaling off;
        ATAC ambient off, feature scaling on, library centring sensitivity 0.2.
    """

    module_class = RegMultiVIModule
    config_class = MultiModuleConfig

    def __init__(
        self,
        mdata: Any,
        modalities: Sequence[str] | None = None,
        library_key: str | None = None,
        *,
        layer: str | Mapping[str, str | None] | None = None,
        allow_non_integer: bool | Mapping[str, bool] = False,
        n_hidden: int | Mapping[str, int] = 128,
        n_latent: int | Mapping[str, int] | None = None,
        n_layers: int | Mapping[str, int] = 1,
        dropout_rate: float | Mapping[str, float] = 0.1,
        data_init: bool = True,
        dispersion_init: Literal["prior", "data"] = "prior",
        disabled_covariates: Mapping[str, Sequence[str]] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
        kl_multipliers: Mapping[str, float] | None = None,
        latent_mode: Literal["concat", "poe"] = "concat",
        modality_dropout: float = 0.0,
        seed: int = 0,
        **options: Any,
    ):
        # covariates: one registry over the shared cell metadata (the layer is per modality)
        keys, model_kwargs = CovariateKeys.split(options, library_key=library_key, layer=None)
        self._refuse_unknown_options(model_kwargs)
        setup = self._check_setup_options(data_init, dispersion_init, seed)
        check_choice("latent_mode", latent_mode, LATENT_MODES)
        check_modality_dropout(modality_dropout)
        if n_latent is None:
            n_latent = POE_N_LATENT if latent_mode == "poe" else MODALITY_N_LATENT
        mods = select_modalities(mdata, modalities)
        names = list(mods)
        check_kl_multipliers(latent_mode, kl_multipliers or {}, names)
        sizes = {
            "n_hidden": n_hidden,
            "n_latent": n_latent,
            "n_layers": n_layers,
            "dropout_rate": dropout_rate,
        }
        _check_per_modality_options({**sizes, **model_kwargs}, allow_non_integer, lr_multipliers)
        layers = _per_modality("layer", layer, names)
        allow = _per_modality("allow_non_integer", allow_non_integer, names)
        disabled = _check_disabled_covariates(disabled_covariates, names)
        Xs, summaries = _validated_counts(mods, layers, allow)
        obs = shared_obs(mdata, mods, keys.columns())
        self.registry = CovariateRegistry.from_anndata(AnnData(obs=obs), keys)
        self._covariates = self.registry.encode(obs, MODEL_PURPOSES)
        self.config = MultiModuleConfig(
            modalities=names,
            configs=_module_configs(
                mods, self.registry, sizes, model_kwargs, disabled, latent_mode
            ),
            disabled_covariates={m: v for m, v in disabled.items() if v},
            lr_multipliers={m: float(v) for m, v in (lr_multipliers or {}).items()},
            kl_multipliers={m: float(v) for m, v in (kl_multipliers or {}).items()},
            latent_mode=latent_mode,
            modality_dropout=float(modality_dropout),
        )
        self.var_names = {m: [str(v) for v in a.var_names] for m, a in mods.items()}
        self.layers = {m: layers.get(m) for m in names}
        allow_by_modality = {m: bool(allow.get(m, False)) for m in names}
        self.setup_kwargs = {"allow_non_integer": allow_by_modality, **setup}
        self.count_summary = summaries
        self.mdata = mdata
        self._obs = obs
        self._Xs = Xs
        self._reset_training_state()
        self.attribution_: ModalityAttribution | None = None
        self._initialise(self.seed)

    @classmethod
    def assemble(
        cls,
        registry: CovariateRegistry,
        config: MultiModuleConfig,
        module: RegMultiVIModule,
        setup_kwargs: Mapping[str, Any],
        var_names: Mapping[str, Sequence[str]],
        layers: Mapping[str, str | None],
        is_trained: bool = False,
        history: pd.DataFrame | None = None,
    ) -> RegMultiVI:
        """A model from its parts, without data (loading, reference mapping)."""
        model = cls._bare(registry, config, module, setup_kwargs, is_trained, history)
        model.var_names = {m: list(v) for m, v in var_names.items()}
        model.layers = dict(layers)
        model.mdata = None
        model._Xs = None
        model._obs = None
        model._cached_dataset = None
        model.attribution_ = None
        return model

    # ------------------------------------------------------------------ saving (regvi.io)
    @classmethod
    def _saved_parts(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {"var_names": meta["var_names"], "layers": meta.get("layers", {})}

    def saved_meta(self) -> dict[str, Any]:
        """Extra ``config.json`` fields: features and count layer per modality."""
        return {"var_names": self.var_names, "layers": self.layers}

    def _initialise_module(self, cells: np.ndarray | None) -> None:
        # cells without counts in a modality are left out of its statistics
        for m in self.modalities:
            cov_m = modality_covariates(
                self._covariates, self.config.disabled_covariates.get(m, [])
            )
            self._initialise_from_data(self.module.mods[m], self._Xs[m], cov_m, cells)

    # ------------------------------------------------------------------ BaseModel hooks
    @property
    def modalities(self) -> list[str]:
        """Modality names in latent order (alphabetical)."""
        return list(self.config.modalities)

    def _setup_obs(self) -> pd.DataFrame:
        return self._obs

    def _n_features(self) -> int:
        return sum(c.n_genes for c in self.config.configs.values())

    def _dataset(self) -> MultiCountBatches:
        cached = getattr(self, "_cached_dataset", None)
        if cached is None:
            if self._Xs is None:
                raise ValueError("this model was loaded without data; pass mdata=...")
            cached = self._cached_dataset = MultiCountBatches(self._Xs, self._covariates)
        return cached

    # ------------------------------------------------------------------ data
    def check_data(
        self, mdata: Any, category_fallback: Mapping[str, str] | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray], pd.DataFrame]:
        """Validate new data against the model (modalities, features, categories, counts).

        Returns counts by modality, encoded covariates and the shared obs.
        """
        mods = select_modalities(mdata, self.modalities)
        Xs = {}
        for m, a in mods.items():
            names = [str(v) for v in a.var_names]
            if names != self.var_names[m]:
                reg = CovariateRegistry(purposes={}, var_names=self.var_names[m])
                try:
                    reg.check_var_names(a)
                except ValueError as err:
                    raise ValueError(f"modality {m!r}: {err}") from None
            X = get_counts(a, self.layers.get(m))
            allow = self.setup_kwargs.get("allow_non_integer", {}).get(m, False)
            validate_counts(X, f"modality {m!r} X", allow)
            Xs[m] = X
        keys = self.registry.categorical_keys() + self.registry.keys_for("continuous")
        obs = shared_obs(mdata, mods, sorted(set(keys)))
        cov = self.registry.encode(obs, MODEL_PURPOSES, category_fallback)
        return Xs, cov, obs

    def attach(self, mdata: Any) -> None:
        """Attach data to a loaded model after checking modalities, features and categories."""
        Xs, cov, obs = self.check_data(mdata)
        self._Xs, self._covariates, self._obs, self.mdata = Xs, cov, obs, mdata
        self._cached_dataset = None

    def _batches(
        self,
        mdata: Any,
        indices: np.ndarray | None,
        batch_size: int,
        category_fallback: Mapping[str, str] | None = None,
    ):
        if mdata is None or mdata is self.mdata:
            data = self._dataset()
        else:
            Xs, cov, _ = self.check_data(mdata, category_fallback)
            data = MultiCountBatches(Xs, cov)
        idx = np.arange(len(data)) if indices is None else np.asarray(indices)
        return make_loader(data, idx, batch_size, shuffle=False)

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def get_latent_representation(
        self,
        mdata: Any = None,
        *,
        modality: str | None = None,
        give_mean: bool = True,
        **options: Unpack[InferenceOptions],
    ) -> np.ndarray:
        """Joint latent z = [z_m1 ; z_m2 ; ...] (or one modality's block), ``(n_cells, D)``.

        With ``latent_mode="poe"`` the joint latent is the shared z, and ``modality`` gives
        the posterior of z from that modality's data alone (prior × its expert).

        Parameters
        ----------
        mdata
            Data to encode (default: the setup data).
        modality
            Return only this modality's latent block (``"poe"``: its own posterior).
        give_mean
            Posterior mean (default) or one sample.
        **options
            ``indices``, ``batch_size``, ``category_fallback``
            (:class:`regvi.base.InferenceOptions`).
        """
        if modality is not None and modality not in self.modalities:
            raise KeyError(f"modality {modality!r} unknown; modalities: {self.modalities}")
        if modality is not None and self.config.latent_mode == "poe":
            return self._modality_latent(mdata, modality, give_mean, inference_options(options))
        z = self._latent(mdata, give_mean, inference_options(options))
        if modality is not None:
            z = z[:, self.module.slices[modality]]
        return z

    def _modality_latent(
        self, data: Any, modality: str, give_mean: bool, options: InferenceOptions
    ) -> np.ndarray:
        """``latent_mode="poe"``: posterior mean (or a draw) of z given one modality only."""
        self.module.eval()
        out = []
        for batch in self._inference_batches(data, options):
            inf = self.module.inference(batch, sample=False)
            mean, var = self.module.modality_posterior(inf["modalities"][modality])
            out.append((mean if give_mean else mean + var.sqrt() * torch.randn_like(mean)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.n_latent), np.float32)

    def get_modality_latents(self, **kwargs: Any) -> dict[str, np.ndarray]:
        """Modality → its block of the joint latent (same arguments as the joint latent);
        with ``latent_mode="poe"``, modality → the posterior of z from that modality alone."""
        if self.config.latent_mode == "poe":
            return {
                m: self.get_latent_representation(modality=m, **kwargs) for m in self.modalities
            }
        z = self.get_latent_representation(**kwargs)
        return {m: z[:, s] for m, s in self.module.slices.items()}

    def get_normalized_expression(
        self,
        mdata: Any = None,
        modality: str | None = None,
        **options: Unpack[ExpressionOptions],
    ) -> np.ndarray | pd.DataFrame:
        """Decoder output rho of ``modality`` (library-normalised, ambient-free).

        Parameters
        ----------
        mdata
            Data to decode (default: the setup data).
        modality
            Whose features; defaults to the RNA-like modality when there is exactly one.
        **options
            ``gene_list``, ``include_feature_scaling``, ``library_size``, ``return_pandas``
            (:class:`regvi.base.ExpressionOptions`) and ``indices``, ``batch_size``,
            ``category_fallback`` (:class:`regvi.base.InferenceOptions`).
        """
        if modality is None:
            rna = [m for m in self.modalities if modality_kind(m) == "rna"]
            if len(rna) != 1:
                raise ValueError(f"pass modality=...; modalities: {self.modalities}")
            modality = rna[0]
        if modality not in self.modalities:
            raise KeyError(f"modality {modality!r} unknown; modalities: {self.modalities}")
        mod = self.module.mods[modality]

        def rates(batch: dict[str, Any], scaled: bool) -> torch.Tensor:
            inf = self.module.inference(batch, sample=False)
            rho = self.module.decoder_rates(inf["z"], batch)[modality]
            if not scaled:
                return rho
            view = self.module.modality_batch(batch, modality)
            y = mod.feature_scaling(view.get("feature_scaling"))
            return rho * y if y is not None else rho

        def obs_names() -> pd.Index:
            if mdata is None:
                return self._obs.index
            return select_modalities(mdata, self.modalities)[self.modalities[0]].obs_names

        names = self.var_names[modality]
        missing = f"features not in modality {modality!r}"
        return self._expression(mdata, options, rates, names, obs_names, missing)

    def get_modality_attribution(
        self,
        mdata: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int = 256,
        category_fallback: Mapping[str, str] | None = None,
        target: str = "mu",
    ) -> ModalityAttribution:
        """Jacobian modality attribution at the posterior mean
        (docs/model.md#jacobian-modality-attribution).

        For each cell, J_{d,m} = ∂f_d / ∂z_m is the Jacobian of decoder d's output f_d with
        respect to modality m's latent block, f_d = mu_d = exp(l_d) · (rho_d + s_d) · y_d (the NB
        mean, ``target="mu"``, l_d the posterior-mean library; ∂mu_d/∂z = exp(l_d) · y_d ·
        ∂rho_d/∂z) or f_d = rho_d (``target="rho"``). Per-cell scores ``||J_m||_F`` (over all
        decoders' outputs), per-latent-dimension mean ``|∂f_d / ∂z_j|`` and upstream
        regularizedvi's per-decoder totals are computed with one forward-mode JVP per latent
        column (memory independent of the latent size); see :mod:`regvi.attribution`.

        Parameters
        ----------
        mdata
            Data (default: the setup data).
        indices
            Subset of cells.
        batch_size
            Cells per batch.
        category_fallback
            ``{key: reference_category}`` for unseen categories.
        target
            ``"mu"`` (default) or ``"rho"``: what is differentiated.

        Returns
        -------
        ModalityAttribution
            ``per_cell`` (DataFrame: ``jacobian_<m>`` per block, ``jacobian_<d>_<m>`` per
            decoder × block, ``attr_<d>_<m>``, ``<d>_decoder_total_attr``,
            ``<d>_decoder_own_attr``, and for two modalities ``log2_ratio`` and upstream's
            ``log2_<m0>_vs_<m1>_attr``), ``per_dim`` (decoder → ``(n_cells, D)``), ``target``,
            ``upstream_obs()`` and ``summary()``. Also kept as ``model.attribution_``.
        """
        check_target(target)
        if self.config.latent_mode != "concat":
            raise ValueError(
                f"Jacobian modality attribution compares the latent blocks of the modalities; "
                f"this model has latent_mode={self.config.latent_mode!r} (one shared latent, no "
                "blocks). Use latent_mode='concat' for attribution."
            )
        self.module.eval()
        parts = []
        for batch in self._batches(mdata, indices, batch_size, category_fallback):
            with torch.no_grad():
                inf = self.module.inference(batch, sample=False)
            library = {m: inf["modalities"][m]["library"] for m in self.modalities}
            parts.append(modality_attribution(self.module, inf["qz_mean"], batch, target, library))
        index = self._obs.index if mdata is None else None
        if index is not None and indices is not None:
            index = index[np.asarray(indices)]
        result = ModalityAttribution.concatenate(parts, self.modalities, index)
        self.attribution_ = result
        return result

    def plot_attribution_scatter(
        self,
        path: str | None = None,
        attribution: ModalityAttribution | None = None,
        coords: np.ndarray | None = None,
        labels: Sequence[str] | pd.Series | None = None,
    ) -> Any:
        """UMAP of the joint latent coloured by log2 attribution ratio (first / second block).

        Parameters
        ----------
        path
            Write a PNG here (else only return the figure).
        attribution
            Default: the last :meth:`get_modality_attribution` result (computed if missing).
        coords
            2-d coordinates (default: UMAP of the joint latent).
        labels
            Optional cell labels for a second panel (default: the ``labels_key`` if set).
        """
        from regvi.plotting import plot_attribution

        attr = attribution or self.attribution_ or self.get_modality_attribution()
        if coords is None:
            from regvi.plotting import umap_2d

            coords = umap_2d(self.get_latent_representation())
        if labels is None and self.registry.keys_for("labels"):
            labels = self._obs[self.registry.keys_for("labels")[0]]
        return plot_attribution(attr, coords, labels=labels, path=path)

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{m}: {c.n_genes} features, {c.n_hidden}/{c.n_latent}"
            for m, c in self.config.configs.items()
        )
        return f"RegMultiVI({sizes}; trained={self.is_trained})"
