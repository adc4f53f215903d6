"""Lightning training plan: Adam, KL warmup, per-epoch metric accumulation, early stopping.

Per-step metrics are accumulated as detached tensors and turned into Python numbers once per
epoch (no per-step host syncs), then written to :attr:`TrainingPlan.history`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from tqdm.auto import tqdm

from regvi.module import RegVIModule

#: Terms of ``RegVIModule.loss`` that are logged per epoch (plus derived ones).
LOGGED_TERMS = (
    "loss",
    "elbo",
    "reconstruction",
    "kl_z",
    "kl_library",
    "global",
    "dispersion_kl",
    "ambient_prior",
    "feature_scaling_prior",
    "decoder_l2",
    "library_w_kl",
    "theta_mean",
)


@dataclass(frozen=True)
class EpochDefaults:
    """The epoch budget :meth:`regvi.base.BaseModel.train` uses when it is not given
    (docs/model.md#optimiser)."""

    max_epochs: int
    patience: int
    #: linear KL warm-up length in epochs (``None``: no warm-up)
    n_epochs_kl_warmup: int | None


#: a model trained on its own data
MODEL_EPOCHS = EpochDefaults(max_epochs=400, patience=45, n_epochs_kl_warmup=50)
#: a query model from ``load_query_data``: only its new technical terms train, from a
#: reference that finished at full KL weight, so no warm-up and a shorter budget
QUERY_EPOCHS = EpochDefaults(max_epochs=100, patience=10, n_epochs_kl_warmup=None)


@dataclass
class TrainSettings:
    """Optimisation settings (defaults: docs/model.md#optimiser)."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = MODEL_EPOCHS.n_epochs_kl_warmup
    scale_lr_with_batch_size: bool = False
    batch_size: int = 128
    compile: bool = False
    #: the KL weight the warm-up ends at (β_max of docs/model.md#kl-warm-up; 1: the ELBO)
    max_kl_weight: float = 2.0

    def effective_lr(self) -> float:
        """lr, or lr · B / 128 when scaling with batch size."""
        return self.lr * self.batch_size / 128 if self.scale_lr_with_batch_size else self.lr


def _fused_supported(plan: pl.LightningModule) -> bool:
    """Fused Adam runs on CPU and CUDA float parameters (torch ≥ 2.4)."""
    params = list(plan.parameters())
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in params
    )


class _EpochAccumulator:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.keys: list[str] = list(LOGGED_TERMS)
        self.n = 0

    def add(self, out: dict[str, torch.Tensor], n: int) -> None:
        if not self.sums:
            # LOGGED_TERMS first, then any further scalar terms (e.g. per-modality ones)
            extra = [k for k, v in out.items() if k not in LOGGED_TERMS and v.dim() == 0]
            self.keys = [*LOGGED_TERMS, *extra]
        for k in (*self.keys, "kl_z_per_dim"):
            v = out[k].detach() * n
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n += n

    def result(self, prefix: str) -> dict[str, float]:
        if self.n == 0:
            return {}
        means = {k: v / self.n for k, v in self.sums.items()}
        per_dim = means.pop("kl_z_per_dim")
        stacked = torch.stack([means[k] for k in self.keys]).cpu().numpy()
        res = {f"{prefix}_{k}": float(v) for k, v in zip(self.keys, stacked, strict=True)}
        res[f"{prefix}_n_active_dims"] = float((per_dim > 0.01).sum().item())
        return res


class TrainingPlan(pl.LightningModule):
    """Optimises a :class:`RegVIModule` with the plate-rule loss.

    Parameters
    ----------
    module
        The generative model (:class:`RegVIModule` or the multimodal module).
    n_obs_train
        N_train, used to scale global priors in training AND validation.
    settings
        Optimiser and warmup settings.
    """

    def __init__(self, module: RegVIModule | Any, n_obs_train: int, settings: TrainSettings):
        super().__init__()
        self.module = module
        self.n_obs_train = int(n_obs_train)
        self.settings = settings
        self.history: list[dict[str, float]] = []
        self._train_acc = _EpochAccumulator()
        self._val_acc = _EpochAccumulator()
        self._epoch_start = 0.0
        self.epoch_offset = 0
        #: optimizer ``state_dict`` to resume from (a restarted sweep worker)
        self.optimizer_state: dict[str, Any] | None = None
        self._compiled_loss: Callable[..., dict[str, torch.Tensor]] | None = None
        #: (KL weight, the same as a device tensor): made once per warmup value, not per step
        self._kl_tensor: tuple[float, torch.Tensor] | None = None

    @property
    def warmup_fraction(self) -> float:
        """How far the linear KL warm-up has come (1 once it is over or when disabled)."""
        n = self.settings.n_epochs_kl_warmup
        if not n:
            return 1.0
        return min(1.0, (self.current_epoch + self.epoch_offset) / n)

    @property
    def kl_weight(self) -> float:
        """β · the warm-up fraction: linear over ``n_epochs_kl_warmup`` epochs up to
        ``max_kl_weight`` (β, 2 by default)."""
        return self.settings.max_kl_weight * self.warmup_fraction

    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        lr = s.effective_lr()
        # the multimodal module gives one parameter group per modality (lr multipliers)
        groups = (
            self.module.parameter_groups(lr)
            if hasattr(self.module, "parameter_groups")
            else self.module.parameters()
        )
        # fused: one kernel per parameter group instead of ~10 element-wise ops per tensor
        # (the optimizer was 9-15 % of a CPU step); same update, same state_dict format
        optimizer = torch.optim.Adam(
            groups, lr=lr, weight_decay=s.weight_decay, eps=s.eps, fused=_fused_supported(self)
        )
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._train_acc = _EpochAccumulator()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.settings.compile:
            out = self._compiled_step(batch)
        else:
            out = self.module.loss(batch, self.n_obs_train, kl_weight=self.kl_weight)
        self._train_acc.add(out, batch["index"].shape[0])
        return out["loss"]

    def _compiled_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training loss through ``torch.compile`` (``train(compile=True)``).

        A GPU step of this model is bound by launching ~400 small kernels, not by the GPU
        (``benchmarks/bench_gpu_profile.py``); compiling fuses the element-wise work. Shapes
        are dynamic (batch rows and stored entries vary) and the KL weight is passed as a
        tensor, so neither a new batch nor a warmup epoch triggers a recompile.
        """
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self.module.loss, dynamic=True)
        kl = self.kl_weight
        if self._kl_tensor is None or self._kl_tensor[0] != kl:
            self._kl_tensor = (kl, torch.tensor(kl, dtype=torch.float32, device=self.device))
        return self._compiled_loss(batch, self.n_obs_train, kl_weight=self._kl_tensor[1])

    def on_validation_epoch_start(self) -> None:
        self._val_acc = _EpochAccumulator()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # z and l are sampled (an ELBO estimate); theta at its posterior mean
        # (docs/model.md#dispersion-prior)
        out = self.module.loss(
            batch,
            self.n_obs_train,
            kl_weight=self.kl_weight,
            skip_n_obs_check=True,
            sample_theta=False,
        )
        self._val_acc.add(out, batch["index"].shape[0])

    def on_train_epoch_end(self) -> None:
        self.finish_epoch()

    def finish_epoch(self) -> dict[str, float]:
        """Build (once per epoch) and return this epoch's metrics row.

        Callbacks' ``on_train_epoch_end`` run before the module's, so they call this too.
        """
        epoch = self.current_epoch + self.epoch_offset
        if self.history and self.history[-1]["epoch"] == epoch:
            return self.history[-1]
        row: dict[str, float] = {
            "epoch": float(epoch),
            "kl_weight": self.kl_weight,
        }
        row.update(self._train_acc.result("train"))
        row.update(self._val_acc.result("validation"))
        row["epoch_time_s"] = time.perf_counter() - self._epoch_start
        bad = [
            k for k in ("train_loss", "validation_loss") if k in row and not math.isfinite(row[k])
        ]
        self.history.append(row)
        if bad:
            raise FloatingPointError(
                f"training diverged at epoch {int(row['epoch'])}: {', '.join(bad)} is not finite "
                "(try a lower lr, a longer KL warmup or a smaller model)"
            )
        self.log_dict({k: v for k, v in row.items() if k != "epoch"}, prog_bar=False)
        return row


class EarlyStopping(pl.Callback):
    """Stop when validation ELBO has not improved by ``min_delta`` for ``patience`` epochs.

    ``min_delta = n_features × min_delta_per_feature`` (docs/model.md#early-stopping). Epochs
    inside the KL warmup never count against patience unless ``stop_during_warmup``. With
    ``restore_best`` the weights of the best epoch are restored when training ends.
    """

    def __init__(
        self,
        min_delta: float,
        patience: int = MODEL_EPOCHS.patience,
        monitor: str = "validation_elbo",
        stop_during_warmup: bool = False,
        restore_best: bool = False,
    ):
        self.min_delta = min_delta
        self.patience = patience
        self.monitor = monitor
        self.stop_during_warmup = stop_during_warmup
        self.restore_best = restore_best
        self.best = math.inf
        self.best_epoch = -1
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        row = plan.finish_epoch()
        if self.monitor not in row:
            return
        value, epoch = row[self.monitor], int(row["epoch"])
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best:
                self._best_state = copy.deepcopy(plan.module.state_dict())
            return
        in_warmup = plan.warmup_fraction < 1.0
        if in_warmup and not self.stop_during_warmup:
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        if self.restore_best and self._best_state is not None:
            plan.module.load_state_dict(self._best_state)


class EpochProgressBar(pl.Callback):
    """One tqdm bar over epochs with the latest train loss and validation ELBO."""

    def __init__(self, max_epochs: int, enabled: bool = True):
        self.max_epochs = max_epochs
        self.enabled = enabled
        self.bar: Any = None

    def on_train_start(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        self.bar = tqdm(
            total=self.max_epochs, desc="regvi training", unit="epoch", disable=not self.enabled
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        row = plan.finish_epoch()
        if self.bar is not None:
            post = {"loss": f"{row.get('train_loss', np.nan):.4g}"}
            if "validation_elbo" in row:
                post["val_elbo"] = f"{row['validation_elbo']:.4g}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def on_train_end(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochCallback(pl.Callback):
    """Calls ``fn(row)`` with each epoch's metrics (used by the sweep to report to Tune)."""

    def __init__(self, fn: Callable[[dict[str, float]], None]):
        self.fn = fn

    def on_train_epoch_end(self, trainer: pl.Trainer, plan: TrainingPlan) -> None:
        self.fn(dict(plan.finish_epoch()))
