"""Map a query AnnData onto a trained reference model, transfer labels, log it in MLflow.

``python -m regvi.map --model MODEL --query new.h5ad --out mapped.h5ad [--reference atlas.h5ad]``

Steps: load the reference model (a directory, ``runs:/ID/model`` or ``models:/NAME@alias``);
build the query model with :meth:`regvi.RegVI.load_query_data` (new categories get their own
technical terms, the reference's weights stay as they are); train only those new terms (a few
epochs, early stopping); encode the query cells. With ``--reference`` (the atlas AnnData, with
labels in ``--labels-key``) the reference cells are encoded too and labels are transferred by a
kNN vote (:func:`regvi.map.labels.transfer_labels`); without it there is no label transfer,
only the latent. The output is the query AnnData with ``obsm["X_regvi"]`` (and
``obs["<key>_transferred"]``, ``obs["<key>_confidence"]``), written atomically.

Every input is checked before any training and before anything is written; a refused input
exits with status 2 and a message naming the argument, file or key.

Exit status: 0 done; 2 refused (bad input, nothing written); 1 failed while mapping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: default experiment of mapping runs
DEFAULT_EXPERIMENT = "regvi-mapping"
#: default maximum number of query training epochs (early stopping usually ends sooner)
DEFAULT_EPOCHS = 100
#: default early-stopping patience of query training, in epochs
DEFAULT_PATIENCE = 10
#: most cells in the UMAP plot (reference and query subsampled in proportion)
MAX_PLOT_CELLS = 50_000
#: the latent in the output AnnData
LATENT_KEY = "X_regvi"
UNKNOWN = "unknown"

TAG_MODEL_URI = "regvi.reference_model_uri"
TAG_MODEL_NAME = "regvi.reference_model_name"
TAG_MODEL_VERSION = "regvi.reference_model_version"
TAG_RUN_ID = "regvi.reference_run_id"
TAG_KIND = "regvi.run_kind"


class MappingInputError(ValueError):
    """A refused input of :func:`map_query`; the message names the argument, file or key."""


@dataclass
class MappingResult:
    """What :func:`map_query` produced."""

    #: the written output AnnData
    out: Path
    n_query_cells: int
    #: covariate key → categories the query added to the reference's
    added_categories: dict[str, list[str]]
    #: training time, ELBO, label-transfer summary (and accuracy with query labels)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the MLflow run (``None`` with ``log_mlflow=False``)
    run_id: str | None = None
    tracking_uri: str | None = None
    #: the saved query model directory, if asked for
    model_dir: Path | None = None
    #: the label-transfer table (``None`` without a reference AnnData)
    labels: pd.DataFrame | None = None


# ------------------------------------------------------------------------------ validation
def _fail(arg: str, message: str) -> MappingInputError:
    return MappingInputError(f"{arg}: {message}")


def parse_fine_tune(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"conditioning,encoder"`` (or a sequence) as a checked tuple; empty for ``None``/``""``."""
    from regvi.map.query import check_fine_tune

    if value is None:
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return check_fine_tune(list(value))
    except ValueError as err:
        raise _fail("--fine-tune", str(err)) from None


def _check_h5ad_input(path: str | os.PathLike, arg: str) -> Path:
    path = Path(path)
    if path.suffix != ".h5ad":
        raise _fail(arg, f"{str(path)!r} is not an .h5ad file (expected the suffix .h5ad)")
    if not path.exists():
        raise _fail(arg, f"{str(path)!r} does not exist")
    if not path.is_file():
        raise _fail(arg, f"{str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise _fail(arg, f"{str(path)!r} is not readable")
    return path


def _check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    path = Path(path)
    if path.suffix != ".h5ad":
        raise _fail("--out", f"{str(path)!r}: the output must end in .h5ad")
    if path.is_dir():
        raise _fail("--out", f"{str(path)!r} is a directory")
    if path.exists() and not overwrite:
        raise _fail("--out", f"{str(path)!r} exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise _fail("--out", f"the output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail("--out", f"the output directory {str(parent)!r} is not writable")
    return path


def _check_model_dir_out(path: str | os.PathLike | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not overwrite:
        raise _fail("--save-model", f"{str(path)!r} exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise _fail("--save-model", f"{str(path)!r} exists and is not a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise _fail("--save-model", f"the directory {str(parent)!r} is missing or not writable")
    return path


def _check_number(value: Any, arg: str, low: float, high: float, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (low <= value <= high):
        what = "an integer" if integer else "a number"
        raise _fail(arg, f"expected {what} in [{low:g}, {high:g}], got {value!r}")


def _is_mlflow_uri(model: str | os.PathLike) -> bool:
    from regvi.io import MLFLOW_SCHEMES

    return str(model).startswith(MLFLOW_SCHEMES)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def _resolve_uri(tracking_uri: str | None, out: Path, needed: bool) -> str | None:
    """The tracking URI (``--tracking-uri``, ``MLFLOW_TRACKING_URI``, else SQLite by the output)."""
    from regvi.sweep.tracking import resolve_tracking_uri

    if not needed:
        return None
    try:
        return resolve_tracking_uri(tracking_uri, out.resolve().parent)
    except ValueError as err:
        raise _fail("--tracking-uri", str(err)) from None


@contextlib.contextmanager
def _tracking(uri: str | None) -> Iterator[None]:
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


def model_lineage(model: str | os.PathLike, uri: str | None) -> dict[str, str]:
    """Tags linking a mapping run to its reference model (registered version and source run).

    ``models:/NAME@alias`` and ``models:/NAME/VERSION`` give the registered model's name,
    version and source run id; ``runs:/ID/...`` the run id; a directory its path.
    """
    text = str(model)
    tags = {TAG_MODEL_URI: _redact(text)}
    if text.startswith("runs:/"):
        tags[TAG_RUN_ID] = text[len("runs:/") :].split("/", 1)[0]
        return tags
    if not text.startswith("models:/"):
        tags[TAG_MODEL_URI] = str(Path(text).resolve())
        return tags
    from regvi.sweep.tracking import client

    c = client(uri)
    spec = text[len("models:/") :].rstrip("/")
    mv = None
    if "@" in spec:
        name, alias = spec.split("@", 1)
        mv = c.get_model_version_by_alias(name, alias)
    elif "/" in spec:
        name, version = spec.split("/", 1)
        if version.isdigit():
            mv = c.get_model_version(name, version)
        elif version.lower() == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            mv = max(versions, key=lambda v: int(v.version)) if versions else None
    else:  # models:/<model_id>: a logged model, not a registered version
        try:
            tags[TAG_RUN_ID] = str(c.get_logged_model(spec).source_run_id)
        except Exception:  # lineage is best effort
            pass
        return tags
    if mv is not None:
        tags[TAG_MODEL_NAME] = str(mv.name)
        tags[TAG_MODEL_VERSION] = str(mv.version)
        run_id = mv.run_id or (mv.tags or {}).get("run_id")
        if not run_id and getattr(mv, "model_id", None):
            with contextlib.suppress(Exception):
                run_id = c.get_logged_model(mv.model_id).source_run_id
        if run_id:
            tags[TAG_RUN_ID] = str(run_id)
    return tags


def _redact(text: str) -> str:
    from regvi.sweep.config import redact_uri

    return str(redact_uri(text))


@dataclass
class _Plan:
    """Everything :func:`map_query` checked before training."""

    model_text: str
    reference_model: Any
    query_path: Path
    query: Any  # AnnData as read (written back with the results)
    query_model: Any
    out: Path
    model_dir: Path | None
    reference: Any  # reference AnnData aligned to the model's genes, or None
    reference_labels: pd.Series | None
    query_labels: pd.Series | None
    uri: str | None
    lineage: dict[str, str]


def _read_h5ad(path: Path, arg: str) -> Any:
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types
        raise _fail(arg, f"cannot read {str(path)!r} as AnnData: {err}") from None


def _prepare(
    model: str | os.PathLike,
    query: str | os.PathLike,
    out: str | os.PathLike,
    reference: str | os.PathLike | None,
    labels_key: str | None,
    query_labels_key: str | None,
    train_epochs: int,
    patience: int,
    batch_size: int,
    fine_tune: tuple[str, ...],
    allow_missing_genes: bool,
    n_neighbors: int,
    threshold: float,
    tracking_uri: str | None,
    log_mlflow: bool,
    save_model: str | os.PathLike | None,
    overwrite: bool,
    max_plot_cells: int,
) -> _Plan:
    """Check every input (cheap checks first) and build the query model; writes nothing."""
    from regvi.model import RegVI

    _check_number(train_epochs, "--train-epochs", 0, 1e9, True)
    _check_number(patience, "--patience", 1, 1e9, True)
    _check_number(batch_size, "--batch-size", 2, 1e9, True)
    _check_number(n_neighbors, "--n-neighbors", 1, 1e9, True)
    _check_number(threshold, "--threshold", 0.0, 1.0, False)
    _check_number(max_plot_cells, "max_plot_cells", 10, 1e12, True)
    query_path = _check_h5ad_input(query, "--query")
    ref_path = _check_h5ad_input(reference, "--reference") if reference is not None else None
    if ref_path is not None and not labels_key:
        raise _fail("--labels-key", "label transfer needs the reference's label column")
    if query_labels_key and ref_path is None:
        raise _fail(
            "--query-labels-key",
            "scoring transferred labels needs --reference (the atlas AnnData with its labels)",
        )
    out_path = _check_output(out, overwrite)
    inputs = [query_path] + ([ref_path] if ref_path is not None else [])
    if out_path.resolve() in [i.resolve() for i in inputs]:
        raise _fail("--out", "must not be the query or the reference file")
    model_dir = _check_model_dir_out(save_model, overwrite)
    text = str(model)
    is_uri = _is_mlflow_uri(text)
    uri = _resolve_uri(tracking_uri, out_path, needed=log_mlflow or is_uri)
    if is_uri and uri is not None:
        db = _sqlite_path(uri)
        if db is not None and not db.is_file():
            raise _fail(
                "--tracking-uri",
                f"{uri} does not exist, so {text!r} cannot be found there "
                "(pass the tracking URI the model was registered in)",
            )
    elif not is_uri and not Path(text).is_dir():
        raise _fail("--model", f"{text!r} is not a model directory nor an MLflow model URI")

    # ---- the reference model
    from regvi.io import load

    with _tracking(uri if is_uri else None):
        try:
            reference_model = load(text)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
            raise _fail("--model", f"cannot load {_redact(text)!r}: {err}") from None
        lineage = {}
        if log_mlflow or is_uri:
            try:
                lineage = model_lineage(text, uri)
            except Exception as err:  # MLflow raises its own exception types
                raise _fail("--model", f"cannot resolve {_redact(text)!r}: {err}") from None
    if not isinstance(reference_model, RegVI):
        raise _fail(
            "--model",
            f"{_redact(text)!r} is a {type(reference_model).__name__}; mapping needs a RegVI",
        )
    if not reference_model.is_trained:
        raise _fail("--model", f"{_redact(text)!r} is not trained")

    # ---- the data (read, then checked against the model)
    adata = _read_h5ad(query_path, "--query")
    if adata.n_obs == 0:
        raise _fail("--query", f"{str(query_path)!r} has no cells")
    q_labels = None
    if query_labels_key:
        if query_labels_key not in adata.obs.columns:
            raise _fail(
                "--query-labels-key",
                f"{query_labels_key!r} is not a column of the query's obs "
                f"(columns: {list(adata.obs.columns)[:20]})",
            )
        q_labels = adata.obs[query_labels_key]
    ref_adata, ref_labels = None, None
    if ref_path is not None:
        if not adata.obs_names.is_unique:
            raise _fail("--query", "obs_names are not unique; make them unique for label transfer")
        ref_raw = _read_h5ad(ref_path, "--reference")
        if labels_key not in ref_raw.obs.columns:
            raise _fail(
                "--labels-key",
                f"{labels_key!r} is not a column of the reference's obs "
                f"({str(ref_path)!r}; columns: {list(ref_raw.obs.columns)[:20]})",
            )
        ref_labels = ref_raw.obs[labels_key]
        n_labelled = int(ref_labels.notna().sum())
        if n_labelled < n_neighbors:
            raise _fail(
                "--n-neighbors",
                f"{n_neighbors} neighbours but the reference has {n_labelled} labelled cells "
                f"in obs[{labels_key!r}]",
            )
        if UNKNOWN in {str(v) for v in pd.unique(ref_labels.dropna())}:
            raise _fail(
                "--labels-key",
                f"obs[{labels_key!r}] uses {UNKNOWN!r} as a label, which marks uncalled cells",
            )
        from regvi.map.query import align_genes

        reg = reference_model.registry
        try:
            ref_adata = align_genes(ref_raw, reg.var_names, reg.layer, False)
        except ValueError as err:
            raise _fail("--reference", f"genes do not match the model: {err}") from None

    # ---- the query model (genes, covariates and counts are checked here)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*missing in the query.*")
            query_model = RegVI.load_query_data(
                adata, reference_model, allow_missing_genes=allow_missing_genes, fine_tune=fine_tune
            )
    except (ValueError, KeyError, TypeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise _fail("--query", f"{str(query_path)!r} does not fit the model: {msg}") from None
    if allow_missing_genes:
        n_missing = len(set(reference_model.registry.var_names) - set(map(str, adata.var_names)))
        if n_missing:
            logger.warning("%d reference genes are missing in the query (zero counts)", n_missing)
    if ref_adata is not None:
        try:  # covariates / counts of the reference cells: encode a few now, all after training
            query_model.get_latent_representation(
                ref_adata, indices=np.arange(min(8, ref_adata.n_obs))
            )
        except (ValueError, KeyError, TypeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise _fail("--reference", f"{str(ref_path)!r} does not fit the model: {msg}") from None
    return _Plan(
        text,
        reference_model,
        query_path,
        adata,
        query_model,
        out_path,
        model_dir,
        ref_adata,
        ref_labels,
        q_labels,
        uri if log_mlflow else None,
        lineage,
    )


# ------------------------------------------------------------------------------ outputs
def write_h5ad_atomic(adata: Any, path: Path) -> Path:
    """Write ``adata`` to a temporary file next to ``path``, then rename it onto ``path``.

    A crash leaves either the previous file or none, never a half-written one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.h5ad", dir=path.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    names = [v for v in labels if v != UNKNOWN]
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours: dict[str, Any] = {}
    for i, v in enumerate(names):
        colours[v] = (
            cmap(i % cmap.N) if len(names) <= 20 else matplotlib.colormaps["hsv"](i / len(names))
        )
    colours[UNKNOWN] = (0.15, 0.15, 0.15, 1.0)
    return colours


def umap_plot(
    query_latent: np.ndarray,
    path: str | os.PathLike,
    *,
    reference_latent: np.ndarray | None = None,
    reference_labels: Sequence[Any] | None = None,
    query_labels: Sequence[Any] | None = None,
    query_groups: Sequence[Any] | None = None,
    group_name: str = "group",
    max_cells: int = MAX_PLOT_CELLS,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """UMAP of reference and query cells: by source (reference / query) and by label.

    Parameters
    ----------
    query_latent
        ``(n_query, d)`` latent of the query cells.
    path
        The PNG to write.
    reference_latent, reference_labels
        The reference cells' latent and labels (the first panel then shows reference vs query).
    query_labels
        The query's labels (transferred), shown with the reference's in the second panel.
    query_groups
        Without a reference: a query grouping (e.g. its library) for the first panel.
    group_name
        What ``query_groups`` is (the first panel's title).
    max_cells
        Most cells plotted; reference and query are subsampled in proportion.
    seed
        Seed of the subsample and of UMAP.
    title
        Figure title.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from regvi.plotting import umap_2d

    rng = np.random.default_rng(seed)
    n_q = query_latent.shape[0]
    n_r = 0 if reference_latent is None else reference_latent.shape[0]
    share = min(1.0, max_cells / max(n_q + n_r, 1))
    qi = _subsample(n_q, max(1, int(n_q * share)), rng)
    ri = _subsample(n_r, int(n_r * share), rng) if n_r else np.arange(0)
    parts = [np.asarray(query_latent)[qi]]
    if n_r:
        parts.insert(0, np.asarray(reference_latent)[ri])
    latent = np.concatenate(parts).astype(np.float32)
    n_neighbors = int(min(15, max(2, latent.shape[0] - 1)))
    xy = umap_2d(latent, seed=seed, n_neighbors=n_neighbors)
    is_query = np.r_[np.zeros(len(ri), bool), np.ones(len(qi), bool)]
    n = latent.shape[0]
    size = float(np.clip(30000 / n, 0.3, 12.0))
    order = rng.permutation(n)

    labels = None
    if query_labels is not None or reference_labels is not None:
        q_lab = (
            np.asarray([str(v) for v in np.asarray(query_labels, dtype=object)[qi]], dtype=object)
            if query_labels is not None
            else np.full(len(qi), "query (no label)", dtype=object)
        )
        r_lab = (
            np.asarray(
                [
                    "unlabelled" if pd.isna(v) else str(v)
                    for v in np.asarray(reference_labels, dtype=object)[ri]
                ],
                dtype=object,
            )
            if reference_labels is not None and n_r
            else np.zeros(0, dtype=object)
        )
        labels = np.concatenate([r_lab, q_lab])

    n_panels = 2 if labels is not None else 1
    fig = Figure(figsize=(6.4 * n_panels + 2.2 * n_panels, 6.0), dpi=130)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]

    ax = axes[0]
    if n_r:
        src = np.where(is_query, "query", "reference")
        colours = {"reference": (0.72, 0.72, 0.72, 1.0), "query": (0.84, 0.15, 0.16, 1.0)}
        counts = {"reference": len(ri), "query": len(qi)}
        ax.set_title("reference vs query")
    else:
        src = np.asarray([str(v) for v in np.asarray(query_groups, dtype=object)[qi]])
        colours = _palette(sorted(set(src)))
        counts = {k: int((src == k).sum()) for k in colours if (src == k).any()}
        ax.set_title(f"query cells by {group_name}")
    ax.scatter(
        xy[order, 0],
        xy[order, 1],
        c=[colours[s] for s in src[order]],
        s=size,
        linewidths=0,
        rasterized=True,
    )
    handles = [
        Line2D([], [], marker="o", ls="", color=colours[k], label=f"{k} (n={counts[k]})")
        for k in counts
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

    if labels is not None:
        ax = axes[1]
        names = sorted({str(v) for v in labels}, key=lambda v: (v == UNKNOWN, v))
        colours = _palette(names)
        ax.scatter(
            xy[order, 0],
            xy[order, 1],
            c=[colours[v] for v in labels[order]],
            s=size,
            linewidths=0,
            rasterized=True,
        )
        ax.set_title("label (reference: annotated, query: transferred)")
        handles = [Line2D([], [], marker="o", ls="", color=colours[k], label=k) for k in names[:40]]
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize=9 if len(names) <= 20 else 6,
            ncol=1 if len(names) <= 20 else 2,
        )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    shown = f"{len(qi)} of {n_q} query" + (f", {len(ri)} of {n_r} reference" if n_r else "")
    fig.suptitle((title + "\n" if title else "") + f"{shown} cells", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _artifact_root(uri: str) -> Path | None:
    db = _sqlite_path(uri)
    return None if db is None else db.resolve().parent / "mlartifacts"


# ------------------------------------------------------------------------------ mapping
def map_query(
    model: str | os.PathLike,
    query: str | os.PathLike,
    out: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    labels_key: str = "cell_type",
    query_labels_key: str | None = None,
    train_epochs: int = DEFAULT_EPOCHS,
    patience: int = DEFAULT_PATIENCE,
    batch_size: int = 128,
    fine_tune: str | Sequence[str] | None = None,
    allow_missing_genes: bool = False,
    n_neighbors: int = 15,
    threshold: float = 0.5,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    log_mlflow: bool = True,
    seed: int = 0,
    save_model: str | os.PathLike | None = None,
    overwrite: bool = False,
    accelerator: str = "cpu",
    progress_bar: bool = True,
    max_plot_cells: int = MAX_PLOT_CELLS,
) -> MappingResult:
    """Map query cells onto a trained reference model (what ``python -m regvi.map`` runs).

    Parameters
    ----------
    model
        The reference model: a directory, ``runs:/ID/model``, ``models:/NAME@alias`` or
        ``models:/NAME/VERSION`` (resolved in ``tracking_uri``).
    query
        The query ``.h5ad``: raw counts with the reference's covariate columns in ``obs``.
    out
        The output ``.h5ad``: the query with ``obsm["X_regvi"]`` (and transferred labels).
    reference
        The atlas ``.h5ad`` the model was trained on, with labels in ``labels_key``; without it
        there is no label transfer (the output holds the latent only).
    labels_key
        The reference's label column; the output gets ``obs[f"{labels_key}_transferred"]``
        and ``obs[f"{labels_key}_confidence"]``.
    query_labels_key
        The query's own labels (if known) to score the transfer: accuracy, macro-F1 and a
        confusion plot.
    train_epochs
        Most query training epochs (early stopping on the validation ELBO); 0 skips training
        (the new categories keep their data-based initial values).
    patience
        Early-stopping patience in epochs.
    batch_size
        Cells per training minibatch.
    fine_tune
        Also train ``"conditioning"`` and/or ``"encoder"`` (see
        :meth:`regvi.RegVI.load_query_data`); a comma-separated string or a sequence.
    allow_missing_genes
        Fill reference genes the query lacks with zero counts instead of refusing.
    n_neighbors, threshold
        kNN label transfer settings (:func:`regvi.map.labels.transfer_labels`).
    tracking_uri
        MLflow tracking URI (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///`` ``mlflow.db``
        next to ``out``); also where ``models:/`` and ``runs:/`` URIs are resolved.
    experiment
        MLflow experiment of the mapping run.
    log_mlflow
        Log a mapping run (params, metrics, UMAP and confusion plots, model lineage tags).
    seed
        Seed of query training, the plots' subsample and UMAP.
    save_model
        Also save the trained query model to this directory.
    overwrite
        Replace an existing ``out`` / ``save_model``.
    accelerator
        ``"cpu"``, ``"gpu"`` or ``"auto"`` for query training.
    progress_bar
        Show a progress bar over the training epochs.
    max_plot_cells
        Most cells in the UMAP plot.

    Returns
    -------
    MappingResult
        The output path, the added categories, the metrics and the MLflow run id.

    Raises
    ------
    MappingInputError
        On any bad input, before training and before anything is written.
    """
    tune = parse_fine_tune(fine_tune)
    from regvi.data.device import training_device

    try:
        training_device(accelerator)
    except ValueError as err:
        raise _fail("--accelerator", str(err)) from None
    plan = _prepare(
        model,
        query,
        out,
        reference,
        labels_key if reference is not None else None,
        query_labels_key,
        train_epochs,
        patience,
        batch_size,
        tune,
        allow_missing_genes,
        n_neighbors,
        threshold,
        tracking_uri,
        log_mlflow,
        save_model,
        overwrite,
        max_plot_cells,
    )
    qm = plan.query_model
    added = {k: list(v) for k, v in qm.query.added_categories.items()}
    params = {
        "model": _redact(plan.model_text),
        "query": str(plan.query_path.resolve()),
        "reference": str(Path(reference).resolve()) if reference is not None else "",
        "out": str(plan.out.resolve()),
        "n_query_cells": plan.query.n_obs,
        "n_reference_cells": plan.reference.n_obs if plan.reference is not None else 0,
        "new_categories": json.dumps(added),
        "n_new_categories": sum(len(v) for v in added.values()),
        "fine_tune": ",".join(tune) or "none",
        "train_epochs": train_epochs,
        "patience": patience,
        "batch_size": batch_size,
        "labels_key": labels_key if reference is not None else "",
        "query_labels_key": query_labels_key or "",
        "n_neighbors": n_neighbors,
        "threshold": threshold,
        "allow_missing_genes": allow_missing_genes,
        "seed": seed,
    }
    run_id, c = None, None
    if plan.uri is not None:
        from regvi.sweep.tracking import client, ensure_experiment, flat_params

        try:
            exp_id = ensure_experiment(plan.uri, experiment, _artifact_root(plan.uri))
            c = client(plan.uri)
            tags = {**plan.lineage, TAG_KIND: "mapping"}
            run = c.create_run(exp_id, run_name=f"map {plan.query_path.stem}", tags=tags)
        except Exception as err:  # unreachable store: refused before training
            raise _fail("--tracking-uri", f"cannot log to {_redact(plan.uri)}: {err}") from None
        run_id = run.info.run_id
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in flat_params(params).items()]
        c.log_batch(run_id, params=batch)
    try:
        result = _run(
            plan,
            params,
            added,
            tune,
            train_epochs,
            patience,
            batch_size,
            seed,
            accelerator,
            progress_bar,
            labels_key,
            n_neighbors,
            threshold,
            max_plot_cells,
            overwrite,
            c,
            run_id,
        )
    except BaseException:
        if c is not None and run_id is not None:
            with contextlib.suppress(Exception):
                c.set_terminated(run_id, "FAILED")
        raise
    if c is not None and run_id is not None:
        c.set_terminated(run_id, "FINISHED")
    result.tracking_uri = plan.uri
    return result


def _run(
    plan: _Plan,
    params: dict[str, Any],
    added: dict[str, list[str]],
    tune: tuple[str, ...],
    train_epochs: int,
    patience: int,
    batch_size: int,
    seed: int,
    accelerator: str,
    progress_bar: bool,
    labels_key: str,
    n_neighbors: int,
    threshold: float,
    max_plot_cells: int,
    overwrite: bool,
    c: Any,
    run_id: str | None,
) -> MappingResult:
    from regvi.map.labels import transfer_accuracy, transfer_labels, write_to_obs

    qm = plan.query_model
    metrics: dict[str, float] = {"n_query_cells": float(plan.query.n_obs)}
    t0 = time.perf_counter()
    if train_epochs > 0 and (added or tune):  # nothing new and nothing fine-tuned: no training
        n_val = 0.1 if plan.query.n_obs >= 20 else 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            qm.train(
                max_epochs=train_epochs,
                batch_size=batch_size,
                validation_fraction=n_val,
                early_stopping=True,
                patience=patience,
                n_epochs_kl_warmup=None,  # the reference finished at full KL weight
                seed=seed,
                accelerator=accelerator,
                progress_bar=progress_bar,
            )
    metrics["query_train_time_s"] = time.perf_counter() - t0
    history = qm.history
    metrics["query_n_epochs"] = float(len(history))
    for col in ("train_elbo", "validation_elbo"):
        if len(history) and col in history and pd.notna(history[col].iloc[-1]):
            metrics[f"query_final_{col}"] = float(history[col].iloc[-1])
    metrics["query_elbo"] = float(qm.get_elbo(seed=seed))
    latent = qm.get_latent_representation()
    out_adata = plan.query
    out_adata.obsm[LATENT_KEY] = latent
    table = None
    ref_latent = None
    if plan.reference is not None and plan.reference_labels is not None:
        ref_latent = qm.get_latent_representation(plan.reference)
        table = transfer_labels(
            ref_latent,
            plan.reference_labels.to_numpy(),
            latent,
            n_neighbors=n_neighbors,
            threshold=threshold,
            unknown_label=UNKNOWN,
            query_index=out_adata.obs_names,
        )
        write_to_obs(out_adata, table, key=labels_key)
        metrics["fraction_unknown"] = float((table["label"] == UNKNOWN).mean())
        metrics["mean_confidence"] = float(table["confidence"].mean())
        if plan.query_labels is not None:
            acc = transfer_accuracy(plan.query_labels, table["label"], unknown_label=UNKNOWN)
            for k in ("accuracy", "accuracy_called", "macro_f1"):
                metrics[k] = float(acc[k])
            metrics["fraction_unknown_scored"] = float(acc["fraction_unknown"])
    out_adata.uns["regvi_mapping"] = {
        k: (v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else str(v))
        for k, v in params.items()
    } | ({"mlflow_run_id": run_id} if run_id else {})
    write_h5ad_atomic(out_adata, plan.out)
    model_dir = None
    if plan.model_dir is not None:
        qm.save(plan.model_dir, overwrite=overwrite)
        model_dir = plan.model_dir
    if c is not None and run_id is not None:
        _log_run(
            c,
            run_id,
            plan,
            metrics,
            latent,
            ref_latent,
            table,
            labels_key,
            seed,
            max_plot_cells,
            added,
        )
    return MappingResult(
        out=plan.out,
        n_query_cells=int(plan.query.n_obs),
        added_categories=added,
        metrics=metrics,
        run_id=run_id,
        model_dir=model_dir,
        labels=table,
    )


def _log_run(
    c: Any,
    run_id: str,
    plan: _Plan,
    metrics: dict[str, float],
    latent: np.ndarray,
    ref_latent: np.ndarray | None,
    table: pd.DataFrame | None,
    labels_key: str,
    seed: int,
    max_plot_cells: int,
    added: dict[str, list[str]],
) -> None:
    """Metrics, the UMAP and (with query labels) the confusion plot on the mapping run."""
    from mlflow.entities import Metric

    from regvi.map.labels import confusion_plot

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    c.log_batch(run_id, metrics=batch)
    with tempfile.TemporaryDirectory(prefix="regvi-map-") as tmp:
        group_key = next(iter(added), None)
        groups = (
            plan.query.obs[group_key].astype(str).to_numpy()
            if group_key is not None
            else np.full(plan.query.n_obs, "query", dtype=object)
        )
        title = f"query {plan.query_path.name} mapped onto {_redact(plan.model_text)}"
        umap = umap_plot(
            latent,
            Path(tmp) / "umap_reference_query.png",
            reference_latent=ref_latent,
            reference_labels=plan.reference_labels.to_numpy() if ref_latent is not None else None,
            query_labels=table["label"].to_numpy() if table is not None else None,
            query_groups=groups,
            group_name=group_key or "source",
            max_cells=max_plot_cells,
            seed=seed,
            title=title,
        )
        c.log_artifact(run_id, str(umap), "plots")
        if table is not None and plan.query_labels is not None:
            conf = confusion_plot(
                plan.query_labels,
                table["label"],
                Path(tmp) / "confusion.png",
                unknown_label=UNKNOWN,
            )
            c.log_artifact(run_id, str(conf), "plots")


# ------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m regvi.map`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m regvi.map",
        description=(
            "Map new cells onto a trained regvi reference model: only the new categories' "
            "technical terms train (ambient, dispersion, feature scaling; their library-size "
            "prior is set from the query's counts), the query is encoded with the reference's "
            "encoder, and with --reference its labels are transferred by a kNN vote. Exit "
            "status: 0 done, 2 bad input (nothing written), 1 failed."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="reference model: a directory, runs:/ID/model, models:/NAME@alias or models:/NAME/VER",
    )
    p.add_argument("--query", required=True, help="query .h5ad (raw counts, the model's obs keys)")
    p.add_argument(
        "--out", required=True, help="output .h5ad (the query + obsm['X_regvi'], labels)"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the atlas .h5ad the model was trained on, with labels; needed for label transfer "
        "(without it the output holds the latent only, no transferred labels)",
    )
    p.add_argument(
        "--labels-key",
        default="cell_type",
        help="label column of the reference's obs (default: cell_type); used with --reference",
    )
    p.add_argument(
        "--query-labels-key",
        default=None,
        help="the query's own label column, to score the transfer (accuracy, macro-F1, confusion)",
    )
    p.add_argument(
        "--train-epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"most query training epochs, early stopping on (default {DEFAULT_EPOCHS}; 0: none)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help=f"early-stopping patience in epochs (default {DEFAULT_PATIENCE})",
    )
    p.add_argument("--batch-size", type=int, default=128, help="training minibatch size")
    p.add_argument(
        "--fine-tune",
        default=None,
        help="also train: conditioning (new categories' one-hot weights) and/or encoder "
        "(comma-separated); default none",
    )
    p.add_argument(
        "--allow-missing-genes",
        action="store_true",
        help="fill reference genes the query lacks with zero counts instead of refusing",
    )
    p.add_argument("--n-neighbors", type=int, default=15, help="kNN label transfer (default 15)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help=f"confidence below which a cell is called {UNKNOWN!r} (default 0.5)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite mlflow.db by --out)",
    )
    p.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log a mapping run")
    p.add_argument("--save-model", default=None, help="also save the query model to this directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --save-model")
    p.add_argument("--seed", type=int, default=0, help="seed (training, plots)")
    p.add_argument(
        "--accelerator", default="cpu", choices=("cpu", "gpu", "auto"), help="training device"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m regvi.map``; returns the exit status (0 done, 2 bad input, 1 failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        result = map_query(
            args.model,
            args.query,
            args.out,
            reference=args.reference,
            labels_key=args.labels_key,
            query_labels_key=args.query_labels_key,
            train_epochs=args.train_epochs,
            patience=args.patience,
            batch_size=args.batch_size,
            fine_tune=args.fine_tune,
            allow_missing_genes=args.allow_missing_genes,
            n_neighbors=args.n_neighbors,
            threshold=args.threshold,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            log_mlflow=not args.no_mlflow,
            seed=args.seed,
            save_model=args.save_model,
            overwrite=args.overwrite,
            accelerator=args.accelerator,
            progress_bar=not args.no_progress,
        )
    except MappingInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # reported, not a traceback for users
        logger.debug("mapping failed", exc_info=True)
        print(f"error: mapping failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    new = ", ".join(f"{k}: {len(v)}" for k, v in result.added_categories.items()) or "none"
    print(f"mapped {result.n_query_cells} cells (new categories {new}) -> {result.out}")
    m = result.metrics
    if "mean_confidence" in m:
        line = f"labels: mean confidence {m['mean_confidence']:.3f}, unknown {m['fraction_unknown']:.1%}"
        if "accuracy" in m:
            line += f", accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
        print(line)
    if result.model_dir is not None:
        print(f"query model saved to {result.model_dir}")
    if result.run_id is not None:
        print(f"MLflow run {result.run_id} ({_redact(str(result.tracking_uri))})")
    return 0
