"""The metric names a sweep trial reports, given its config, and the check of metric settings.

A trial reports per-epoch training metrics (every epoch, to Tune and ASHA) and, once at the
end, bookkeeping and evaluation metrics (see :mod:`regvi.sweep.worker` and
:mod:`regvi.sweep.trial_eval`). Which names exist depends on the config: validation metrics
need ``training.validation_fraction > 0``, scib needs
``evaluation.scib`` and ``data.labels_key``, neighbourhood metrics need ``evaluation.neighbourhood``
and markers (``data.labels_key`` or ``evaluation.markers``), their cross-dataset / technical
versions need ``data.dataset_key`` / ``data.technical_covariate_keys``, low-count robustness needs
``evaluation.lowcount``, per-modality and attribution metrics need ``data.modalities``.

Names come from the code's own constants where they exist (:data:`regvi.training.LOGGED_TERMS`,
:data:`evaluation.scib.BIO_METRICS` / ``BATCH_METRICS``, :data:`evaluation.neighbourhood.
HEADLINE_KEYS`, :data:`evaluation.nc_summary.FAILURE_MODES`, :data:`evaluation.robustness.
DEFAULT_QS`); the remaining pieces are listed once here, and ``tests/test_sweep_config.py`` runs
the real training and evaluation on tiny data and checks that they produce exactly these names.

:func:`check_metric_settings` refuses an objective (or the metric ASHA prunes on) that the
configured trials will not report, naming the key, the value, the closest valid names and the
setting that would enable it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from regvi.sweep.errors import ConfigError

if TYPE_CHECKING:
    from regvi.sweep.config import SweepConfig

#: Per-epoch metrics besides ``train_<term>`` / ``validation_<term>`` (TrainingPlan.finish_epoch).
EPOCH_METRICS = ("epoch", "kl_weight", "epoch_time_s")
#: Derived per-epoch term of every prefix (``_EpochAccumulator.result``).
DERIVED_TERMS = ("n_active_dims",)
#: Loss terms the multimodal module reports per modality m, as ``<term>_<m>``
#: (``RegMultiVIModule.loss``).
MODALITY_LOSS_TERMS = ("reconstruction", "kl_z", "kl_library", "global", "theta_mean")
#: Final-report bookkeeping of every trial (:func:`regvi.sweep.worker.train_worker` and its
#: ``_setup_seconds``).
TRIAL_BOOKKEEPING = (
    "final",
    "epochs_trained",
    "world_size",
    "resumed_optimizer_state",
    "setup_workers_s",
    "setup_imports_s",
    "setup_data_s",
    "setup_model_s",
    "training_wall_s",
)
#: Evaluation bookkeeping of every trial (``evaluate`` and
#: :func:`regvi.sweep.trial_eval.evaluate_trial`).
EVAL_BOOKKEEPING = (
    "eval_n_cells",
    "eval_seconds_knn",
    "eval_seconds_total",
    "eval_in_pool",
    "eval_warm",
)
#: Prefixes of the metrics evaluation adds to a trial's final report (scib, neighbourhood,
#: low-count robustness, evaluation bookkeeping, modality attribution): the one list, e.g. of
#: the final metrics the MLflow tracker logs besides :data:`TRIAL_BOOKKEEPING`.
EVALUATION_METRIC_PREFIXES = ("scib_", "nc_", "lowcount_", "eval_", "attribution_")
#: scib-metrics functions that return several values, reported as ``<metric>_<value>``.
SCIB_MULTI_VALUED = {"nmi_ari_": ("nmi", "ari")}
SCIB_AGGREGATES = ("bio", "batch", "total")
#: KMeans NMI / ARI averaged over starts, and the aggregates with them (``evaluation.scib``)
SCIB_STABLE = ("kmeans_nmi_mean", "kmeans_ari_mean", "bio_stable", "total_stable")
#: Per-mask neighbourhood summaries (``headline_numbers``), reported as ``nc_<summary>_<mask>``.
NC_MASK_SUMMARIES = (
    "median_corr_avg",
    "median_r_mean",
    "isolated",
    "expected_isolated",
    "isolation_norm",
)
#: Neighbourhood summaries over all cells, besides the headline keys (``neighbourhood_metrics``).
NC_CELL_SUMMARIES = ("frac_no_marker_signal",)
#: Neighbourhood masks (:mod:`evaluation.nc_masks`): always, with a dataset key, per technical key
#: (``<key>``) and with any technical key.
NC_LIBRARY_MASKS = ("same_library", "between_libraries")
NC_DATASET_MASKS = ("cross_library", "cross_dataset")
NC_TECHNICAL_KEY_MASKS = ("within_{key}", "between_{key}")
NC_TECHNICAL_MASKS = ("cross_technical",)
#: Low-count robustness values per thinning level (``low_count_robustness``).
LOWCOUNT_VALUES = ("knn_preservation", "displacement", "median_umis")
LOWCOUNT_LABEL_VALUES = ("label_majority",)

#: Placeholder of a name part that the config does not fix (shown in suggestions).
MODALITY = "<modality>"
KEY = "<key>"
_PLACEHOLDER = re.compile(r"<[a-z]+>")


@dataclass(frozen=True)
class MetricFamily:
    """Metrics a trial reports together, under the same config conditions.

    Attributes
    ----------
    label
        What they are (for listings).
    names
        The metric names; names of a family that is off may hold placeholders (``<modality>``).
    per_epoch
        Reported every epoch (else once, in the final report after evaluation).
    conditions
        ``(setting that enables the family, whether this config has it)`` pairs.
    """

    label: str
    names: tuple[str, ...]
    per_epoch: bool
    conditions: tuple[tuple[str, bool], ...] = ()

    @property
    def enabled(self) -> bool:
        """Every condition holds: trials of this config report these names."""
        return all(met for _, met in self.conditions)

    def unmet(self) -> list[str]:
        """The settings this config lacks for the family."""
        return [what for what, met in self.conditions if not met]

    def matches(self, name: str) -> bool:
        """``name`` is one of the names (placeholders match any non-empty part)."""
        if name in self.names:
            return True
        for n in self.names:
            if _PLACEHOLDER.search(n):
                parts = _PLACEHOLDER.split(n)
                if re.fullmatch(".+".join(re.escape(p) for p in parts), name):
                    return True
        return False


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _positive_everywhere(cfg: SweepConfig, name: str, default: float) -> tuple[str, bool]:
    """The condition "training option ``name`` is > 0 in every trial" and whether it holds."""
    for p in cfg.params:
        if p.name == name:
            if p.type == "categorical":
                ok = all(isinstance(v, int | float) and v > 0 for v in p.values or [])
            else:
                ok = p.low is not None and p.low > 0
            return f"training.{name} > 0 in every trial (search.{name} may be 0)", ok
    value = cfg.training.get(name, default)
    return f"training.{name} > 0", isinstance(value, int | float) and value > 0


def scib_metric_names() -> list[str]:
    """``scib_<metric>`` of the metrics :func:`evaluation.scib.scib_metrics` runs by default,
    the aggregates ``scib_bio`` / ``scib_batch`` / ``scib_total``, and the KMeans-start averages
    ``scib_kmeans_{nmi,ari}_mean`` / ``scib_{bio,total}_stable``."""
    from evaluation.scib import BATCH_METRICS, BIO_METRICS

    out = []
    for metric in (*BIO_METRICS, *BATCH_METRICS):
        parts = next((v for k, v in SCIB_MULTI_VALUED.items() if metric.startswith(k)), None)
        out.extend(f"scib_{metric}_{p}" for p in parts) if parts else out.append(f"scib_{metric}")
    return out + [f"scib_{a}" for a in (*SCIB_AGGREGATES, *SCIB_STABLE)]


def neighbourhood_metric_names(technical_keys: Iterable[str] = ()) -> dict[str, list[str]]:
    """``nc_*`` names by what they need: ``"core"`` (the library level, always), ``"dataset"``
    (a dataset key) and ``"technical"`` (technical keys: the masks of ``technical_keys``, or of
    ``<key>`` when none are given)."""
    from evaluation.nc_summary import FAILURE_MODES
    from evaluation.neighbourhood import HEADLINE_KEYS

    keys = list(technical_keys) or [KEY]

    def is_dataset(k: str) -> bool:
        return "dataset" in k or k.endswith("_ds")

    def is_technical(k: str) -> bool:
        return "technical" in k

    head = {
        "core": [k for k in HEADLINE_KEYS if not is_dataset(k) and not is_technical(k)],
        "dataset": [k for k in HEADLINE_KEYS if is_dataset(k)],
        "technical": [k for k in HEADLINE_KEYS if is_technical(k)],
    }
    masks = {
        "core": list(NC_LIBRARY_MASKS),
        "dataset": list(NC_DATASET_MASKS),
        "technical": [m.format(key=k) for k in keys for m in NC_TECHNICAL_KEY_MASKS]
        + list(NC_TECHNICAL_MASKS),
    }
    out = {}
    for group in ("core", "dataset", "technical"):
        base = head[group] + [f"{s}_{m}" for m in masks[group] for s in NC_MASK_SUMMARIES]
        names = base + [f"random_{k}" for k in base]
        level = {"core": "library", "dataset": "dataset"}.get(group)
        if level:
            names += [f"frac_{mode}_{level}" for mode in FAILURE_MODES]
        if group == "core":
            names += list(NC_CELL_SUMMARIES)
        out[group] = [f"nc_{n}" for n in names]
    return out


def lowcount_metric_names(labels: bool) -> list[str]:
    """``lowcount_q<q>_<value>`` for the default thinning levels (``label_majority`` with
    labels)."""
    from evaluation.robustness import DEFAULT_QS

    values = LOWCOUNT_VALUES + (LOWCOUNT_LABEL_VALUES if labels else ())
    return [f"lowcount_q{q:g}_{v}" for q in DEFAULT_QS for v in values]


def attribution_metric_names(modalities: list[str]) -> list[str]:
    """``attribution_*`` summaries of a multimodal trial (``ModalityAttribution.summary``) for
    the latent blocks ``modalities`` (sorted, as the model orders them)."""
    mods = sorted(modalities)
    out = ["attribution_target_mu"]
    # (placeholder blocks of a config without modalities repeat: names are deduplicated)
    for m in mods:
        out += [f"attribution_median_{m}", f"attribution_share_led_{m}"]
    out += [f"attribution_{d}_decoder_total_attr_median" for d in mods]
    if len(mods) == 2:
        out += ["attribution_log2_ratio_median", "attribution_log2_ratio_iqr"]
        upstream = f"log2_{mods[0]}_vs_{mods[1]}_attr"
        out += [f"attribution_{upstream}_{s}" for s in ("median", "mean", "iqr")]
    return list(dict.fromkeys(out))


def epoch_metric_names(prefix: str, modalities: list[str] | None = None) -> list[str]:
    """``<prefix>_<term>`` of one epoch (``train`` or ``validation``); with ``modalities``
    only the per-modality terms ``<prefix>_<term>_<m>``."""
    from regvi.training import LOGGED_TERMS

    if modalities is not None:
        return [f"{prefix}_{t}_{m}" for m in modalities for t in MODALITY_LOSS_TERMS]
    return [f"{prefix}_{t}" for t in (*LOGGED_TERMS, *DERIVED_TERMS)]


def _epoch_families(
    mod_names: list[str], validation: tuple[str, bool], multimodal: tuple[str, bool]
) -> list[MetricFamily]:
    """The per-epoch families: training and validation terms, overall and per modality."""
    return [
        MetricFamily(
            "training (per epoch)",
            (*EPOCH_METRICS, *epoch_metric_names("train")),
            per_epoch=True,
        ),
        MetricFamily(
            "validation (per epoch)",
            tuple(epoch_metric_names("validation")),
            per_epoch=True,
            conditions=(validation,),
        ),
        MetricFamily(
            "training per modality (per epoch)",
            tuple(epoch_metric_names("train", mod_names)),
            per_epoch=True,
            conditions=(multimodal,),
        ),
        MetricFamily(
            "validation per modality (per epoch)",
            tuple(epoch_metric_names("validation", mod_names)),
            per_epoch=True,
            conditions=(multimodal, validation),
        ),
    ]


def _scib_family(ev: dict[str, Any], labels: bool) -> MetricFamily:
    """The scib family (needs ``evaluation.scib`` and ``data.labels_key``)."""
    scib = (
        ("evaluation.scib: true", ev.get("scib", True) is not False),
        ("data.labels_key", labels),
    )
    return MetricFamily(
        "scib", (*scib_metric_names(), "eval_seconds_scib"), per_epoch=False, conditions=scib
    )


def _neighbourhood_families(
    data: dict[str, Any], ev: dict[str, Any], labels: bool
) -> list[MetricFamily]:
    """The neighbourhood families: timing, library level, across datasets / technical keys."""
    markers = ev.get("markers") not in (None, "data")
    technical = _as_list(data.get("technical_covariate_keys"))
    nc_on = ("evaluation.neighbourhood: true", ev.get("neighbourhood", True) is not False)
    nc = (nc_on, ("data.labels_key or evaluation.markers (a file or gene list)", labels or markers))
    nc_names = neighbourhood_metric_names(technical)
    return [
        MetricFamily(
            "neighbourhood timing",
            ("eval_seconds_neighbourhood",),
            per_epoch=False,
            conditions=(nc_on,),
        ),
        MetricFamily(
            "neighbourhood",
            (*nc_names["core"], "eval_n_markers"),
            per_epoch=False,
            conditions=nc,
        ),
        MetricFamily(
            "neighbourhood across datasets",
            tuple(nc_names["dataset"]),
            per_epoch=False,
            conditions=(*nc, ("data.dataset_key", bool(data.get("dataset_key")))),
        ),
        MetricFamily(
            "neighbourhood across technical covariates",
            tuple(nc_names["technical"]),
            per_epoch=False,
            conditions=(*nc, ("data.technical_covariate_keys", bool(technical))),
        ),
    ]


def _lowcount_families(ev: dict[str, Any], labels: bool) -> list[MetricFamily]:
    """The low-count robustness families (label majority: with ``data.labels_key``)."""
    lowcount = (("evaluation.lowcount: true", bool(ev.get("lowcount", False))),)
    return [
        MetricFamily(
            "low-count robustness",
            (*lowcount_metric_names(labels=False), "eval_seconds_lowcount"),
            per_epoch=False,
            conditions=lowcount,
        ),
        MetricFamily(
            "low-count label majority",
            tuple(n for n in lowcount_metric_names(labels=True) if n.endswith("label_majority")),
            per_epoch=False,
            conditions=(*lowcount, ("data.labels_key", labels)),
        ),
    ]


def metric_families(cfg: SweepConfig) -> list[MetricFamily]:
    """Every metric family a trial of ``cfg`` could report, each with the settings it needs
    (:attr:`MetricFamily.enabled`: this config has them all)."""
    data, ev = cfg.data, cfg.evaluation
    mods = sorted(data["modalities"]) if cfg.multimodal else None
    labels = bool(data.get("labels_key"))
    validation = _positive_everywhere(cfg, "validation_fraction", 0.1)
    multimodal = ("data.modalities (multimodal trials)", cfg.multimodal)
    blocks = (
        "latent_mode 'concat' in every trial (not 'poe': no latent blocks)",
        not may_run_poe(cfg.model, cfg.params),
    )
    return [
        *_epoch_families(mods or [MODALITY], validation, multimodal),
        MetricFamily("trial bookkeeping", TRIAL_BOOKKEEPING, per_epoch=False),
        MetricFamily("evaluation bookkeeping", EVAL_BOOKKEEPING, per_epoch=False),
        _scib_family(ev, labels),
        *_neighbourhood_families(data, ev, labels),
        *_lowcount_families(ev, labels),
        MetricFamily(
            "modality attribution",
            tuple(attribution_metric_names(mods or [MODALITY, MODALITY])),
            per_epoch=False,
            conditions=(multimodal, blocks),
        ),
    ]


def may_run_poe(model: dict[str, Any], params: list[Any]) -> bool:
    """Whether some trial with the fixed ``model`` options and the searched ``params`` can use
    RegMultiVI's ``latent_mode="poe"``."""
    if model.get("latent_mode") == "poe":
        return True
    return any(p.name == "latent_mode" and "poe" in (p.values or ()) for p in params)


def reported_metrics(cfg: SweepConfig, per_epoch: bool | None = None) -> list[str]:
    """The names trials of ``cfg`` report (``per_epoch``: only per-epoch / only final ones)."""
    return [
        n
        for f in metric_families(cfg)
        if f.enabled and (per_epoch is None or f.per_epoch == per_epoch)
        for n in f.names
    ]


def asha_metric(cfg: SweepConfig) -> tuple[str, str]:
    """Per-epoch metric ASHA prunes on: the objective when it is per-epoch, else validation ELBO."""
    if not cfg.multi_objective and cfg.objective_metrics[0].startswith(("validation_", "train_")):
        return cfg.objective_metrics[0], cfg.objective_modes[0]
    return "validation_elbo", "min"


def final_only_objective(cfg: SweepConfig) -> bool:
    """An objective is absent from the per-epoch reports (reported after evaluation)."""
    per_epoch = set(reported_metrics(cfg, per_epoch=True))
    return any(m not in per_epoch for m in cfg.objective_metrics)


def _suggestions(name: str, families: list[MetricFamily]) -> str:
    owner: dict[str, MetricFamily] = {}
    for f in sorted(families, key=lambda f: not f.enabled):  # enabled names first
        for n in f.names:
            owner.setdefault(n, f)
    close = difflib.get_close_matches(name, list(owner), n=4, cutoff=0.6)
    if not close:
        return "no close match"
    shown = []
    for n in close:
        f = owner[n]
        shown.append(repr(n) if f.enabled else f"{n!r} (needs {' and '.join(f.unmet())})")
    return "closest: " + ", ".join(shown)


def check_metric(
    cfg: SweepConfig, name: Any, where: str, families: list[MetricFamily] | None = None
) -> None:
    """Refuse a metric name (config key ``where``) that trials of ``cfg`` do not report.

    Raises :class:`~regvi.sweep.config.ConfigError` naming ``where``, the value and either the
    closest valid names (a misspelt name) or the settings that would enable it.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: {name!r}; expected a metric name")
    families = metric_families(cfg) if families is None else families
    found = [f for f in families if f.matches(name)]
    if any(f.enabled for f in found):
        return
    listing = "python -m regvi.sweep CONFIG --list-metrics lists them"
    if not found:
        raise ConfigError(
            f"{where}: {name!r} is not a metric the trials report; "
            f"{_suggestions(name, families)} ({listing})"
        )
    unmet = sorted({u for f in found for u in f.unmet()})
    raise ConfigError(
        f"{where}: {name!r} is not reported by this config's trials; it needs "
        f"{' and '.join(unmet)} ({listing})"
    )


def check_metric_settings(cfg: SweepConfig) -> None:
    """Check every metric name a config sets: the objective(s) and the metric ASHA prunes on.

    Raises :class:`~regvi.sweep.config.ConfigError` for a name the configured trials will not
    report (misspelt, or switched off), before anything starts.
    """
    families = metric_families(cfg)
    for i, m in enumerate(cfg.objective_metrics):
        where = f"objective.metric[{i}]" if cfg.multi_objective else "objective.metric"
        check_metric(cfg, m, where, families=families)
    if cfg.scheduler.get("name") == "asha":
        metric, _ = asha_metric(cfg)
        found = [f for f in families if f.per_epoch and f.matches(metric)]
        if not any(f.enabled for f in found):
            unmet = sorted({u for f in found for u in f.unmet()}) or ["a per-epoch metric"]
            raise ConfigError(
                f"scheduler: ASHA prunes on the per-epoch metric {metric!r} (the objective when "
                "it is a train_*/validation_* metric, else validation_elbo), which this "
                f"config's trials do not report: it needs {' and '.join(unmet)}; use "
                "scheduler: {name: fifo}"
            )


def describe_metrics(cfg: SweepConfig) -> str:
    """The metric families of ``cfg``, those its trials report and those it switches off."""
    lines = []
    for f in metric_families(cfg):
        when = "every epoch" if f.per_epoch else "final report"
        state = "reported" if f.enabled else f"off (needs {' and '.join(f.unmet())})"
        lines.append(f"{f.label} [{when}]: {state}")
        if f.enabled:
            lines.append("  " + ", ".join(f.names))
    return "\n".join(lines)
