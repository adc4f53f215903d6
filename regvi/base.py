"""Shared parts of the user-facing models: data-dependent initialisation and the training loop."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, TypeVar

import numpy as np
import pandas as pd
import torch

if sys.version_info >= (3, 11):
    from typing import Unpack as Unpack  # re-exported to the models
else:  # pragma: no cover
    from typing_extensions import Unpack as Unpack

from regvi.checks import check_bool, check_choice, check_float, check_int, check_str
from regvi.data import make_loader, train_validation_split
from regvi.data.device import (
    check_precision,
    dataset_is_memory_mapped,
    resolve_data_on_device,
    to_device,
    training_device,
)
from regvi.initialisation import initialise_from_data
from regvi.io import save_model
from regvi.map.query import build_query
from regvi.module import ModuleConfig, RegVIModule
from regvi.training import (
    MODEL_EPOCHS,
    QUERY_EPOCHS,
    EarlyStopping,
    EpochCallback,
    EpochDefaults,
    EpochProgressBar,
    TrainingPlan,
    TrainSettings,
)

logger = logging.getLogger(__name__)


class InferenceOptions(TypedDict, total=False):
    """Keyword options of every inference method (``get_latent_representation``,
    ``get_normalized_expression``) of both models.

    Attributes
    ----------
    indices
        Subset of cells (default: all).
    batch_size
        Cells per inference batch (default 1024); memory is bounded by this.
    category_fallback
        ``{key: reference_category}``: encode a category the model has not seen as this one.
    """

    indices: np.ndarray | None
    batch_size: int
    category_fallback: Mapping[str, str] | None


class ExpressionOptions(InferenceOptions, total=False):
    """Keyword options of ``get_normalized_expression`` (both models), besides
    :class:`InferenceOptions`.

    Attributes
    ----------
    gene_list
        Subset of features to return, by name (default: all).
    include_feature_scaling
        Multiply by the cell's feature-scaling factors y (default ``False``).
    library_size
        Scale rows to sum to this value (e.g. 1e4); default: the raw decoder output.
    return_pandas
        A DataFrame (cells × features) instead of an array (default ``False``).
    """

    gene_list: Sequence[str] | None
    include_feature_scaling: bool
    library_size: float | None
    return_pandas: bool


def inference_options(options: Mapping[str, Any], kind: type = InferenceOptions) -> Any:
    """``options`` of a ``kind`` (:class:`InferenceOptions` or :class:`ExpressionOptions`)
    checked by name and type, with their defaults filled in."""
    known = kind.__optional_keys__
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; expected {sorted(known)}")
    out = {
        "indices": options.get("indices"),
        "batch_size": int(check_int("batch_size", options.get("batch_size", 1024), 1)),
        "category_fallback": options.get("category_fallback"),
    }
    if kind is ExpressionOptions:
        library_size = options.get("library_size")
        out |= {
            "gene_list": options.get("gene_list"),
            "include_feature_scaling": check_bool(
                "include_feature_scaling", options.get("include_feature_scaling", False)
            ),
            "library_size": None
            if library_size is None
            else check_float("library_size", library_size, positive=True),
            "return_pandas": check_bool("return_pandas", options.get("return_pandas", False)),
        }
    return kind(**out)


def check_train_option(name: str, value: Any) -> None:
    """Type- and range-check one :meth:`BaseModel.train` argument (as ``train`` does)."""
    import inspect

    args = {
        k: p.default
        for k, p in inspect.signature(BaseModel.train).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    if name not in args:
        return
    args.update({name: value, "self": None})
    _check_train_options(args)


def _trainer(
    max_epochs: int,
    accelerator: str,
    devices: int | str,
    precision: str,
    callbacks: list[Any],
    trainer_kwargs: Mapping[str, Any],
) -> Any:
    """The ``lightning.Trainer`` of :meth:`BaseModel.train` (no logger, checkpoints, sanity
    steps or progress bar of its own)."""
    import lightning.pytorch as pl

    with _quiet_lightning():
        return pl.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            use_distributed_sampler=False,  # BatchIndexSampler shards itself
            precision=precision,
            **trainer_kwargs,
        )


def _check_train_options(args: Mapping[str, Any]) -> int:
    """Type- and range-check :meth:`BaseModel.train` arguments before any work; return the seed.

    A string where a bool or a number belongs (a YAML / CLI ``"False"``) is refused with the
    argument named, never taken as truthy.
    """
    check_int("max_epochs", args["max_epochs"], 1, allow_none=True)
    check_int("batch_size", args["batch_size"], 1)
    check_float("lr", args["lr"], positive=True)
    check_float("weight_decay", args["weight_decay"], minimum=0.0)
    check_float("eps", args["eps"], positive=True)
    check_float("max_kl_weight", args["max_kl_weight"], positive=True)
    check_float("validation_fraction", args["validation_fraction"], 0.0, 1.0, below_maximum=True)
    check_int("patience", args["patience"], 1, allow_none=True)
    check_float("min_delta_per_feature", args["min_delta_per_feature"], minimum=0.0)
    warmup = args["n_epochs_kl_warmup"]
    if isinstance(warmup, str) and warmup != "auto":
        raise TypeError(f"n_epochs_kl_warmup={warmup!r}; expected an integer, None or 'auto'")
    if warmup != "auto":
        check_int("n_epochs_kl_warmup", warmup, 0, allow_none=True)
    for name in (
        "scale_lr_with_batch_size",
        "stratify_validation",
        "early_stopping",
        "stop_during_warmup",
        "restore_best",
        "compile",
        "progress_bar",
    ):
        check_bool(name, args[name])
    if args["data_on_device"] != "auto":
        try:
            check_bool("data_on_device", args["data_on_device"])
        except TypeError:
            raise TypeError(
                f"data_on_device={args['data_on_device']!r}; expected True, False or 'auto'"
            ) from None
    check_str("accelerator", args["accelerator"])
    if args["initialise"] is not None:
        check_bool("initialise", args["initialise"])
    seed = getattr(args["self"], "seed", 0) if args["seed"] is None else args["seed"]
    return int(check_int("seed", seed, 0))


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


_Model = TypeVar("_Model", bound="BaseModel")


class BaseModel:
    """Training, presets and saving shared by :class:`regvi.RegVI` and :class:`regvi.RegMultiVI`.

    Subclasses provide ``module_class`` and ``config_class``, ``assemble``, ``_dataset()`` (the
    setup data as minibatches), ``_batches()`` (any data as minibatches), ``_setup_obs()`` (cell
    metadata), ``_n_features()`` (for the early-stopping delta) and ``_initialise_module()``.
    """

    #: The module class of the model and the class of its config (set by each model).
    module_class: type
    config_class: type

    PRESETS: Mapping[str, dict[str, int]] = {
        "default": {"n_hidden": 128, "n_latent": 20},
        "large": {"n_hidden": 512, "n_latent": 128},
        "xlarge": {"n_hidden": 1024, "n_latent": 256},
    }

    @classmethod
    def preset(cls, name: str) -> dict[str, int]:
        """Capacity presets: ``"default"`` 128/20, ``"large"`` 512/128, ``"xlarge"`` 1024/256."""
        if name not in cls.PRESETS:
            raise ValueError(f"preset {name!r} unknown; expected one of {list(cls.PRESETS)}")
        return dict(cls.PRESETS[name])

    @classmethod
    def _bare(
        cls,
        registry: Any,
        config: Any,
        module: Any,
        setup_kwargs: Mapping[str, Any],
        is_trained: bool,
        history: pd.DataFrame | None,
    ) -> Any:
        """A model object holding its parts and no data (``assemble`` of a subclass)."""
        model = cls.__new__(cls)
        model.registry, model.config, model.module = registry, config, module
        model.setup_kwargs = dict(setup_kwargs)
        model.seed = int(model.setup_kwargs.get("seed", 0))
        model._reset_training_state(is_trained, history)
        model.count_summary = {}
        model._covariates = None
        return model

    # ------------------------------------------------------------------ construction
    @classmethod
    def _refuse_unknown_options(cls, model_kwargs: Mapping[str, Any]) -> None:
        """TypeError naming the ``**model_kwargs`` that are no :class:`ModuleConfig` option."""
        known = ModuleConfig.user_options()
        unknown = sorted(set(model_kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown {cls.__name__} argument(s) {unknown}; model options are {sorted(known)}"
            )

    def _check_setup_options(self, data_init: Any, dispersion_init: Any, seed: Any) -> dict:
        """Check the data-initialisation options and the seed; set ``self.seed``.

        Returns them as ``setup_kwargs`` entries (the model adds ``allow_non_integer``).
        """
        check_bool("data_init", data_init)
        check_choice("dispersion_init", dispersion_init, ("prior", "data"))
        self.seed = int(check_int("seed", seed, 0))
        return {"data_init": data_init, "dispersion_init": dispersion_init, "seed": self.seed}

    def _reset_training_state(
        self, is_trained: bool = False, history: pd.DataFrame | None = None
    ) -> None:
        """History, split and query state of a new (or a loaded) model."""
        self.is_trained = bool(is_trained)
        self.history = pd.DataFrame() if history is None else history
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self.query = None

    # ------------------------------------------------------------------ saving (regvi.io)
    @classmethod
    def config_from_dict(cls, d: Mapping[str, Any]) -> Any:
        """The module config saved in ``config.json``."""
        return cls.config_class.from_dict(dict(d))

    @classmethod
    def module_from_config(cls, config: Any) -> Any:
        """An (untrained) module for ``config``."""
        return cls.module_class(config)

    @classmethod
    def from_saved(
        cls,
        meta: Mapping[str, Any],
        registry: Any,
        config: Any,
        module: Any,
        history: pd.DataFrame,
    ) -> Any:
        """The model of a saved directory (``meta``: its ``config.json``)."""
        return cls.assemble(
            registry,
            config,
            module,
            meta.get("setup_kwargs", {}),
            is_trained=bool(meta.get("is_trained", False)),
            history=history,
            **cls._saved_parts(meta),
        )

    @classmethod
    def _saved_parts(cls, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Further ``assemble`` arguments from ``config.json`` (the :meth:`saved_meta` fields)."""
        return {}

    def saved_meta(self) -> dict[str, Any]:
        """Extra ``config.json`` fields (none: the registry holds the genes and layer)."""
        return {}

    # ------------------------------------------------------------------ hooks
    def _dataset(self) -> Any:
        raise NotImplementedError

    def _build_module(self) -> Any:
        """A new module from ``self.config`` (weights drawn from torch's global RNG)."""
        return self.module_from_config(self.config)

    def _initialise_module(self, cells: np.ndarray | None) -> None:
        """Library prior and data-dependent init of ``self.module`` from ``cells`` (mask)."""
        raise NotImplementedError

    def _initialise_from_data(
        self, module: RegVIModule, X: Any, covariates: Mapping[str, np.ndarray], cells: Any
    ) -> None:
        """:func:`initialise_from_data` of one single-modal ``module`` with the setup options."""
        initialise_from_data(
            module,
            X,
            covariates,
            self.setup_kwargs["data_init"],
            self.setup_kwargs["dispersion_init"],
            cells=cells,
        )

    def _batches(
        self, data: Any, indices: Any, batch_size: int, category_fallback: Any = None
    ) -> Any:
        """Minibatches of ``data`` (the setup data when ``None``) for inference."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inference
    def _inference_batches(self, data: Any, options: InferenceOptions) -> Any:
        return self._batches(
            data, options["indices"], options["batch_size"], options["category_fallback"]
        )

    @torch.inference_mode()
    def _latent(self, data: Any, give_mean: bool, options: InferenceOptions) -> np.ndarray:
        """Posterior mean (or one sample) of the (joint) latent, ``(n_cells, n_latent)``."""
        self.module.eval()
        out = []
        for batch in self._inference_batches(data, options):
            inf = self.module.inference(batch, sample=not give_mean)
            out.append((inf["qz_mean"] if give_mean else inf["z"]).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.n_latent), np.float32)

    @torch.inference_mode()
    def _expression(
        self,
        data: Any,
        options: Mapping[str, Any],
        rates: Callable[[dict[str, Any], bool], torch.Tensor],
        names: Sequence[str],
        obs_names: Callable[[], pd.Index],
        missing: str = "genes not in the model",
    ) -> np.ndarray | pd.DataFrame:
        """``get_normalized_expression``: ``rates(batch, include_feature_scaling)`` over the
        minibatches, rows scaled to ``library_size`` (if given), the ``gene_list`` columns of
        ``names`` (a KeyError ``"<missing>: [...]"`` names up to ten unknown ones); a
        DataFrame indexed by ``obs_names()`` with ``return_pandas``."""
        opts = inference_options(options, ExpressionOptions)
        genes, size = opts["gene_list"], opts["library_size"]
        cols = None
        if genes is not None:
            pos = {g: i for i, g in enumerate(names)}
            unknown = [g for g in genes if g not in pos]
            if unknown:
                raise KeyError(f"{missing}: {unknown[:10]}")
            cols = np.array([pos[g] for g in genes])
        self.module.eval()
        out = []
        for batch in self._inference_batches(data, opts):
            rho = rates(batch, opts["include_feature_scaling"])
            if size is not None:
                rho = rho / rho.sum(-1, keepdim=True) * size
            out.append((rho if cols is None else rho[:, cols]).numpy())
        expr = np.concatenate(out)
        if not opts["return_pandas"]:
            return expr
        index = obs_names() if opts["indices"] is None else obs_names()[opts["indices"]]
        return pd.DataFrame(expr, index=index, columns=list(names if genes is None else genes))

    def _initialise(self, seed: int, cells: np.ndarray | None = None) -> None:
        """Draw the weights from ``seed`` and initialise from the data in ``cells``.

        The weights come from a generator seeded with ``seed`` (torch's global RNG is left as
        it was), so two models built with the same seed are identical whatever ran before.
        Called at construction (all cells) and by the first :meth:`train` of an untrained
        model (its seed, its training cells): one seed sets weights, split, minibatch order
        and sampling noise.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build_module()
        module = getattr(self, "module", None)
        if module is None:
            self.module = fresh
        else:  # same objects (a caller may hold a reference to the module)
            module.load_state_dict(fresh.state_dict())
        self._initialise_module(cells)
        self.init_seed = seed

    def _validation_batch_size(self, batch_size: int) -> int:
        """Large validation batches (fewer steps), capped at ~4M dense entries per batch so wide
        data (e.g. 25k ATAC peaks) does not multiply peak memory."""
        return max(batch_size, min(1024, (1 << 22) // max(1, self._n_features())))

    def _setup_obs(self) -> pd.DataFrame:
        raise NotImplementedError

    def _n_features(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ reference mapping
    @classmethod
    def load_query_data(
        cls: type[_Model],
        data: Any,
        reference: Any,
        *,
        allow_missing_genes: bool = False,
        fine_tune: str | Sequence[str] | None = None,
    ) -> _Model:
        """A model of new (query) cells that shares a trained reference's weights.

        Every category of a covariate key the reference has not seen (a new library, say) gets
        its own technical terms (ambient, dispersion, library prior, feature scaling, decoder
        conditioning column), initialised from the query's counts as training would. ``train()``
        then fits only those, by default with a query's short budget (100 epochs, patience 10,
        no KL warm-up; :data:`regvi.training.QUERY_EPOCHS`), as ``python -m regvi.map`` does.
        The reference's weights stay byte-identical, and the encoder is the reference's, so
        the latent of the reference cells does not move (docs/mapping.md).

        Parameters
        ----------
        data
            The query cells, with raw counts (in the reference's ``layer``) and the reference's
            covariate columns in ``obs``; features are matched by name and reordered.
            :class:`RegVI`: an AnnData. :class:`RegMultiVI`: a MuData or a dict modality →
            AnnData, possibly of a subset of the reference's modalities (e.g. RNA only, as
            ``{"rna": adata}``): its cells then miss the others, as unpaired cells do in
            training (their block of the joint latent is the prior mean 0).
        reference
            A trained model of this class, its directory or an MLflow model URI
            (``models:/NAME@champion``, ``runs:/ID/model``).
        allow_missing_genes
            Fill reference features absent from the query with zero counts (with a warning)
            instead of raising.
        fine_tune
            Also train ``"conditioning"`` (the new categories' one-hot weights of the decoder
            and encoder layers) and/or ``"encoder"`` (all encoder weights: the reference cells'
            latent then moves too, as in scArches' full fine-tuning).

        Returns
        -------
        The query model; its ``adata`` (``mdata``) is the query with the reference's features.
        """
        return build_query(cls, reference, data, allow_missing_genes, fine_tune)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        eps: float = 0.01,
        scale_lr_with_batch_size: bool = False,
        validation_fraction: float = 0.1,
        stratify_validation: bool = False,
        early_stopping: bool = True,
        patience: int | None = None,
        min_delta_per_feature: float = 2e-4,
        stop_during_warmup: bool = False,
        restore_best: bool = False,
        n_epochs_kl_warmup: int | str | None = "auto",
        max_kl_weight: float = TrainSettings.max_kl_weight,
        seed: int | None = None,
        accelerator: str = "cpu",
        devices: int | str = 1,
        data_on_device: bool | str = "auto",
        precision: str = "32-true",
        compile: bool = False,
        progress_bar: bool = True,
        epoch_callback: Any = None,
        callbacks: Sequence[Any] | None = None,
        shard: tuple[int, int] | None = None,
        early_stopping_state: Mapping[str, float] | None = None,
        optimizer_state: Mapping[str, Any] | None = None,
        initialise: bool | None = None,
        **trainer_kwargs: Any,
    ) -> pd.DataFrame:
        """Train with Adam and (optionally) early stopping on the validation ELBO.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs (default 400; 100 for a query model from
            ``load_query_data``, which trains only its new technical terms).
        batch_size
            Cells per minibatch (128 default; 1024 on GPU with ``scale_lr_with_batch_size``).
        lr, weight_decay, eps
            Adam settings (docs/model.md#optimiser: 1e-3, 1e-6, 0.01).
        scale_lr_with_batch_size
            Use lr · batch_size / 128.
        validation_fraction
            Share of cells held out for validation (0 disables validation and early stopping).
        stratify_validation
            Stratify the split by label × library (needs ``labels_key`` for the label part).
        early_stopping, patience, min_delta_per_feature
            Early stopping on validation ELBO with ``min_delta = n_features × min_delta_per_feature``
            (``patience`` default 45 epochs; 10 for a query model).
        stop_during_warmup
            Allow early stopping before the KL warmup has finished.
        restore_best
            Restore the weights of the best validation epoch at the end.
        n_epochs_kl_warmup
            Linear KL warmup length in epochs (``None``/0: no warmup). ``"auto"``: 50 epochs,
            none for a query model (its reference finished at full KL weight).
        max_kl_weight
            β, the weight the latent KL term reaches at the end of the warm-up
            (docs/model.md#kl-warm-up). The default 2 makes each latent dimension explain more
            of the counts to be used, so a wide latent (``preset("large")``, n_latent 128) keeps
            a few informative dimensions instead of spreading over all of them; 1 trains on the
            plain ELBO. Early stopping always monitors the ELBO (β = 1). A query model from
            ``load_query_data`` should train with its reference's value.
        seed
            One seed for everything random (default: the model's construction ``seed``): the
            split, minibatch order, sampling noise and, on the first training of an untrained
            model, the initial weights (redrawn from this seed) and the data-dependent
            initialisation (recomputed from the training cells only). The same call with the
            same seed gives the same model.
        accelerator, devices
            Passed to ``lightning.Trainer``.
        data_on_device
            Keep the whole count matrix on the training device and build minibatches there
            (:mod:`regvi.data.device`). ``"auto"``: on a GPU when the counts take at most half
            its free memory, and never for memory-mapped counts. Host batches going to a GPU
            use pinned memory and asynchronous copies.
        precision
            ``"32-true"`` (default), ``"bf16-mixed"`` (CPU or GPU) or ``"16-mixed"`` (GPU):
            Lightning's automatic mixed precision. Matmuls run in the low precision; encoder
            and decoder outputs are cast back to float32, so the likelihood, the KL terms and
            the priors are computed in float32.
        compile
            Run the training loss through ``torch.compile`` (dynamic shapes). On a GPU this
            model's step is bound by kernel launches, and compiling made a step 1.5–2.2×
            faster on an H200 (``benchmarks/bench_gpu_profile.py``); the first step pays the
            compilation (15–70 s). Needs a C++ compiler on CPU and Triton on GPU.
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
        optimizer_state
            An Adam ``state_dict()`` to continue from (moments and step counts), e.g. after a
            worker restart; see :func:`regvi.io.load_optimizer_state`.
        initialise
            Redraw the weights from ``seed`` and redo the data-dependent initialisation from the
            training cells before training. ``None`` (default): only on the first training of
            an untrained model; ``False``: train the weights as they are (e.g. set by hand).
        **trainer_kwargs
            Passed to ``lightning.Trainer`` (e.g. ``strategy``, ``plugins``, ``precision``).

        Returns
        -------
        pandas.DataFrame
            One row per epoch: every loss term for train and validation, KL weight, active
            latent dims, theta mean, epoch time.
        """
        seed = _check_train_options(locals())
        if self.query is not None and not self.query.trains_anything():
            warnings.warn(
                "nothing to train: this query adds no category to the reference's and "
                "fine_tune is off, so its terms are the reference's (the latent is ready; "
                "pass fine_tune=... to load_query_data to adapt the model)",
                stacklevel=2,
            )
            return self.history
        max_epochs, patience, n_epochs_kl_warmup = self._epoch_budget(
            max_epochs, patience, n_epochs_kl_warmup
        )
        device = training_device(accelerator)
        precision = check_precision(precision, device)
        train_idx, val_idx = self._split_and_initialise(
            validation_fraction, stratify_validation, seed, initialise
        )
        train_loader, val_loader = self._train_loaders(
            train_idx, val_idx, batch_size, seed, device, data_on_device, shard
        )
        settings = TrainSettings(
            lr,
            weight_decay,
            eps,
            n_epochs_kl_warmup,
            scale_lr_with_batch_size,
            batch_size,
            compile=compile,
            max_kl_weight=max_kl_weight,
        )
        plan = TrainingPlan(self.module, n_obs_train=len(train_idx), settings=settings)
        plan.epoch_offset = len(self.history)
        plan.optimizer_state = dict(optimizer_state) if optimizer_state is not None else None
        self.early_stopping = None
        if early_stopping and val_loader is not None:
            self.early_stopping = self._early_stopping(
                patience,
                min_delta_per_feature,
                stop_during_warmup,
                restore_best,
                early_stopping_state,
            )
        all_callbacks = [
            EpochProgressBar(max_epochs, progress_bar),
            *([self.early_stopping] if self.early_stopping is not None else []),
            *([EpochCallback(epoch_callback)] if epoch_callback is not None else []),
            *(callbacks or []),
        ]
        query = getattr(self, "query", None)
        freeze = query.freeze(self.module) if query is not None else None
        if freeze is not None:  # only the query's new entries train
            all_callbacks.append(freeze.callback())
        torch.manual_seed(seed)
        trainer = _trainer(
            max_epochs, accelerator, devices, precision, all_callbacks, trainer_kwargs
        )
        self._fit(trainer, plan, train_loader, val_loader, freeze)
        return self.history

    def _epoch_budget(
        self, max_epochs: int | None, patience: int | None, warmup: int | str | None
    ) -> tuple[int, int, int | None]:
        """``train()``'s epoch settings with their defaults filled in: :data:`MODEL_EPOCHS`,
        or :data:`QUERY_EPOCHS` for a query model."""
        defaults: EpochDefaults = MODEL_EPOCHS if self.query is None else QUERY_EPOCHS
        return (
            defaults.max_epochs if max_epochs is None else max_epochs,
            defaults.patience if patience is None else patience,
            defaults.n_epochs_kl_warmup if warmup == "auto" else warmup,
        )

    def _split_and_initialise(
        self,
        validation_fraction: float,
        stratify_validation: bool,
        seed: int,
        initialise: bool | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Train / validation split (recorded on the model), then, on the first training of an
        untrained model or with ``initialise``, weights from ``seed`` and the data-dependent
        initialisation from the training cells."""
        n_cells = len(self._dataset())
        strata = None
        if stratify_validation:
            obs = self._setup_obs()
            parts = [
                obs[k].astype(str)
                for k in self.registry.keys_for("labels") + self.registry.keys_for("library_size")
            ]
            strata = pd.Series(["|".join(t) for t in zip(*parts, strict=True)]).to_numpy()
        train_idx, val_idx = train_validation_split(n_cells, validation_fraction, seed, strata)
        self.train_indices, self.validation_indices = train_idx, val_idx
        query = getattr(self, "query", None)
        if initialise and query is not None:
            raise ValueError(
                "initialise=True would redraw a query model's weights; a query keeps the "
                "reference's (see load_query_data)"
            )
        fresh = initialise is None and not self.is_trained and not len(self.history)
        if initialise or (fresh and query is None):
            # first training: weights from this seed, data-dependent init from training cells
            in_train = np.zeros(n_cells, dtype=bool)
            in_train[train_idx] = True
            self._initialise(seed, in_train)
        return train_idx, val_idx

    def _train_loaders(
        self,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        batch_size: int,
        seed: int,
        device: torch.device,
        data_on_device: bool | str,
        shard: tuple[int, int] | None,
    ) -> tuple[Any, Any]:
        """Training loader (shuffled, sharded) and validation loader (``None`` without
        validation cells), on the training device when ``data_on_device`` resolves to it."""
        data = self._dataset()
        on_device = resolve_data_on_device(
            data_on_device, data, device, memory_mapped=dataset_is_memory_mapped(data)
        )
        if on_device:
            data = to_device(data, device)
        self.data_on_device = on_device
        pin = device.type == "cuda" and not on_device
        replicas, rank = shard if shard is not None else (1, 0)
        train_loader = make_loader(
            data, train_idx, batch_size, True, seed, replicas, rank, pin_memory=pin
        )
        val_loader = (
            make_loader(
                data,
                val_idx,
                self._validation_batch_size(batch_size),
                shuffle=False,
                pin_memory=pin,
            )
            if len(val_idx)
            else None
        )
        return train_loader, val_loader

    def _early_stopping(
        self,
        patience: int,
        min_delta_per_feature: float,
        stop_during_warmup: bool,
        restore_best: bool,
        state: Mapping[str, float] | None,
    ) -> EarlyStopping:
        """Early stopping on the validation ELBO, continued from ``state`` when given."""
        es = EarlyStopping(
            min_delta=self._n_features() * min_delta_per_feature,
            patience=patience,
            stop_during_warmup=stop_during_warmup,
            restore_best=restore_best,
        )
        if state:
            es.best = float(state.get("best", es.best))
            es.best_epoch = int(state.get("best_epoch", es.best_epoch))
            es.wait = int(state.get("wait", es.wait))
        return es

    def _fit(
        self,
        trainer: Any,
        plan: TrainingPlan,
        train_loader: Any,
        val_loader: Any,
        freeze: Any,
    ) -> None:
        """Run ``trainer`` (the query's freeze released after, whatever happens), then append
        the epochs to :attr:`history` and mark the model trained."""
        with warnings.catch_warnings(), _quiet_lightning():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            # inference leaves the module in eval mode; Lightning keeps submodule modes as found
            self.module.train()
            try:
                trainer.fit(plan, train_dataloaders=train_loader, val_dataloaders=val_loader)
            finally:
                if freeze is not None:
                    freeze.release()
        self.module.eval()
        new = pd.DataFrame(plan.history)
        self.history = (
            pd.concat([self.history, new], ignore_index=True) if len(self.history) else new
        )
        self.is_trained = True

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def get_elbo(
        self,
        data: Any = None,
        indices: np.ndarray | None = None,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> float:
        """Negative ELBO per cell (reconstruction + KL_z + KL_l), as in validation.

        z and l are sampled from q (one draw per cell, from ``seed``; torch's global RNG is
        left as it was); theta is at its posterior mean exp(mu_theta), so the estimate carries
        no dispersion-sampling noise.

        Parameters
        ----------
        data
            Data to score (default: the setup data); checked like
            :meth:`get_latent_representation`'s.
        indices
            Cells to score (e.g. ``model.validation_indices``).
        batch_size
            Cells per batch.
        seed
            Seed of the z and l draws.
        """
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0)
        self.module.eval()
        n_obs = len(self.train_indices) if self.train_indices is not None else 1
        total, n = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in self._batches(data, indices, batch_size):
                out = self.module.loss(batch, n_obs, skip_n_obs_check=True, sample_theta=False)
                b = batch["index"].shape[0]
                total, n = total + float(out["elbo"]) * b, n + b
        return total / max(n, 1)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save weights (safetensors) and config / registry / history (JSON, CSV) to ``path``."""
        save_model(self, path, overwrite=overwrite)
