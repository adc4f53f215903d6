"""Shared parts of the user-facing models: data-dependent initialisation and the training loop."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from regvi.checks import check_bool, check_choice, check_float, check_int, check_str
from regvi.data import make_loader, train_validation_split
from regvi.data.counts import iter_row_blocks, row_totals
from regvi.data.device import (
    check_precision,
    dataset_is_memory_mapped,
    resolve_data_on_device,
    to_device,
    training_device,
)
from regvi.io import save_model
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


def _depth_normalised_stats(
    X: np.ndarray | sp.csr_matrix, log_offset: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell relative size factor exp(log total − offset) and the depth-normalised matrix.

    Row-wise, so it applies to a row block of the counts just as to the whole matrix.
    """
    totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    size = np.exp(np.log(np.maximum(totals, 1.0)) - log_offset)
    inv = 1.0 / size
    Xn = sp.diags(inv) @ X if sp.issparse(X) else X * inv[:, None]
    return size, Xn


def _group_sums(Xn: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum of rows of ``Xn`` per group, dense ``(n_groups, G)``."""
    n = Xn.shape[0]
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    sums = onehot @ Xn
    return sums.toarray() if sp.issparse(sums) else np.asarray(sums)


def _group_means(Xn: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of rows of ``Xn`` per group, ``(n_groups, G)``."""
    counts = np.bincount(codes, minlength=n_groups)
    return _group_sums(Xn, codes, n_groups) / np.maximum(counts, 1)[:, None]


class _GroupMeans:
    """Per-group column means accumulated over row blocks (chunk by chunk)."""

    def __init__(self, codes: np.ndarray, n_groups: int, n_cols: int):
        self.codes, self.n_groups = np.asarray(codes), n_groups
        self.sums = np.zeros((n_groups, n_cols))
        self.counts = np.bincount(self.codes, minlength=n_groups)

    def add_rows(self, codes: np.ndarray, block: Any) -> None:
        """Add the rows of ``block`` whose groups are ``codes``."""
        self.sums += _group_sums(block, codes, self.n_groups)

    def result(self) -> np.ndarray:
        return self.sums / np.maximum(self.counts, 1)[:, None]


def _library_stats(
    log_lib: np.ndarray, codes: np.ndarray, use: np.ndarray, fallback: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group mean, variance and cell count of the log library over the cells in ``use``.

    A group without cells in ``use`` (e.g. all its cells went to validation) takes its stats
    from the cells in ``fallback`` (every cell with counts); a group without any cells takes the
    mean of the other groups' means and variance 1.
    """
    means, variances = np.full(n_groups, np.nan), np.ones(n_groups)
    codes = np.asarray(codes, dtype=np.int64)
    n = np.bincount(codes[use], minlength=n_groups)[:n_groups]
    found = np.zeros(n_groups, dtype=bool)
    for mask in (use, fallback):  # one pass per mask over all groups (bincount, no group loop)
        c, v = codes[mask], log_lib[mask]
        cnt = np.bincount(c, minlength=n_groups)[:n_groups]
        mean = np.bincount(c, weights=v, minlength=n_groups)[:n_groups] / np.maximum(cnt, 1)
        dev2 = np.bincount(c, weights=(v - mean[c]) ** 2, minlength=n_groups)[:n_groups]
        take = ~found & (cnt > 0)
        means[take] = mean[take]
        variances[take] = np.where(cnt[take] > 1, dev2[take] / np.maximum(cnt[take], 1), 1.0)
        found |= take
    if np.isnan(means).all():
        means[:] = 0.0
    means[np.isnan(means)] = np.nanmean(means)
    return means, variances, n


def _set_library_prior(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    use: np.ndarray,
    chunk_nnz: int | None,
) -> np.ndarray:
    """Set the library-size prior from the log library sizes of the ``use`` cells with
    counts; return the mask of cells with counts."""
    totals = row_totals(X, chunk_nnz)
    nonzero = totals > 0
    log_lib = np.log(np.maximum(totals, 1.0))
    lib_codes = cov["library_size"][:, 0]
    n_lib = module.config.n_library_groups
    means, variances, n_per_group = _library_stats(
        log_lib, lib_codes, use & nonzero, nonzero, n_lib
    )
    module.set_library_prior(
        torch.tensor(means, dtype=torch.float32),
        torch.tensor(variances, dtype=torch.float32),
        torch.tensor(n_per_group),
    )
    return nonzero


def _feature_stats(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    use: np.ndarray,
    dispersion_from_data: bool,
    chunk_nnz: int | None,
) -> tuple[np.ndarray, list[torch.Tensor] | None, torch.Tensor | None] | None:
    """Mean depth-normalised expression, ambient group means (with ambient) and
    method-of-moments theta (``dispersion_from_data``) over the ``use`` cells, accumulated
    over row chunks; ``None`` when no cell is used."""
    n_all = X.shape[0]
    offset = float(module.library_log_offset)
    n_cells, n_genes = int(use.sum()), X.shape[1]
    if n_cells == 0:
        return None
    col_sum = np.zeros(n_genes)
    ambient: list[tuple[np.ndarray, _GroupMeans]] = []
    if module.config.use_ambient:
        for k, n in enumerate(module.config.n_ambient_per_key):
            codes = cov["ambient"][use, k]
            ambient.append((cov["ambient"][:, k], _GroupMeans(codes, n, n_genes)))
    disp: tuple[np.ndarray, _GroupMeans, _GroupMeans] | None = None
    if dispersion_from_data:
        n_disp = module.log_theta_mean.shape[0]
        codes = cov["dispersion"][:, 0] if n_disp > 1 else np.zeros(n_all, dtype=np.int64)
        disp = (
            codes,
            _GroupMeans(codes[use], n_disp, n_genes),
            _GroupMeans(codes[use], n_disp, n_genes),
        )
    for start, stop, block in iter_row_blocks(X, chunk_nnz):
        keep = use[start:stop]
        if not keep.any():
            continue
        block = block if keep.all() else block[keep]
        _, Xn = _depth_normalised_stats(block, offset)
        col_sum += np.asarray(Xn.sum(axis=0)).ravel()
        for all_codes, acc in ambient:
            acc.add_rows(all_codes[start:stop][keep], Xn)
        if disp is not None:
            all_codes, disp_mean, disp_sq = disp
            sub = all_codes[start:stop][keep]
            disp_mean.add_rows(sub, Xn)
            disp_sq.add_rows(sub, Xn.multiply(Xn) if sp.issparse(Xn) else Xn**2)
        del Xn
    mean_expr = col_sum / n_cells
    ambient_means = None
    if module.config.use_ambient:
        ambient_means = [torch.tensor(acc.result(), dtype=torch.float32) for _, acc in ambient]
    theta = None
    if disp is not None:
        m = disp[1].result()
        v = disp[2].result() - m**2
        excess = np.maximum(v - m, 1e-8)
        # 90% of the excess variance is biological (explained by z), 10% technical
        theta = torch.tensor(m**2 / (0.1 * excess), dtype=torch.float32)
    return mean_expr, ambient_means, theta


def initialise_from_data(
    module: RegVIModule,
    X: np.ndarray | sp.csr_matrix,
    cov: Mapping[str, np.ndarray],
    data_init: bool,
    dispersion_init: str,
    chunk_nnz: int | None = None,
    cells: np.ndarray | None = None,
) -> None:
    """Library prior (always) and data-dependent init of one modality's module
    (docs/model.md#data-dependent-initialisation).

    Every statistic is accumulated over row chunks of ``X`` (``chunk_nnz`` stored values per
    chunk, default :data:`regvi.data.counts.CHUNK_NNZ`), so a large or memory-mapped matrix
    needs no full-size temporaries; a matrix below one chunk is processed in one piece.

    Parameters
    ----------
    module
        The module to initialise in place.
    X
        Counts of the modality, cells × features.
    cov
        Encoded covariates (codes as seen by this modality).
    data_init
        Decoder bias and ambient from the data.
    dispersion_init
        ``"data"``: method-of-moments theta.
    chunk_nnz
        Stored values per row chunk.
    cells
        Boolean mask of the cells the statistics are taken from (``train()`` passes the
        training cells, so nothing is learnt from validation cells); default all. Cells without
        counts (a modality missing in a cell) never count.
    """
    n_all = X.shape[0]
    use = np.ones(n_all, dtype=bool) if cells is None else np.asarray(cells, dtype=bool)
    if use.shape != (n_all,):
        raise ValueError(f"cells mask has shape {use.shape}; expected ({n_all},)")
    nonzero = _set_library_prior(module, X, cov, use, chunk_nnz)
    if not (data_init or dispersion_init == "data"):
        return
    stats = _feature_stats(module, X, cov, use & nonzero, dispersion_init == "data", chunk_nnz)
    if stats is None:  # no cell with counts to learn from
        return
    mean_expr, ambient_means, theta = stats
    if data_init:
        module.data_init(torch.tensor(mean_expr, dtype=torch.float32), ambient_means, theta)
    elif theta is not None:
        module.data_init(None, None, theta)  # dispersion only; keep default init


def feature_columns(
    names: Sequence[str], features: Sequence[str] | None, missing_message: str
) -> np.ndarray | None:
    """Positions of ``features`` in ``names`` (``None`` for all); a KeyError
    ``"<missing_message>: [...]"`` names up to ten missing ones."""
    if features is None:
        return None
    pos = {g: i for i, g in enumerate(names)}
    missing = [g for g in features if g not in pos]
    if missing:
        raise KeyError(f"{missing_message}: {missing[:10]}")
    return np.array([pos[g] for g in features])


def expression_frame(
    expr: np.ndarray, obs_names: Any, features: Sequence[str] | None, names: Sequence[str]
) -> pd.DataFrame:
    """``expr`` as a DataFrame: cells × the requested ``features`` (all ``names`` if ``None``)."""
    return pd.DataFrame(
        expr, index=obs_names, columns=list(features) if features is not None else names
    )


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
        "default": {"n_hidden": 128, "n_latent": 10},
        "large": {"n_hidden": 512, "n_latent": 128},
        "xlarge": {"n_hidden": 1024, "n_latent": 256},
    }

    @classmethod
    def preset(cls, name: str) -> dict[str, int]:
        """Capacity presets: ``"default"`` 128/10, ``"large"`` 512/128, ``"xlarge"`` 1024/256."""
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
    @torch.inference_mode()
    def _latent(
        self,
        data: Any,
        indices: np.ndarray | None,
        give_mean: bool,
        batch_size: int,
        category_fallback: Mapping[str, str] | None,
    ) -> np.ndarray:
        """Posterior mean (or one sample) of the (joint) latent, ``(n_cells, n_latent)``."""
        self.module.eval()
        out = []
        for batch in self._batches(data, indices, batch_size, category_fallback):
            inf = self.module.inference(batch, sample=not give_mean)
            out.append((inf["qz_mean"] if give_mean else inf["z"]).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.n_latent), np.float32)

    def _expression(
        self,
        data: Any,
        indices: np.ndarray | None,
        batch_size: int,
        category_fallback: Mapping[str, str] | None,
        rates: Callable[[dict[str, Any]], torch.Tensor],
        cols: np.ndarray | None,
        library_size: float | None,
    ) -> np.ndarray:
        """``rates(batch)`` over the minibatches, rows scaled to ``library_size`` (if given),
        columns ``cols`` (all if ``None``), ``(n_cells, n_features)``."""
        out = []
        for batch in self._batches(data, indices, batch_size, category_fallback):
            rho = rates(batch)
            if library_size is not None:
                rho = rho / rho.sum(-1, keepdim=True) * library_size
            out.append((rho if cols is None else rho[:, cols]).numpy())
        return np.concatenate(out)

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
