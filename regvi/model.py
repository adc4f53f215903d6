"""User API of single-modal regvi: :class:`RegVI` (setup, train, latent, expression, save)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from regvi.data import (
    CountBatches,
    CovariateRegistry,
    get_counts,
    make_loader,
    train_validation_split,
    validate_counts,
)
from regvi.data.registry import MODEL_PURPOSES
from regvi.module import ModuleConfig, RegVIModule
from regvi.training import (
    EarlyStopping,
    EpochCallback,
    EpochProgressBar,
    TrainingPlan,
    TrainSettings,
)

logger = logging.getLogger(__name__)

#: RegVI arguments that set up the covariate registry (the data section of a sweep config).
REGISTRY_ARGS = (
    "library_key",
    "batch_key",
    "ambient_covariate_keys",
    "dispersion_key",
    "library_size_key",
    "feature_scaling_covariate_keys",
    "nn_conditioning_covariate_keys",
    "encoder_covariate_keys",
    "continuous_covariate_keys",
    "dataset_key",
    "technical_covariate_keys",
    "labels_key",
    "layer",
)


def _depth_normalised_stats(
    X: np.ndarray | sp.csr_matrix, log_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell relative size factor exp(log total − offset) and the depth-normalised matrix."""
    totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    size = np.exp(np.log(np.maximum(totals, 1.0)) - log_offset)
    inv = 1.0 / size
    Xn = sp.diags(inv) @ X if sp.issparse(X) else X * inv[:, None]
    return size, Xn


def _group_means(Xn: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of rows of ``Xn`` per group, ``(n_groups, G)``."""
    n = Xn.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    counts = np.asarray(onehot.sum(axis=1)).ravel()
    sums = onehot @ Xn
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return sums / np.maximum(counts, 1)[:, None]


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's INFO banners (GPU/TPU availability, logger tips) during training."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class RegVI:
    """Regularised Bayesian scVI for one modality (spec §2–§5).

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
        Categorical keys injected (one-hot) into every decoder layer.
    encoder_covariate_keys
        Categorical keys injected into the encoders (default none).
    continuous_covariate_keys
        Continuous covariates (standardised), concatenated to encoder and decoder inputs.
    dataset_key, technical_covariate_keys, labels_key
        Metric-only keys; ``dataset_key`` is validated (each library in one dataset).
    layer
        Layer with counts; ``None`` for ``X``.
    allow_non_integer
        Accept non-integer counts.
    n_hidden, n_latent, n_layers, dropout_rate
        Network size (defaults 128 / 10 / 1 / 0.1). ``RegVI.preset("large")`` gives 512/128.
    data_init
        Data-dependent initialisation of decoder bias and ambient (default on).
    dispersion_init
        ``"prior"`` (theta at 9) or ``"data"`` (method of moments).
    **model_kwargs
        Further :class:`regvi.module.ModuleConfig` fields (``use_ambient``,
        ``regularise_background``, ``dispersion``, ``dispersion_prior_mean``,
        ``library_variance_weight``, ``library_centring_sensitivity``, ``library_residual``,
        ``decoder_l2``, ...).
    """

    PRESETS: Mapping[str, dict[str, int]] = {
        "default": {"n_hidden": 128, "n_latent": 10},
        "large": {"n_hidden": 512, "n_latent": 128},
        "xlarge": {"n_hidden": 1024, "n_latent": 256},
    }

    def __init__(
        self,
        adata: AnnData,
        library_key: str | None = None,
        batch_key: str | None = None,
        ambient_covariate_keys: str | Sequence[str] | None = None,
        dispersion_key: str | None = None,
        library_size_key: str | None = None,
        feature_scaling_covariate_keys: str | Sequence[str] | None = None,
        nn_conditioning_covariate_keys: str | Sequence[str] | None = None,
        encoder_covariate_keys: str | Sequence[str] | None = None,
        continuous_covariate_keys: str | Sequence[str] | None = None,
        dataset_key: str | None = None,
        technical_covariate_keys: str | Sequence[str] | None = None,
        labels_key: str | None = None,
        layer: str | None = None,
        allow_non_integer: bool = False,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        data_init: bool = True,
        dispersion_init: Literal["prior", "data"] = "prior",
        **model_kwargs: Any,
    ):
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData; got {type(adata).__name__}")
        known = ModuleConfig.user_options()
        unknown = sorted(set(model_kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown RegVI argument(s) {unknown}; model options are {sorted(known)}"
            )
        if dispersion_init not in ("prior", "data"):
            raise ValueError(f"dispersion_init={dispersion_init!r}; expected 'prior' or 'data'")
        local = locals()
        registry_kwargs = {k: local[k] for k in REGISTRY_ARGS}
        self.registry = CovariateRegistry.from_anndata(adata, **registry_kwargs)
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
        self.setup_kwargs = {
            "allow_non_integer": allow_non_integer,
            "data_init": data_init,
            "dispersion_init": dispersion_init,
        }
        self.module = RegVIModule(self.config)
        self.adata = adata
        self._X = X
        self._covariates = self.registry.encode(adata.obs, MODEL_PURPOSES)
        self._initialise_from_data(data_init, dispersion_init)
        self.history = pd.DataFrame()
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self.is_trained = False

    @classmethod
    def preset(cls, name: str) -> dict[str, int]:
        """Capacity presets: ``"default"`` 128/10, ``"large"`` 512/128, ``"xlarge"`` 1024/256."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset {name!r} unknown; expected one of {list(cls.PRESETS)}")
        return dict(cls.PRESETS[name])

    # ------------------------------------------------------------------ init
    def _initialise_from_data(self, data_init: bool, dispersion_init: str) -> None:
        X, cov = self._X, self._covariates
        totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
        nonzero = totals > 0
        log_lib = np.log(np.maximum(totals, 1.0))
        lib_codes = cov["library_size"][:, 0]
        n_lib = self.config.n_library_groups
        means, variances = np.zeros(n_lib), np.ones(n_lib)
        for p in range(n_lib):
            vals = log_lib[(lib_codes == p) & nonzero]
            if len(vals):
                means[p] = vals.mean()
                variances[p] = vals.var() if len(vals) > 1 else 1.0
        self.module.set_library_prior(
            torch.tensor(means, dtype=torch.float32), torch.tensor(variances, dtype=torch.float32)
        )
        if not (data_init or dispersion_init == "data"):
            return
        offset = float(self.module.library_log_offset)
        _, Xn = _depth_normalised_stats(X, offset)
        mean_expr = np.asarray(Xn.mean(axis=0)).ravel()
        ambient_means = None
        if self.config.use_ambient:
            ambient_means = [
                torch.tensor(_group_means(Xn, cov["ambient"][:, k], n), dtype=torch.float32)
                for k, n in enumerate(self.config.n_ambient_per_key)
            ]
        theta = None
        if dispersion_init == "data":
            n_disp = self.module.log_theta_mean.shape[0]
            codes = cov["dispersion"][:, 0] if n_disp > 1 else np.zeros(X.shape[0], dtype=np.int64)
            m = _group_means(Xn, codes, n_disp)
            sq = Xn.multiply(Xn) if sp.issparse(Xn) else Xn**2
            v = _group_means(sq, codes, n_disp) - m**2
            excess = np.maximum(v - m, 1e-8)
            # 90% of the excess variance is biological (explained by z), 10% technical
            theta = torch.tensor(m**2 / (0.1 * excess), dtype=torch.float32)
        if data_init:
            self.module.data_init(
                torch.tensor(mean_expr, dtype=torch.float32), ambient_means, theta
            )
        elif theta is not None:
            self.module.data_init(None, None, theta)  # dispersion only; keep default init

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int = 400,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        scale_lr_with_batch_size: bool = False,
        validation_fraction: float = 0.1,
        stratify_validation: bool = False,
        early_stopping: bool = True,
        patience: int = 45,
        min_delta_per_feature: float = 2e-4,
        stop_during_warmup: bool = False,
        restore_best: bool = False,
        n_epochs_kl_warmup: int | None = 50,
        seed: int = 0,
        accelerator: str = "cpu",
        devices: int | str = 1,
        progress_bar: bool = True,
        epoch_callback: Any = None,
        callbacks: Sequence[Any] | None = None,
        shard: tuple[int, int] | None = None,
        early_stopping_state: Mapping[str, float] | None = None,
        **trainer_kwargs: Any,
    ) -> pd.DataFrame:
        """Train with Adam and (optionally) early stopping on the validation ELBO.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        batch_size
            Cells per minibatch (128 default; 1024 on GPU with ``scale_lr_with_batch_size``).
        lr, weight_decay, eps
            Adam settings (spec §5: 1e-3, 1e-6, 0.01).
        scale_lr_with_batch_size
            Use lr · batch_size / 128.
        validation_fraction
            Share of cells held out for validation (0 disables validation and early stopping).
        stratify_validation
            Stratify the split by label × library (needs ``labels_key`` for the label part).
        early_stopping, patience, min_delta_per_feature
            Early stopping on validation ELBO with ``min_delta = n_features × min_delta_per_feature``.
        stop_during_warmup
            Allow early stopping before the KL warmup has finished.
        restore_best
            Restore the weights of the best validation epoch at the end.
        n_epochs_kl_warmup
            Linear KL warmup length in epochs (``None``/0: no warmup).
        seed
            Seed for the split, shuffling and initial weights' sampling noise.
        accelerator, devices
            Passed to ``lightning.Trainer``.
        progress_bar
            Show a progress bar over epochs.
        epoch_callback
            Optional ``fn(metrics_dict)`` called after every epoch.
        callbacks
            Extra Lightning callbacks (e.g. the sweep's per-epoch reporter).
        shard
            ``(num_replicas, rank)`` for data-parallel training: each replica trains on its
            shard of the training cells and validates on all validation cells (so early-stopping
            decisions agree across replicas). ``n_obs`` stays N_train.
        early_stopping_state
            ``{"best", "best_epoch", "wait"}`` to continue early stopping after a restart.
        **trainer_kwargs
            Passed to ``lightning.Trainer`` (e.g. ``strategy``, ``plugins``, ``precision``).

        Returns
        -------
        pandas.DataFrame
            One row per epoch: every loss term for train and validation, KL weight, active
            latent dims, theta mean, epoch time.
        """
        import lightning.pytorch as pl

        for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size)):
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        if not lr > 0:
            raise ValueError(f"lr={lr!r}; expected a positive number")
        n_cells = self._X.shape[0]
        strata = None
        if stratify_validation:
            parts = [
                self.adata.obs[k].astype(str)
                for k in self.registry.keys_for("labels") + self.registry.keys_for("library_size")
            ]
            strata = pd.Series(["|".join(t) for t in zip(*parts, strict=True)]).to_numpy()
        train_idx, val_idx = train_validation_split(n_cells, validation_fraction, seed, strata)
        self.train_indices, self.validation_indices = train_idx, val_idx
        data = self._dataset()
        replicas, rank = shard if shard is not None else (1, 0)
        train_loader = make_loader(data, train_idx, batch_size, True, seed, replicas, rank)
        val_loader = (
            make_loader(data, val_idx, max(batch_size, 1024), shuffle=False)
            if len(val_idx)
            else None
        )
        settings = TrainSettings(
            lr, weight_decay, eps, n_epochs_kl_warmup, scale_lr_with_batch_size, batch_size
        )
        plan = TrainingPlan(self.module, n_obs_train=len(train_idx), settings=settings)
        plan.epoch_offset = len(self.history)
        all_callbacks: list[pl.Callback] = [EpochProgressBar(max_epochs, progress_bar)]
        self.early_stopping = None
        if early_stopping and val_loader is not None:
            self.early_stopping = EarlyStopping(
                min_delta=self.config.n_genes * min_delta_per_feature,
                patience=patience,
                stop_during_warmup=stop_during_warmup,
                restore_best=restore_best,
            )
            if early_stopping_state:
                es = self.early_stopping
                es.best = float(early_stopping_state.get("best", es.best))
                es.best_epoch = int(early_stopping_state.get("best_epoch", es.best_epoch))
                es.wait = int(early_stopping_state.get("wait", es.wait))
            all_callbacks.append(self.early_stopping)
        if epoch_callback is not None:
            all_callbacks.append(EpochCallback(epoch_callback))
        all_callbacks.extend(callbacks or [])
        torch.manual_seed(seed)
        with _quiet_lightning():
            trainer = pl.Trainer(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                num_sanity_val_steps=0,
                callbacks=all_callbacks,
                use_distributed_sampler=False,  # BatchIndexSampler shards itself
                **trainer_kwargs,
            )
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            trainer.fit(plan, train_dataloaders=train_loader, val_dataloaders=val_loader)
        self.module.eval()
        new = pd.DataFrame(plan.history)
        self.history = (
            pd.concat([self.history, new], ignore_index=True) if len(self.history) else new
        )
        self.is_trained = True
        return self.history

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
        indices: np.ndarray | None = None,
        give_mean: bool = True,
        batch_size: int = 1024,
        store_key: str | None = None,
        category_fallback: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """Posterior mean (or one sample) of z, ``(n_cells, n_latent)``.

        Parameters
        ----------
        adata
            Data to encode (default: the setup AnnData); genes and categories are checked.
        indices
            Subset of cells.
        give_mean
            Posterior mean (default) or a sample.
        batch_size
            Cells per inference batch (memory is bounded by this).
        store_key
            Also write the result to ``adata.obsm[store_key]`` (e.g. ``"X_regvi"``).
        category_fallback
            ``{key: reference_category}`` for unseen categories at inference.
        """
        self.module.eval()
        out = []
        for batch in self._batches(adata, indices, batch_size, category_fallback):
            inf = self.module.inference(batch, sample=not give_mean)
            out.append((inf["qz_mean"] if give_mean else inf["z"]).numpy())
        z = np.concatenate(out) if out else np.zeros((0, self.config.n_latent), np.float32)
        if store_key is not None:
            target = self.adata if adata is None else adata
            if indices is not None:
                raise ValueError("store_key needs all cells (indices=None)")
            target.obsm[store_key] = z
        return z

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int = 1024,
        gene_list: Sequence[str] | None = None,
        include_feature_scaling: bool = False,
        library_size: float | None = None,
        category_fallback: Mapping[str, str] | None = None,
        return_pandas: bool = False,
    ) -> np.ndarray | pd.DataFrame:
        """Decoder output rho (library-normalised, ambient-free expression), ``(n_cells, n_genes)``.

        Parameters
        ----------
        gene_list
            Subset of genes to return.
        include_feature_scaling
            Multiply by the cell's feature-scaling factors y.
        library_size
            Scale rows to sum to this value (e.g. 1e4); default: raw decoder output.
        """
        self.module.eval()
        names = self.registry.var_names
        cols = None
        if gene_list is not None:
            pos = {g: i for i, g in enumerate(names)}
            missing = [g for g in gene_list if g not in pos]
            if missing:
                raise KeyError(f"genes not in the model: {missing[:10]}")
            cols = np.array([pos[g] for g in gene_list])
        out = []
        for batch in self._batches(adata, indices, batch_size, category_fallback):
            inf = self.module.inference(batch, sample=False)
            gen = self.module.generative(inf["z"], inf["library"], batch, sample_theta=False)
            rho = gen["rho"]
            if include_feature_scaling:
                y = self.module.feature_scaling(batch["feature_scaling"])
                rho = rho * y if y is not None else rho
            if library_size is not None:
                rho = rho / rho.sum(-1, keepdim=True) * library_size
            out.append((rho if cols is None else rho[:, cols]).numpy())
        expr = np.concatenate(out)
        if return_pandas:
            target = self.adata if adata is None else adata
            obs_names = target.obs_names if indices is None else target.obs_names[indices]
            return pd.DataFrame(
                expr, index=obs_names, columns=list(gene_list) if gene_list is not None else names
            )
        return expr

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

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save weights (safetensors) and config / registry / history (JSON, CSV) to ``path``."""
        from regvi.io import save_model

        save_model(self, path, overwrite=overwrite)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"RegVI(n_genes={c.n_genes}, n_hidden={c.n_hidden}, n_latent={c.n_latent}, "
            f"n_layers={c.n_layers}, trained={self.is_trained})"
        )
