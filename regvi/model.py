"""User API of single-modal regvi: :class:`RegVI` (setup, train, latent, expression, save)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from regvi.base import (
    BaseModel,
    ExpressionOptions,
    InferenceOptions,
    Unpack,
    inference_options,
)
from regvi.checks import check_bool
from regvi.data import (
    CountBatches,
    CovariateRegistry,
    get_counts,
    make_loader,
    validate_counts,
)
from regvi.data.registry import MODEL_PURPOSES, CovariateKeys
from regvi.data.registry import REGISTRY_ARGS as REGISTRY_ARGS  # re-exported
from regvi.io import register_model_class
from regvi.module import ModuleConfig, RegVIModule, check_module_options

logger = logging.getLogger(__name__)


@register_model_class
class RegVI(BaseModel):
    """Regularised Bayesian scVI for one modality (equations: docs/model.md).

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or ``layers[layer]`` (dense, CSR or CSC).
    library_key
        Finest technical unit (run / lane / GEM well); alone it fans out to ambient,
        dispersion and library-size groups. ``batch_key`` is an alias.
    ambient_covariate_keys, dispersion_key, library_size_key
        Explicit purpose keys (all three, instead of ``library_key``).
    feature_scaling_covariate_keys
        Keys of multiplicative per-gene scaling (default: the decoder-conditioning keys).
    nn_conditioning_covariate_keys
        Categorical keys injected (one-hot) into every decoder layer. Default (``None``): the
        library key (the library-size key when the purposes are given one by one); ``[]`` for
        a batch-free decoder.
    encoder_covariate_keys
        Categorical keys injected (one-hot) into the first layer of both encoders. Default
        (``None``): the decoder-conditioning keys; ``[]`` for none.
    continuous_covariate_keys
        Continuous covariates (standardised), concatenated to encoder and decoder inputs.
    dataset_key, technical_covariate_keys, labels_key
        Metric-only keys; ``dataset_key`` is validated (each library in one dataset).
    layer
        Layer with counts; ``None`` for ``X``.
    allow_non_integer
        Accept non-integer counts.
    n_hidden, n_latent, n_layers, dropout_rate
        Network size (defaults 128 / 20 / 1 / 0.1; n_latent 20 since the quality sweep, see
        ``docs/model.md``). ``RegVI.preset("large")`` gives 512/128.
    data_init
        Data-dependent initialisation of decoder bias and ambient (default on).
    dispersion_init
        ``"prior"`` (theta at 9) or ``"data"`` (method of moments; the containment prior's
        hyper-prior mean moves with it, see :meth:`regvi.module.RegVIModule.data_init`).
    seed
        Seed of the initial weights (construction is reproducible and leaves torch's global
        RNG alone); also :meth:`train`'s default seed. The first :meth:`train` redraws the
        weights from its own seed and recomputes the data-dependent initialisation from the
        training cells only.
    **options
        The covariate keys above other than ``library_key`` and ``layer`` (keyword arguments:
        the fields of :class:`regvi.data.registry.CovariateKeys`), and further
        :class:`regvi.module.ModuleConfig` fields (``use_ambient``,
        ``regularise_background``, ``dispersion``, ``dispersion_prior_mean``,
        ``library_variance_weight``, ``library_centring_sensitivity``, ``library_residual``,
        ``decoder_l2``, ...).
    """

    module_class = RegVIModule
    config_class = ModuleConfig

    def __init__(
        self,
        adata: AnnData,
        library_key: str | None = None,
        *,
        layer: str | None = None,
        allow_non_integer: bool = False,
        n_hidden: int = 128,
        n_latent: int = 20,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        data_init: bool = True,
        dispersion_init: Literal["prior", "data"] = "prior",
        seed: int = 0,
        **options: Any,
    ):
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData; got {type(adata).__name__}")
        keys, model_kwargs = CovariateKeys.split(options, library_key=library_key, layer=layer)
        self._refuse_unknown_options(model_kwargs)
        sizes = {"n_hidden": n_hidden, "n_latent": n_latent, "n_layers": n_layers}
        check_module_options({**sizes, "dropout_rate": dropout_rate, **model_kwargs})
        check_bool("allow_non_integer", allow_non_integer)
        setup = self._check_setup_options(data_init, dispersion_init, seed)
        self.registry = CovariateRegistry.from_anndata(adata, keys)
        X = get_counts(adata, layer)
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        self.count_summary = validate_counts(X, where, allow_non_integer)
        self.config = ModuleConfig(
            n_genes=adata.n_vars,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            n_continuous=len(self.registry.keys_for("continuous")),
            n_cats_decoder=self.registry.n_categories("nn_conditioning"),
            n_cats_encoder=self.registry.n_categories("encoder"),
            n_ambient_per_key=self.registry.n_categories("ambient"),
            n_dispersion_groups=self.registry.n_categories("dispersion")[0],
            n_library_groups=self.registry.n_categories("library_size")[0],
            n_scaling_per_key=self.registry.n_categories("feature_scaling"),
            **model_kwargs,
        )
        self.setup_kwargs = {"allow_non_integer": allow_non_integer, **setup}
        self.adata = adata
        self._X = X
        self._covariates = self.registry.encode(adata.obs, MODEL_PURPOSES)
        self._reset_training_state()
        self._initialise(self.seed)

    @classmethod
    def assemble(
        cls,
        registry: CovariateRegistry,
        config: ModuleConfig,
        module: RegVIModule,
        setup_kwargs: Mapping[str, Any],
        is_trained: bool = False,
        history: pd.DataFrame | None = None,
    ) -> RegVI:
        """A model from its parts, without data (loading, reference mapping)."""
        model = cls._bare(registry, config, module, setup_kwargs, is_trained, history)
        model.adata = None
        model._X = None
        return model

    # ------------------------------------------------------------------ saving (regvi.io)
    def attach(self, adata: AnnData) -> None:
        """Attach ``adata`` to a loaded model after checking genes and categories."""
        self.registry.check_var_names(adata)
        X = get_counts(adata, self.registry.layer)
        validate_counts(X, "adata", self.setup_kwargs.get("allow_non_integer", False))
        self._covariates = self.registry.encode(adata.obs, MODEL_PURPOSES)
        self._X = X
        self.adata = adata

    def _initialise_module(self, cells: np.ndarray | None) -> None:
        self._initialise_from_data(self.module, self._X, self._covariates, cells)

    # ------------------------------------------------------------------ inference
    def _batches(
        self,
        adata: AnnData | None,
        indices: np.ndarray | None,
        batch_size: int,
        category_fallback: Mapping[str, str] | None = None,
    ):
        if adata is None or adata is self.adata:
            if self.adata is None:
                raise ValueError("this model was loaded without data; pass adata=...")
            data = self._dataset()
        else:
            self.registry.check_var_names(adata)
            X = get_counts(adata, self.registry.layer)
            validate_counts(X, "adata", self.setup_kwargs.get("allow_non_integer", False))
            data = CountBatches(
                X, self.registry.encode(adata.obs, MODEL_PURPOSES, category_fallback)
            )
        idx = np.arange(len(data)) if indices is None else np.asarray(indices)
        return make_loader(data, idx, batch_size, shuffle=False)

    def _setup_obs(self) -> pd.DataFrame:
        return self.adata.obs

    def _n_features(self) -> int:
        return self.config.n_genes

    def _dataset(self) -> CountBatches:
        """The setup data as minibatches, built once (per-cell constants computed once)."""
        cached = getattr(self, "_cached_dataset", None)
        if cached is None or cached.X is not self._X:
            cached = self._cached_dataset = CountBatches(self._X, self._covariates)
        return cached

    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        *,
        give_mean: bool = True,
        store_key: str | None = None,
        **options: Unpack[InferenceOptions],
    ) -> np.ndarray:
        """Posterior mean (or one sample) of z, ``(n_cells, n_latent)``.

        Parameters
        ----------
        adata
            Data to encode (default: the setup AnnData); genes and categories are checked.
        give_mean
            Posterior mean (default) or a sample.
        store_key
            Also write the result to ``adata.obsm[store_key]`` (e.g. ``"X_regvi"``).
        **options
            ``indices``, ``batch_size``, ``category_fallback``
            (:class:`regvi.base.InferenceOptions`).
        """
        opts = inference_options(options)
        if store_key is not None and opts["indices"] is not None:
            raise ValueError("store_key needs all cells (indices=None)")
        z = self._latent(adata, give_mean, opts)
        if store_key is not None:
            (self.adata if adata is None else adata).obsm[store_key] = z
        return z

    def get_normalized_expression(
        self, adata: AnnData | None = None, **options: Unpack[ExpressionOptions]
    ) -> np.ndarray | pd.DataFrame:
        """Decoder output rho (library-normalised, ambient-free expression), ``(n_cells, n_genes)``.

        Parameters
        ----------
        adata
            Data to decode (default: the setup AnnData).
        **options
            ``gene_list``, ``include_feature_scaling``, ``library_size``, ``return_pandas``
            (:class:`regvi.base.ExpressionOptions`) and ``indices``, ``batch_size``,
            ``category_fallback`` (:class:`regvi.base.InferenceOptions`).
        """

        def rates(batch: dict[str, Any], scaled: bool) -> torch.Tensor:
            inf = self.module.inference(batch, sample=False)
            gen = self.module.generative(inf["z"], inf["library"], batch, sample_theta=False)
            y = self.module.feature_scaling(batch["feature_scaling"]) if scaled else None
            return gen["rho"] * y if y is not None else gen["rho"]

        target = self.adata if adata is None else adata
        return self._expression(
            adata, options, rates, self.registry.var_names, lambda: target.obs_names
        )

    # ------------------------------------------------------------------ learned parameters
    def get_ambient_profiles(self) -> dict[str, pd.DataFrame]:
        """Learned ambient rates exp(beta) per ambient key: categories × genes."""
        out = {}
        for key, param in zip(
            self.registry.keys_for("ambient"), self.module.ambient_log, strict=False
        ):
            out[key] = pd.DataFrame(
                torch.exp(param).detach().numpy(),
                index=self.registry.categories[key],
                columns=self.registry.var_names,
            )
        return out

    def get_dispersion(self) -> pd.DataFrame:
        """Posterior-mean theta = exp(mu_theta): dispersion groups × genes."""
        theta = torch.exp(self.module.log_theta_mean).detach().numpy()
        keys = self.registry.keys_for("dispersion")
        index = self.registry.categories[keys[0]] if theta.shape[0] > 1 else ["all"]
        return pd.DataFrame(theta, index=index, columns=self.registry.var_names)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"RegVI(n_genes={c.n_genes}, n_hidden={c.n_hidden}, n_latent={c.n_latent}, "
            f"n_layers={c.n_layers}, trained={self.is_trained})"
        )
