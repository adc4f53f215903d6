"""A trial's settings: one frozen dataclass from the sweep config to the Ray Train worker.

Data flow::

    SweepConfig ──TrialSettings.from_config──▶ Tune's param_space {"settings": …}   (driver)
    settings.for_trial(sampled params) ───────▶ TorchTrainer(train_loop_config=…)  (trial)
    settings.model / .training / .evaluation ─▶ build, train, evaluate             (worker)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evaluation.scib import KMEANS_STARTS
from regvi.sweep.config import MULTIPLIER_ARGS, SweepConfig, decode_data_value, train_default


@dataclass(frozen=True)
class EvaluationSettings:
    """The ``evaluation`` section of a sweep config, with its defaults."""

    #: cells of the fixed, stratified evaluation subsample
    n_subsample: int = 20_000
    scib: bool = True
    neighbourhood: bool = True
    #: marker genes: a CSV path, ``"data"`` (from the labels) or ``None``
    markers: Any = None
    lowcount: bool = False
    umap: bool = True
    n_jobs: int = 1
    #: KMeans starts averaged by ``scib_bio_stable`` / ``scib_total_stable``
    kmeans_starts: int = KMEANS_STARTS
    #: evaluate in the sweep's warm evaluator processes (:mod:`regvi.sweep.evaluator`)
    pool: bool = True


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial's Train workers need, built once in the driver from the config.

    ``model`` / ``training`` / ``data`` hold the fixed options; :meth:`for_trial` merges a
    trial's sampled parameters into them (``*_params`` name which parameter goes where).
    Fields are JSON-able values, so the settings pickle through Ray.
    """

    #: data keys: ``path`` (or ``modalities``) and the registry's covariate purposes
    data: dict[str, Any]
    #: RegVI / RegMultiVI constructor arguments
    model: dict[str, Any]
    #: ``RegVI.train`` arguments
    training: dict[str, Any]
    evaluation: EvaluationSettings
    model_params: tuple[str, ...]
    train_params: tuple[str, ...]
    data_params: tuple[str, ...]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    seed: int
    #: folder of the trials' Ray Train runs (``<sweep>/train``)
    train_storage: str
    #: folder of the evaluation's cached reference results
    reference_cache: str | None
    #: sweep name: finds the sweep's warm evaluators
    sweep: str | None
    #: restarts of a trial's Train workers (Ray Train's FailureConfig) before the trial fails
    max_failures: int = 2
    #: set per trial (:meth:`for_trial`): the trial driver's clock when it started the run
    trial_start: float | None = None
    #: set per trial: rank 0 writes why training diverged here (the trial is then not retried)
    divergence_file: str | None = None

    @classmethod
    def from_config(cls, cfg: SweepConfig, sweep_dir: Path) -> TrialSettings:
        """The settings every trial of the sweep ``cfg`` (stored in ``sweep_dir``) shares."""

        def names(target: str) -> tuple[str, ...]:
            return tuple(p.name for p in cfg.params if p.target == target)

        return cls(
            data=dict(cfg.data),
            model=dict(cfg.model),
            training=dict(cfg.training),
            evaluation=EvaluationSettings(**cfg.evaluation),
            model_params=names("model"),
            train_params=names("training"),
            data_params=names("data"),
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=cfg.gpus_per_worker,
            seed=cfg.seed,
            train_storage=str(sweep_dir / "train"),
            reference_cache=str(sweep_dir / "reference_cache"),
            sweep=cfg.name,
        )

    def for_trial(
        self, params: dict[str, Any], trial_start: float, divergence_file: str
    ) -> TrialSettings:
        """These settings with one trial's sampled ``params`` merged in."""
        return replace(
            self,
            data=self.data_arguments(params),
            model=self.model_arguments(params),
            training=self.training_arguments(params),
            trial_start=trial_start,
            divergence_file=divergence_file,
        )

    def model_arguments(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fixed model arguments + this trial's sampled ones; ``name.modality`` entries set one
        modality's value of a per-modality option (scalars are expanded to every modality)."""
        kwargs = dict(self.model)
        modalities = sorted(self.data.get("modalities", {}))
        for k, v in params.items():
            if k not in self.model_params:
                continue
            if "." in k and modalities:
                base, modality = k.split(".", 1)
                current = kwargs.get(base)
                if not isinstance(current, dict):
                    current = (
                        {}
                        if current is None or base in MULTIPLIER_ARGS
                        else {m: current for m in modalities}
                    )
                kwargs[base] = {**current, modality: v}
            else:
                kwargs[k] = v
        return kwargs

    def data_arguments(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fixed data keys + this trial's sampled covariate purposes (lists decoded from JSON)."""
        data = dict(self.data)
        for k, v in params.items():
            if k in self.data_params:
                data[k] = decode_data_value(v)
        return data

    def training_arguments(self, params: dict[str, Any]) -> dict[str, Any]:
        """Fixed ``train()`` arguments + this trial's sampled ones."""
        return {**self.training, **{k: v for k, v in params.items() if k in self.train_params}}

    @property
    def max_epochs(self) -> int:
        """Epochs a trial trains at most (``training.max_epochs`` or ``RegVI.train``'s default)."""
        return int(self.training.get("max_epochs", train_default("max_epochs")))

    @property
    def train_kwargs(self) -> dict[str, Any]:
        """``training`` without ``max_epochs`` (a restarted worker trains the epochs left)."""
        return {k: v for k, v in self.training.items() if k != "max_epochs"}

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def resources_per_worker(self) -> dict[str, float]:
        """Ray resources of one Train worker."""
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources

    @property
    def multimodal(self) -> bool:
        """Paired modalities (``data.modalities``) → :class:`regvi.RegMultiVI` trials."""
        return "modalities" in self.data

    @property
    def data_source(self) -> str | dict[str, str]:
        """What :func:`regvi.sweep.worker.read_data` reads: a path, or modality → path."""
        return self.data.get("modalities") or self.data["path"]
