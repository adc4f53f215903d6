"""Model persistence: weights in safetensors, everything else in JSON/CSV. Never pickle.

A model directory holds::

    model.safetensors   parameters and buffers (state dict)
    config.json         model class, ModuleConfig, CovariateRegistry, setup/train settings
    history.csv         per-epoch training history (optional)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from safetensors.torch import load_file, save_file

from regvi.data import CovariateRegistry

if TYPE_CHECKING:
    from regvi.model import RegVI
    from regvi.multimodal import RegMultiVI

#: model class name (``config.json``'s ``model_class``) → class; filled by
#: :func:`register_model_class` in each model's module, so this module imports no model
MODEL_CLASSES: dict[str, Any] = {}

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HISTORY = "history.csv"
FORMAT_VERSION = 1


def register_model_class(cls: Any) -> Any:
    """Class decorator: make ``cls`` loadable by :func:`load` under its name.

    The class provides ``config_from_dict(d)``, ``module_from_config(config)``,
    ``from_saved(meta, registry, config, module, history)``, ``attach(data)`` and
    ``saved_meta()`` (its extra ``config.json`` fields).
    """
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def save_model(model: RegVI | RegMultiVI, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` to directory ``path`` atomically (temp dir, then rename)."""
    from regvi import __version__

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.module.state_dict().items()}
        save_file(
            state, tmp / WEIGHTS, metadata={"format": "regvi", "version": str(FORMAT_VERSION)}
        )
        meta = {
            "format": "regvi",
            "format_version": FORMAT_VERSION,
            "regvi_version": __version__,
            "model_class": type(model).__name__,
            "module_config": model.config.to_dict(),
            "registry": model.registry.to_dict(),
            **model.saved_meta(),
            "setup_kwargs": model.setup_kwargs,
            "is_trained": model.is_trained,
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if len(model.history):
            model.history.to_csv(tmp / HISTORY, index=False)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"


def save_optimizer_state(state: dict[str, Any], directory: str | os.PathLike) -> None:
    """Write a torch optimizer ``state_dict()`` as safetensors (tensors) + JSON (the rest).

    Used by sweep checkpoints so a restarted worker resumes Adam's moments, not only weights.
    """
    import torch

    directory = Path(directory)
    tensors, scalars = {}, {}
    for idx, param_state in state["state"].items():
        for name, value in param_state.items():
            key = f"{idx}/{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().contiguous().cpu()
            else:
                scalars[key] = value
    save_file(tensors, directory / OPTIMIZER_WEIGHTS, metadata={"format": "regvi-optimizer"})
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    (directory / OPTIMIZER_META).write_text(json.dumps(meta))


def load_optimizer_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Inverse of :func:`save_optimizer_state`; ``None`` when ``directory`` has no state."""
    directory = Path(directory)
    if not (directory / OPTIMIZER_WEIGHTS).is_file() or not (directory / OPTIMIZER_META).is_file():
        return None
    meta = json.loads((directory / OPTIMIZER_META).read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(directory / OPTIMIZER_WEIGHTS).items(), *meta["scalars"].items()]:
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local regvi model directory for ``path`` (downloading MLflow model URIs)."""
    text = str(path)
    if not text.startswith(MLFLOW_SCHEMES):
        return Path(path)
    import mlflow
    import yaml

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    except Exception as err:
        raise FileNotFoundError(
            f"cannot resolve MLflow model {text!r} (tracking URI {mlflow.get_tracking_uri()}): {err}"
        ) from None
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise ValueError(f"{text!r} is not an MLflow model (no MLmodel file in {local})")
    spec = yaml.safe_load(mlmodel.read_text())
    try:
        rel = spec["flavors"]["python_function"]["artifacts"]["regvi_model"]["path"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{text!r} is an MLflow model but not a regvi one (no regvi_model artifact)"
        ) from None
    return local / rel


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (or is not a directory)")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path} is not a regvi model directory: {name} is missing "
                f"(found: {sorted(p.name for p in path.iterdir())[:10]})"
            )
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / CONFIG} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "regvi":
        raise ValueError(f"{path / CONFIG} is not a regvi model config (no format='regvi')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer regvi (format {meta['format_version']}); upgrade regvi"
        )
    return meta


def load(path: str | os.PathLike, adata: Any = None) -> RegVI | RegMultiVI:
    """Load a model saved with :meth:`regvi.RegVI.save` or :meth:`regvi.RegMultiVI.save`.

    Parameters
    ----------
    path
        Model directory, or an MLflow model URI: ``runs:/<run_id>/model``,
        ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``models:/<model_id>``
        (the tracking URI comes from ``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri``).
    adata
        Optional data to attach (AnnData; MuData or dict of AnnData for a multimodal model);
        its features and categories are checked against the model.

    Returns
    -------
    RegVI or RegMultiVI
        The model in eval mode.
    """
    path = resolve_model_path(path)
    meta = _read_meta(path)
    model_class = meta.get("model_class")
    cls = MODEL_CLASSES.get(model_class)
    if cls is None:
        raise ValueError(
            f"{path} holds a {model_class!r} model; expected one of {sorted(MODEL_CLASSES)}"
        )
    try:
        registry = CovariateRegistry.from_dict(meta["registry"])
        config = cls.config_from_dict(meta["module_config"])
        module = cls.module_from_config(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path / CONFIG} has an invalid model config: {err}") from None
    try:
        state = load_file(path / WEIGHTS)
    except Exception as err:  # safetensors raises its own error types on corrupt files
        raise ValueError(f"{path / WEIGHTS} is not a readable safetensors file: {err}") from None
    expected = set(module.state_dict())
    for key in expected - set(state):
        # saved before the containment prior's mean became a buffer: the config's value
        if key.endswith("dispersion_rate_prior_mean"):
            state[key] = module.state_dict()[key].clone()
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{path / WEIGHTS} does not match the model config: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    module.load_state_dict(state, strict=True)
    module.eval()
    history = pd.read_csv(path / HISTORY) if (path / HISTORY).is_file() else pd.DataFrame()
    model = cls.from_saved(meta, registry, config, module, history)
    if adata is not None:
        model.attach(adata)
    return model


def attach_data(model: Any, data: Any) -> None:
    """Attach data to a loaded model (``model.attach``: genes and categories are checked)."""
    model.attach(data)
