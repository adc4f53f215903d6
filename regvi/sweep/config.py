"""Sweep configuration: YAML (safe_load) → validated dataclasses, with errors naming the key.

See ``sweeps/quickstart.yaml`` for an annotated example. Every key is checked before Ray,
MLflow or any file is touched; relative data paths resolve against the config file's folder.
Metric names (``objective.metric``, the metric ASHA prunes on) are checked against the metrics
the configured trials report (:mod:`regvi.sweep.metric_names`); the data itself (keys, layers,
counts) by :func:`regvi.sweep.data_check.check_data_files` (``--dry-run`` and before a sweep).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regvi.data.registry import REGISTRY_ARGS
from regvi.datasets.catalog import DATASET_PREFIX, DatasetError
from regvi.datasets.catalog import resolve as dataset_path
from regvi.module import ModuleConfig
from regvi.sweep.errors import ConfigError
from regvi.sweep.metric_names import check_metric_settings, may_run_poe

BUNDLED_PREFIX = "bundled:"
#: RegVI constructor arguments that may be fixed or searched (besides ModuleConfig fields).
MODEL_ARGS = {
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "data_init",
    "dispersion_init",
} | ModuleConfig.user_options()
DATA_KEYS = {"path", "modalities", "counts_modality", "allow_non_integer", *REGISTRY_ARGS}
#: Registry purposes a sweep may search (``target="data"``): which obs key(s) serve which
#: purpose. ``library_key`` / ``batch_key`` / ``labels_key`` / ``dataset_key`` /
#: ``technical_covariate_keys`` stay fixed: they define what the evaluation scores, so every
#: trial must share them; the ambient / dispersion / library-size keys are the library key's
#: fan-out (the registry refuses them beside it).
SEARCHABLE_DATA_KEYS = (
    "feature_scaling_covariate_keys",
    "nn_conditioning_covariate_keys",
    "encoder_covariate_keys",
    "continuous_covariate_keys",
)
_FAN_OUT_KEYS = ("ambient_covariate_keys", "dispersion_key", "library_size_key")
#: Model arguments only the multimodal model takes (the first two are modality → value maps).
MULTIMODAL_MODEL_ARGS = {
    "disabled_covariates",
    "lr_multipliers",
    "kl_multipliers",
    "latent_mode",
    "modality_dropout",
}
#: Per-modality factors: a dict modality → positive number, or searched as ``<name>.<modality>``.
MULTIPLIER_ARGS = ("lr_multipliers", "kl_multipliers")
PARAM_TYPES = {"uniform", "loguniform", "int", "categorical"}
SECTIONS = {
    "name",
    "data",
    "model",
    "training",
    "search",
    "objective",
    "search_algorithm",
    "scheduler",
    "budget",
    "resources",
    "evaluation",
    "mlflow",
    "storage",
    "seed",
}


def _train_args() -> set[str]:
    from regvi.model import RegVI

    params = set(inspect.signature(RegVI.train).parameters) - {"self", "trainer_kwargs"}
    return params - {"epoch_callback", "progress_bar", "accelerator", "devices", "seed"}


def train_default(name: str) -> Any:
    """The default of ``RegVI.train``'s argument ``name`` (``max_epochs``: 400), written once:
    the epoch budget in :data:`regvi.training.MODEL_EPOCHS`, the rest in the signature of
    :meth:`regvi.base.BaseModel.train`."""
    from regvi.base import BaseModel
    from regvi.training import MODEL_EPOCHS

    if name in ("max_epochs", "patience", "n_epochs_kl_warmup"):
        return getattr(MODEL_EPOCHS, name)
    return inspect.signature(BaseModel.train).parameters[name].default


def _bool_train_args() -> set[str]:
    """train() arguments that are switches (bool defaults: early_stopping, compile, ...)."""
    from regvi.model import RegVI

    params = inspect.signature(RegVI.train).parameters
    return {n for n, p in params.items() if isinstance(p.default, bool)}


def _check_device_settings(training: dict[str, Any], gpus: float) -> None:
    """training.precision / training.data_on_device against the trial's resources."""
    from regvi.data.device import PRECISIONS

    if "precision" in training:
        key = str(training["precision"])
        if key not in PRECISIONS:
            raise ConfigError(
                f"training.precision: {training['precision']!r}; expected one of "
                f"{sorted(set(PRECISIONS.values()))}"
            )
        if PRECISIONS[key] == "16-mixed" and gpus == 0:
            raise ConfigError(
                "training.precision: '16-mixed' needs GPUs (resources.gpus_per_worker > 0); "
                "on CPU use 'bf16-mixed'"
            )
    if "data_on_device" in training and training["data_on_device"] not in (True, False, "auto"):
        raise ConfigError(
            f"training.data_on_device: {training['data_on_device']!r}; expected true, false "
            "or 'auto'"
        )


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with any credentials replaced by ``***`` (user:password@, token/password query
    parameters), for printing and logging. The unredacted URI is only used to connect."""
    import re

    if not uri:
        return uri
    out = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1***@", uri)
    secret = r"(?:token|password|passwd|secret|key|sig|signature|credential)[\w-]*"
    return re.sub(rf"([?&]\w*{secret}=)[^&#]*", r"\1***", out, flags=re.IGNORECASE)


def _require_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} ({value!r})")
    return value


def _unknown(d: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _number(value: Any, where: str, positive: bool = False, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if integer and not float(value).is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if positive and not value > 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return value


@dataclass
class Param:
    """One searched parameter."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None
    log: bool = False
    when: dict[str, Any] = field(default_factory=dict)
    #: "model" (RegVI kwargs), "training" (train kwargs) or "data" (registry purpose keys)
    target: str = "model"
    modality: str | None = None  # multimodal: "n_latent.rna" sets n_latent of modality rna


@dataclass
class SweepConfig:
    """A validated sweep configuration."""

    name: str
    config_path: Path | None
    data: dict[str, Any]
    model: dict[str, Any]
    training: dict[str, Any]
    params: list[Param]
    objective_metrics: list[str]
    objective_modes: list[str]
    search_algorithm: str = "optuna"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    trials: int = 8
    time_budget_s: float | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    evaluation: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    experiment: str = "regvi"
    register_model: str | None = None
    storage_path: Path = Path("regvi_runs")
    seed: int = 0

    @property
    def multi_objective(self) -> bool:
        """Two objectives (bio vs batch) instead of one."""
        return len(self.objective_metrics) > 1

    @property
    def multimodal(self) -> bool:
        """Paired modalities (``data.modalities``) → :class:`regvi.RegMultiVI` trials."""
        return "modalities" in self.data

    def data_path(self) -> str | dict[str, str]:
        """Absolute data path, ``bundled:<name>``, or modality → path (multimodal)."""
        return self.data["modalities"] if self.multimodal else self.data["path"]

    def resolved(self) -> dict[str, Any]:
        """A JSON-able summary of the resolved configuration (for --dry-run and MLflow)."""
        return {
            "name": self.name,
            "data": self.data,
            "model": self.model,
            "training": self.training,
            "search": {
                p.name: {
                    k: v for k, v in vars(p).items() if k != "name" and v not in (None, {}, False)
                }
                for p in self.params
            },
            "objective": dict(zip(self.objective_metrics, self.objective_modes, strict=True)),
            "search_algorithm": self.search_algorithm,
            "scheduler": self.scheduler,
            "budget": {"trials": self.trials, "time_budget_s": self.time_budget_s},
            "resources": {
                "workers": self.workers,
                "cpus_per_worker": self.cpus_per_worker,
                "gpus_per_worker": self.gpus_per_worker,
            },
            "evaluation": self.evaluation,
            "mlflow": {
                "tracking_uri": redact_uri(self.tracking_uri),
                "experiment": self.experiment,
                "register_model": self.register_model,
            },
            "storage_path": str(self.storage_path),
            "seed": self.seed,
        }


def _check_option(section: str, name: str, value: Any, prefix: bool = True) -> None:
    """Type-check one model or training value as RegVI / ``train()`` would, before Ray starts.

    A YAML ``"False"`` where a bool belongs is refused naming ``<section>.<name>`` (a mapping
    by modality is checked value by value)."""
    from regvi.base import check_train_option
    from regvi.checks import check_bool, check_choice
    from regvi.module import check_module_options

    where = f"{section}.{name}" if prefix else section
    if isinstance(value, dict) and name not in MULTIMODAL_MODEL_ARGS:
        for m, v in value.items():
            _check_option(f"{where}.{m}", name, v, prefix=False)
        return
    try:
        if section == "training":
            check_train_option(name, value)
        elif name in ModuleConfig.user_options() | {"n_hidden", "n_latent", "n_layers"}:
            check_module_options({name: value})
        elif name == "data_init":
            check_bool(name, value)
        elif name == "dispersion_init":
            check_choice(name, value, ("prior", "data"))
        elif name == "latent_mode":
            check_choice(name, value, ("concat", "poe"))
        elif name == "modality_dropout":
            from regvi.multimodule import check_modality_dropout

            check_modality_dropout(value)
        elif name in MULTIPLIER_ARGS:
            for m, v in (value if isinstance(value, dict) else {"": value}).items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    at = f"[{m!r}]" if m else ""
                    raise ValueError(f"{name}{at}={v!r}; expected a positive number")
        elif name in train_option_names():
            check_train_option(name, value)
    except (TypeError, ValueError) as err:
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = f" (YAML reads {value} as a string: write it with a dot, e.g. 1.0e-3)"
            except ValueError:
                pass
        raise ConfigError(f"{where}: {err}{hint}") from None


def train_option_names() -> set[str]:
    """Arguments of ``RegVI.train``."""
    from regvi.model import RegVI

    return set(inspect.signature(RegVI.train).parameters) - {"self", "trainer_kwargs"}


def _param_target(
    name: str, where: str, train_args: set[str], modalities: list[str] | None
) -> tuple[str, str | None]:
    """The target (``model`` / ``training`` / ``data``) and modality of searched ``name``."""
    if modalities and "." in name:
        base, modality = name.split(".", 1)
        if modality not in modalities:
            raise ConfigError(
                f"{where}: modality {modality!r} is not in data.modalities {modalities}"
            )
        if base not in MODEL_ARGS | set(MULTIPLIER_ARGS) or base == "disabled_covariates":
            raise ConfigError(
                f"{where}: {base!r} cannot be set per modality; use a model option such as "
                "n_latent.<modality>, lr_multipliers.<modality> or kl_multipliers.<modality>"
            )
        return "model", modality
    if name in MODEL_ARGS or (modalities and name in ("latent_mode", "modality_dropout")):
        return "model", None
    if name in train_args:
        return "training", None
    if name in SEARCHABLE_DATA_KEYS:
        return "data", None
    if name in _FAN_OUT_KEYS:
        raise ConfigError(
            f"{where}: {name!r} cannot be searched: it is set by the fixed library_key (ambient, "
            f"dispersion and library-size groups); searchable covariate purposes: "
            f"{list(SEARCHABLE_DATA_KEYS)}"
        )
    if name in DATA_KEYS:
        raise ConfigError(
            f"{where}: {name!r} cannot be searched: it defines what every trial is scored on "
            f"(fix it under data); searchable covariate purposes: {list(SEARCHABLE_DATA_KEYS)}"
        )
    raise ConfigError(
        f"{where}: {name!r} is not a RegVI model or training argument or a searchable "
        f"covariate purpose; model: {sorted(MODEL_ARGS)}; training: {sorted(train_args)}; "
        f"covariate purposes: {list(SEARCHABLE_DATA_KEYS)}"
    )


def _set_param_values(p: Param, spec: dict[str, Any], where: str) -> None:
    """Set ``p.values`` of a categorical parameter from ``spec`` (data values encoded)."""
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.values: expected a non-empty list, got {values!r}")
    if p.target == "data":
        values = [encode_data_value(v, f"{where}.values[{i}]") for i, v in enumerate(values)]
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}.values: {spec['values']!r} lists a value twice")
    p.values = values


def _set_param_range(p: Param, spec: dict[str, Any], where: str) -> None:
    """Set ``p.low`` / ``p.high`` (and ``p.log``) of a numeric parameter from ``spec``."""
    for bound in ("low", "high"):
        if bound not in spec:
            raise ConfigError(f"{where}: missing '{bound}' for type {p.type}")
        _number(spec[bound], f"{where}.{bound}", integer=p.type == "int")
    p.low, p.high = spec["low"], spec["high"]
    if not p.low < p.high:
        raise ConfigError(f"{where}: empty or inverted range low={p.low} >= high={p.high}")
    if (p.type == "loguniform" or p.log) and p.low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got {p.low}")
    if p.type == "loguniform":
        p.log = True


def _parse_param(
    name: str, spec: Any, train_args: set[str], modalities: list[str] | None = None
) -> Param:
    """One ``search`` entry as a :class:`Param` (target, type and values or range checked)."""
    where = f"search.{name}"
    target, modality = _param_target(name, where, train_args, modalities)
    spec = _require_mapping(spec, where)
    _unknown(spec, {"type", "low", "high", "values", "log", "when"}, where)
    ptype = spec.get("type")
    if ptype not in PARAM_TYPES:
        raise ConfigError(f"{where}.type: {ptype!r}; expected one of {sorted(PARAM_TYPES)}")
    when = _require_mapping(spec.get("when"), f"{where}.when")
    p = Param(
        name=name,
        type=ptype,
        when=when,
        target=target,
        log=bool(spec.get("log", False)),
        modality=modality,
    )
    if target == "data" and ptype != "categorical":
        raise ConfigError(
            f"{where}.type: {ptype!r}; a covariate purpose is searched as categorical over obs "
            "keys, e.g. {type: categorical, values: [null, sample, [sample, donor]]}"
        )
    if ptype == "categorical":
        _set_param_values(p, spec, where)
    else:
        _set_param_range(p, spec, where)
    return p


def encode_data_value(value: Any, where: str) -> str | None:
    """A searched covariate-purpose value as Optuna / Tune / MLflow can hold it.

    ``null`` (the purpose's default) and one obs key stay as they are; a list of keys (or a
    per-modality mapping) becomes its JSON text, read back by :func:`decode_data_value`."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value or value.startswith(("[", "{")):
            raise ConfigError(f"{where}: {value!r} is not an obs column name")
        return value
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return json.dumps(value)
    if (
        isinstance(value, dict)
        and value
        and all(
            isinstance(v, str)
            or v is None
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            for v in value.values()
        )
    ):
        return json.dumps(value, sort_keys=True)
    raise ConfigError(
        f"{where}: {value!r}; expected null (the default), an obs column name, a list of "
        "names ([] for none) or, for paired modalities, a mapping modality → names"
    )


def decode_data_value(value: Any) -> Any:
    """Inverse of :func:`encode_data_value` (a list / mapping of keys from its JSON text)."""
    if isinstance(value, str) and value.startswith(("[", "{")):
        return json.loads(value)
    return value


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value: str, where: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment; an unset variable without a
    default is a :class:`ConfigError` naming it."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} in {value!r} is not set")

    return _VAR.sub(sub, value)


def _resolve_file(value: Any, base: Path, where: str) -> str:
    """Absolute path of an existing .h5ad file: a path (``${VAR}`` expanded; relative paths
    resolve against ``base``) or ``dataset:<name>`` (a fetched catalogue dataset)."""
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{where}: expected a file path, got {value!r}")
    value = expand_vars(str(value), where)
    if value.startswith(DATASET_PREFIX):
        try:
            return str(dataset_path(value).resolve())
        except DatasetError as err:
            raise ConfigError(f"{where}: {err}") from None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p)
    if not p.is_file():
        raise ConfigError(
            f"{where}: file {p} does not exist (relative paths resolve against {base})"
        )
    if p.suffix != ".h5ad":
        raise ConfigError(f"{where}: {p} is not an .h5ad file")
    return str(p.resolve())


def load_config(
    path: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    check_metrics: bool = True,
) -> SweepConfig:
    """Read and validate a sweep YAML. Raises :class:`ConfigError` naming the bad key/value.

    ``check_metrics=False`` skips the check of metric names (to list the valid ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = _require_mapping(raw, str(path))
    if overrides:
        raw = {**raw, **overrides}
    return parse_config(raw, path, check_metrics=check_metrics)


def _parse_modalities(data: dict[str, Any], base: Path) -> list[str]:
    """Resolve ``data.modalities`` (paths) in place; returns the sorted modality names."""
    if "path" in data:
        raise ConfigError("data: give either path (one modality) or modalities, not both")
    mods = _require_mapping(data["modalities"], "data.modalities")
    if len(mods) < 2:
        raise ConfigError(
            f"data.modalities: {sorted(mods)}; the multimodal model needs 2+ modalities "
            "(modality name → .h5ad path)"
        )
    data["modalities"] = {
        str(m): _resolve_file(v, base, f"data.modalities.{m}") for m, v in mods.items()
    }
    modalities = sorted(data["modalities"])
    cm = data.get("counts_modality")
    if cm is not None and cm not in modalities:
        raise ConfigError(
            f"data.counts_modality: {cm!r} is not one of data.modalities {modalities}"
        )
    return modalities


def _parse_data_path(data: dict[str, Any], base: Path) -> None:
    """Check ``data.path`` (a bundled dataset, or a file resolved to an absolute path) in place."""
    dpath = str(data["path"])
    if dpath.startswith(BUNDLED_PREFIX):
        if dpath[len(BUNDLED_PREFIX) :] != "kang_pbmc_small":
            raise ConfigError(
                f"data.path: unknown bundled dataset {dpath!r}; have 'bundled:kang_pbmc_small'"
            )
    else:
        data["path"] = _resolve_file(dpath, base, "data.path")


def _parse_data(raw: dict[str, Any], base: Path) -> tuple[dict[str, Any], list[str] | None]:
    """The validated ``data`` section and its sorted modalities (``None``: one modality)."""
    data = dict(_require_mapping(raw.get("data"), "data"))
    _unknown(data, DATA_KEYS, "data")
    modalities: list[str] | None = None
    if "modalities" in data:
        modalities = _parse_modalities(data, base)
    elif "counts_modality" in data:
        raise ConfigError("data.counts_modality: only for multimodal data (data.modalities)")
    elif "path" not in data:
        raise ConfigError(
            "data.path: missing; give an .h5ad path, 'dataset:<name>' (python -m "
            "regvi.datasets list) or 'bundled:kang_pbmc_small' (or "
            "data.modalities for paired multimodal data)"
        )
    else:
        _parse_data_path(data, base)
    if not any(k in data for k in ("library_key", "batch_key", "ambient_covariate_keys")):
        raise ConfigError("data: needs library_key (or batch_key, or the explicit purpose keys)")
    return data, modalities


def _parse_model(raw: dict[str, Any], modalities: list[str] | None) -> dict[str, Any]:
    """The validated ``model`` section (per-modality mappings checked against ``modalities``)."""
    model = dict(_require_mapping(raw.get("model"), "model"))
    _unknown(model, MODEL_ARGS | (MULTIMODAL_MODEL_ARGS if modalities else set()), "model")
    for k, v in model.items():
        if isinstance(v, dict) and k not in ("disabled_covariates",):
            if not modalities:
                raise ConfigError(
                    f"model.{k}: a per-modality mapping needs data.modalities; got {v!r}"
                )
            bad = sorted(set(v) - set(modalities))
            if bad:
                raise ConfigError(
                    f"model.{k}: unknown modalities {bad}; data.modalities: {modalities}"
                )
    for k, v in model.items():
        _check_option("model", k, v)
    return model


def _parse_training(raw: dict[str, Any], train_args: set[str]) -> dict[str, Any]:
    """The validated ``training`` section (precision / data_on_device: with the resources)."""
    training = dict(_require_mapping(raw.get("training"), "training"))
    _unknown(training, train_args, "training")
    for k in ("max_epochs", "batch_size", "patience"):
        if k in training:
            _number(training[k], f"training.{k}", positive=True, integer=True)
    switches = _bool_train_args()
    for k, v in training.items():
        if k in switches and not isinstance(v, bool):
            raise ConfigError(f"training.{k}: {v!r}; expected true or false")
    for k, v in training.items():
        if k not in ("precision", "data_on_device"):  # checked with the resources below
            _check_option("training", k, v)
    return training


def _check_search_values(params: list[Param]) -> None:
    """Check every value a categorical search may take, as if it were fixed."""
    for p in params:
        if p.target == "data":  # obs keys: checked against the data (data_check)
            continue
        for i, v in enumerate(p.values or []):
            option = p.name.split(".", 1)[0] if p.modality else p.name
            _check_option(f"search.{p.name}.values[{i}]", option, v, prefix=False)


def _check_search_links(
    params: list[Param], data: dict[str, Any], model: dict[str, Any], training: dict[str, Any]
) -> None:
    """Check each parameter's ``when`` (encoding data values) and that none is also fixed."""
    names = {p.name for p in params}
    for p in params:
        for dep in p.when:
            if dep not in names:
                raise ConfigError(f"search.{p.name}.when: {dep!r} is not a searched parameter")
            if dep in SEARCHABLE_DATA_KEYS:  # compare with the sampled (encoded) value
                p.when[dep] = encode_data_value(p.when[dep], f"search.{p.name}.when.{dep}")
        clash = p.name in model or p.name in training or p.name in data
        if p.modality is not None:
            base_value = model.get(p.name.split(".", 1)[0])
            clash = isinstance(base_value, dict) and p.modality in base_value
        if clash:
            raise ConfigError(f"search.{p.name}: also fixed in data/model/training; keep one")


def _parse_search(
    raw: dict[str, Any],
    train_args: set[str],
    modalities: list[str] | None,
    data: dict[str, Any],
    model: dict[str, Any],
    training: dict[str, Any],
) -> list[Param]:
    """The validated ``search`` section: one :class:`Param` per searched parameter."""
    search = _require_mapping(raw.get("search"), "search")
    params = [_parse_param(n, s, train_args, modalities) for n, s in search.items()]
    _check_search_values(params)
    _check_search_links(params, data, model, training)
    _check_kl_multipliers_mode(params, model)
    return params


def _check_kl_multipliers_mode(params: list[Param], model: dict[str, Any]) -> None:
    """``kl_multipliers`` weigh latent blocks: refuse them where a trial may run ``poe``."""
    kl = model.get("kl_multipliers") or any(p.name.startswith("kl_multipliers.") for p in params)
    if kl and may_run_poe(model, params):
        raise ConfigError(
            "model.kl_multipliers: needs latent_mode 'concat' in every trial (with 'poe' there "
            "are no per-modality latent blocks, only one KL of the shared z)"
        )


def _parse_objective(raw: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The validated ``objective`` section: its metric names and their modes."""
    obj = raw.get("objective", {"metric": "validation_elbo", "mode": "min"})
    obj = _require_mapping(obj, "objective")
    _unknown(obj, {"metric", "mode"}, "objective")
    metrics = obj.get("metric", "validation_elbo")
    metrics = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(
            f"objective.metric: {metrics!r}; expected a metric name or a list of two "
            "(e.g. [scib_bio, scib_batch])"
        )
    modes = obj.get("mode")
    if modes is None:
        modes = ["min" if m.startswith(("validation_", "train_")) else "max" for m in metrics]
    modes = [modes] if isinstance(modes, str) else modes
    if (
        not isinstance(metrics, list)
        or not metrics
        or len(metrics) > 2
        or len(modes) != len(metrics)
    ):
        raise ConfigError(
            f"objective: metric {metrics!r} / mode {modes!r}; expected one metric or "
            "two (e.g. [scib_bio, scib_batch]) with as many modes"
        )
    for m in modes:
        if m not in ("min", "max"):
            raise ConfigError(f"objective.mode: {m!r}; expected 'min' or 'max'")
    return metrics, modes


def _parse_search_algorithm(raw: dict[str, Any], params: list[Param]) -> str:
    """The validated ``search_algorithm.name`` (grid: every parameter categorical)."""
    algo = _require_mapping(raw.get("search_algorithm", {"name": "optuna"}), "search_algorithm")
    _unknown(algo, {"name"}, "search_algorithm")
    algo_name = algo.get("name", "optuna")
    if algo_name not in ("optuna", "random", "grid"):
        raise ConfigError(f"search_algorithm.name: {algo_name!r}; expected optuna, random or grid")
    if algo_name == "grid" and any(p.type != "categorical" for p in params):
        bad = [p.name for p in params if p.type != "categorical"]
        raise ConfigError(f"search_algorithm grid needs categorical parameters; not: {bad}")
    return algo_name


def _parse_scheduler(raw: dict[str, Any]) -> dict[str, Any]:
    """The validated ``scheduler`` section, its ``name`` defaulted to ``asha``."""
    sched = dict(_require_mapping(raw.get("scheduler", {"name": "asha"}), "scheduler"))
    _unknown(sched, {"name", "grace_period", "reduction_factor", "max_t"}, "scheduler")
    if sched.get("name", "asha") not in ("asha", "fifo"):
        raise ConfigError(f"scheduler.name: {sched.get('name')!r}; expected 'asha' or 'fifo'")
    if "max_t" in sched:
        raise ConfigError(
            f"scheduler.max_t: {sched['max_t']!r}; not supported: ASHA's max_t is the trials' "
            "training.max_epochs (a trial that survives every rung trains to its last epoch and "
            "is evaluated; stopping it earlier would leave it without evaluation metrics). Set "
            f"training.max_epochs instead (default {train_default('max_epochs')})"
        )
    sched.setdefault("name", "asha")
    return sched


def _parse_budget(raw: dict[str, Any]) -> tuple[int, float | None]:
    """The validated ``budget`` section: the number of trials and the time budget (s)."""
    budget = _require_mapping(raw.get("budget"), "budget")
    _unknown(budget, {"trials", "time_budget_s"}, "budget")
    trials = int(_number(budget.get("trials", 8), "budget.trials", positive=True, integer=True))
    tbs = budget.get("time_budget_s")
    if tbs is not None:
        _number(tbs, "budget.time_budget_s", positive=True)
    return trials, tbs


def _parse_resources(raw: dict[str, Any]) -> tuple[int, float, float]:
    """The validated ``resources`` section: workers, CPUs and GPUs per worker."""
    res = _require_mapping(raw.get("resources"), "resources")
    _unknown(res, {"workers", "cpus_per_worker", "gpus_per_worker"}, "resources")
    workers = int(_number(res.get("workers", 1), "resources.workers", positive=True, integer=True))
    cpus = float(_number(res.get("cpus_per_worker", 1), "resources.cpus_per_worker", positive=True))
    gpus = float(_number(res.get("gpus_per_worker", 0), "resources.gpus_per_worker"))
    if gpus < 0 or (gpus > 1 and not float(gpus).is_integer()):
        raise ConfigError(
            f"resources.gpus_per_worker: {gpus}; expected 0, a fraction < 1, or an integer"
        )
    return workers, cpus, gpus


def _resolve_markers(ev: dict[str, Any], base: Path) -> None:
    """Resolve ``evaluation.markers`` (bundled list or file) to an absolute path in place."""
    if ev.get("markers") == BUNDLED_PREFIX + "immune_markers":
        from regvi.datasets import immune_markers_path

        ev["markers"] = str(immune_markers_path())
    elif isinstance(ev.get("markers"), str) and ev["markers"] != "data":
        if ev["markers"].startswith(BUNDLED_PREFIX):
            raise ConfigError(
                f"evaluation.markers: unknown bundled marker list {ev['markers']!r}; have "
                "'bundled:immune_markers'"
            )
        mp = Path(expand_vars(ev["markers"], "evaluation.markers")).expanduser()
        mp = mp if mp.is_absolute() else base / mp
        if not mp.is_file():
            raise ConfigError(f"evaluation.markers: file {mp} does not exist")
        ev["markers"] = str(mp.resolve())


def _parse_evaluation(raw: dict[str, Any], base: Path, data: dict[str, Any]) -> dict[str, Any]:
    """The validated ``evaluation`` section (marker paths resolved against ``base``)."""
    ev = dict(_require_mapping(raw.get("evaluation"), "evaluation"))
    _unknown(
        ev,
        {
            "n_subsample",
            "scib",
            "neighbourhood",
            "markers",
            "lowcount",
            "umap",
            "n_jobs",
            "pool",
            "kmeans_starts",
        },
        "evaluation",
    )
    for key in ("scib", "neighbourhood", "lowcount", "umap", "pool"):
        if key in ev and not isinstance(ev[key], bool):
            raise ConfigError(f"evaluation.{key}: {ev[key]!r}; expected true or false")
    if "kmeans_starts" in ev:
        ev["kmeans_starts"] = int(
            _number(ev["kmeans_starts"], "evaluation.kmeans_starts", positive=True, integer=True)
        )
    _resolve_markers(ev, base)
    if ev.get("markers") == "data" and not data.get("labels_key"):
        raise ConfigError(
            "evaluation.markers: 'data' (markers from the labels) needs data.labels_key"
        )
    return ev


def _parse_mlflow(raw: dict[str, Any]) -> dict[str, Any]:
    """The validated ``mlflow`` section."""
    ml = _require_mapping(raw.get("mlflow"), "mlflow")
    _unknown(ml, {"tracking_uri", "experiment", "register_model"}, "mlflow")
    return ml


def _parse_storage(raw: dict[str, Any]) -> Path:
    """The validated ``storage.path``, absolute (relative to the working directory)."""
    storage = _require_mapping(raw.get("storage"), "storage")
    _unknown(storage, {"path"}, "storage")
    spath = Path(storage.get("path", "regvi_runs")).expanduser()
    return spath if spath.is_absolute() else Path.cwd() / spath


def _parse_name(raw: dict[str, Any], path: Path | None) -> str:
    """The validated sweep ``name`` (default: the config file's stem)."""
    name = raw.get("name", path.stem if path else "sweep")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"name: {name!r}; expected letters, digits, '-' or '_' (used in paths)")
    return name


def _check_warmup(training: dict[str, Any], params: list[Param]) -> None:
    """A KL warm-up (fixed or searched) must end before ``max_epochs``: early stopping waits
    for the warm-up, so a longer one trains every trial to ``max_epochs`` at KL weight < 1."""
    max_epochs = training.get("max_epochs", train_default("max_epochs"))
    if any(p.name == "max_epochs" for p in params):
        return  # both searched: a trial's pair is not known here
    candidates: list[tuple[str, Any]] = []
    if training.get("n_epochs_kl_warmup") is not None:
        candidates.append(("training.n_epochs_kl_warmup", training["n_epochs_kl_warmup"]))
    for p in params:
        if p.name == "n_epochs_kl_warmup":
            vals = p.values if p.values is not None else [p.high]
            candidates += [(f"search.n_epochs_kl_warmup: {v!r}", v) for v in vals]
    for where, v in candidates:
        if isinstance(v, int | float) and not isinstance(v, bool) and v >= max_epochs:
            raise ConfigError(
                f"{where} is not below max_epochs {max_epochs}: the KL weight would never "
                "reach 1 and early stopping (which waits for the warm-up) would never stop a "
                "trial; lower it or raise training.max_epochs"
            )


def parse_config(
    raw: dict[str, Any], path: Path | None = None, check_metrics: bool = True
) -> SweepConfig:
    """Validate an already-parsed config mapping (``path`` anchors relative paths).

    Metric names (``objective.metric``, the metric ASHA prunes on) must be metrics the
    configured trials report (:func:`regvi.sweep.metric_names.check_metric_settings`), unless
    ``check_metrics`` is false."""
    if not raw:
        raise ConfigError(f"{path or 'config'}: empty config; needs at least 'data' and 'search'")
    _unknown(raw, SECTIONS, "config")
    base = path.parent.resolve() if path is not None else Path.cwd()
    train_args = _train_args()
    data, modalities = _parse_data(raw, base)
    model = _parse_model(raw, modalities)
    training = _parse_training(raw, train_args)
    params = _parse_search(raw, train_args, modalities, data, model, training)
    metrics, modes = _parse_objective(raw)
    algo_name = _parse_search_algorithm(raw, params)
    sched = _parse_scheduler(raw)
    trials, tbs = _parse_budget(raw)
    workers, cpus, gpus = _parse_resources(raw)
    _check_device_settings(training, gpus)
    _check_warmup(training, params)
    ev = _parse_evaluation(raw, base, data)
    ml = _parse_mlflow(raw)
    spath = _parse_storage(raw)
    name = _parse_name(raw, path)
    seed = int(_number(raw.get("seed", 0), "seed", integer=True))
    cfg = SweepConfig(
        name=name,
        config_path=path,
        data=data,
        model=model,
        training=training,
        params=params,
        objective_metrics=metrics,
        objective_modes=modes,
        search_algorithm=algo_name,
        scheduler=sched,
        trials=trials,
        time_budget_s=tbs,
        workers=workers,
        cpus_per_worker=cpus,
        gpus_per_worker=gpus,
        evaluation=ev,
        tracking_uri=ml.get("tracking_uri"),
        experiment=ml.get("experiment", f"regvi-{name}"),
        register_model=ml.get("register_model"),
        storage_path=spath.resolve(),
        seed=seed,
    )
    # objective / ASHA metric names against the metrics the configured trials report
    if check_metrics:
        check_metric_settings(cfg)
    return cfg
