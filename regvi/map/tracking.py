"""The MLflow side of a mapping: tracking URI, reference model lineage, the mapping run.

A mapping run (experiment :data:`DEFAULT_EXPERIMENT` unless told otherwise) holds the settings
as params, the metrics and the plots (:func:`regvi.map.plots.mapping_plots`), and tags linking
it to the reference model's registered version and run.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from regvi.map.inputs import fail

if TYPE_CHECKING:
    from regvi.map.plan import Plan

#: default experiment of mapping runs
DEFAULT_EXPERIMENT = "regvi-mapping"

TAG_MODEL_URI = "regvi.reference_model_uri"
TAG_MODEL_NAME = "regvi.reference_model_name"
TAG_MODEL_VERSION = "regvi.reference_model_version"
TAG_RUN_ID = "regvi.reference_run_id"
TAG_KIND = "regvi.run_kind"


# ------------------------------------------------------------------------------ tracking URI
def is_mlflow_uri(model: str | os.PathLike) -> bool:
    """Whether ``model`` is an MLflow model URI (``runs:/``, ``models:/``) rather than a path."""
    from regvi.io import MLFLOW_SCHEMES

    return str(model).startswith(MLFLOW_SCHEMES)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other URIs and ``:memory:``)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def artifact_root(uri: str) -> Path | None:
    """``mlartifacts`` next to a SQLite tracking database (``None`` for other stores)."""
    db = sqlite_path(uri)
    return None if db is None else db.resolve().parent / "mlartifacts"


def resolve_uri(tracking_uri: str | None, out: Path, needed: bool) -> str | None:
    """The tracking URI (``--tracking-uri``, ``MLFLOW_TRACKING_URI``, else SQLite by the output)."""
    from regvi.sweep.tracking import resolve_tracking_uri

    if not needed:
        return None
    try:
        return resolve_tracking_uri(tracking_uri, out.resolve().parent)
    except ValueError as err:
        raise fail("--tracking-uri", str(err)) from None


@contextlib.contextmanager
def tracking(uri: str | None) -> Iterator[None]:
    """Use ``uri`` as MLflow's tracking URI inside the block (process state restored after)."""
    if uri is None:
        yield
        return
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        from mlflow.tracking._tracking_service import utils as _utils

        previous = _utils._tracking_uri
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        previous = None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def redact(text: str) -> str:
    """``text`` without the password of a URI in it."""
    from regvi.sweep.config import redact_uri

    return str(redact_uri(text))


# ------------------------------------------------------------------------------ lineage
def model_lineage(model: str | os.PathLike, uri: str | None) -> dict[str, str]:
    """Tags linking a mapping run to its reference model (registered version and source run).

    ``models:/NAME@alias`` and ``models:/NAME/VERSION`` give the registered model's name,
    version and source run id; ``runs:/ID/...`` the run id; a directory its path.
    """
    text = str(model)
    tags = {TAG_MODEL_URI: redact(text)}
    if text.startswith("runs:/"):
        tags[TAG_RUN_ID] = text[len("runs:/") :].split("/", 1)[0]
        return tags
    if not text.startswith("models:/"):
        tags[TAG_MODEL_URI] = str(Path(text).resolve())
        return tags
    from regvi.sweep.tracking import client

    c = client(uri)
    spec = text[len("models:/") :].rstrip("/")
    if "@" not in spec and "/" not in spec:  # models:/<model_id>: a logged model
        try:
            tags[TAG_RUN_ID] = str(c.get_logged_model(spec).source_run_id)
        except Exception:  # lineage is best effort
            pass
        return tags
    mv = _model_version(c, spec)
    if mv is not None:
        tags.update(_version_tags(c, mv))
    return tags


def _model_version(c: Any, spec: str) -> Any:
    """The registered version of ``NAME@alias`` or ``NAME/VERSION`` (``NAME/latest``)."""
    if "@" in spec:
        name, alias = spec.split("@", 1)
        return c.get_model_version_by_alias(name, alias)
    name, version = spec.split("/", 1)
    if version.isdigit():
        return c.get_model_version(name, version)
    if version.lower() == "latest":
        versions = c.search_model_versions(f"name = '{name}'")
        return max(versions, key=lambda v: int(v.version)) if versions else None
    return None


def _version_tags(c: Any, mv: Any) -> dict[str, str]:
    """Name, version and (if known) source run of a registered model version."""
    tags = {TAG_MODEL_NAME: str(mv.name), TAG_MODEL_VERSION: str(mv.version)}
    run_id = mv.run_id or (mv.tags or {}).get("run_id")
    if not run_id and getattr(mv, "model_id", None):
        with contextlib.suppress(Exception):
            run_id = c.get_logged_model(mv.model_id).source_run_id
    if run_id:
        tags[TAG_RUN_ID] = str(run_id)
    return tags


# ------------------------------------------------------------------------------ the run
def start_run(plan: Plan, experiment: str, params: dict[str, Any]) -> tuple[Any, str | None]:
    """The client and the new mapping run with its params (``(None, None)`` without MLflow).

    An unreachable store is refused as ``--tracking-uri`` (before any training).
    """
    if plan.uri is None:
        return None, None
    from regvi.sweep.tracking import client, ensure_experiment, flat_params

    try:
        exp_id = ensure_experiment(plan.uri, experiment, artifact_root(plan.uri))
        c = client(plan.uri)
        tags = {**plan.lineage, TAG_KIND: "mapping"}
        run = c.create_run(exp_id, run_name=f"map {plan.query_path.stem}", tags=tags)
    except Exception as err:  # unreachable store: refused before training
        raise fail("--tracking-uri", f"cannot log to {redact(plan.uri)}: {err}") from None
    run_id = run.info.run_id
    from mlflow.entities import Param

    batch = [Param(k, v) for k, v in flat_params(params).items()]
    c.log_batch(run_id, params=batch)
    return c, run_id


def end_run(c: Any, run_id: str | None, status: str) -> None:
    """Mark the mapping run ``FINISHED`` or ``FAILED`` (nothing without a run)."""
    if c is not None and run_id is not None:
        c.set_terminated(run_id, status)


def log_run(c: Any, run_id: str, metrics: dict[str, float], plots: Iterable[Path]) -> None:
    """The (finite) metrics, then each plot as it is drawn, on the mapping run."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    c.log_batch(run_id, metrics=batch)
    for path in plots:
        c.log_artifact(run_id, str(path), "plots")
