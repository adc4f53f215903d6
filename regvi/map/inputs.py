"""The arguments of :func:`regvi.map.mapping.map_query` and their checks; h5ad reading and writing.

Every refusal is a :class:`MappingInputError` whose message names the argument, file or key
(``--query: 'x.h5ad' does not exist``); ``python -m regvi.map`` exits with status 2 on it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the label of query cells whose transferred label is not confident enough
UNKNOWN = "unknown"


class MappingInputError(ValueError):
    """A refused input of :func:`regvi.map.mapping.map_query`.

    The message names the argument, file or key.
    """


@dataclass(frozen=True)
class MappingSettings:
    """The arguments of :func:`regvi.map.mapping.map_query` (``fine_tune`` already parsed)."""

    model: str | os.PathLike
    query: str | os.PathLike
    out: str | os.PathLike
    reference: str | os.PathLike | None
    labels_key: str
    query_labels_key: str | None
    train_epochs: int
    patience: int
    batch_size: int
    fine_tune: tuple[str, ...]
    allow_missing_genes: bool
    n_neighbors: int
    threshold: float
    tracking_uri: str | None
    experiment: str
    log_mlflow: bool
    seed: int
    save_model: str | os.PathLike | None
    overwrite: bool
    accelerator: str
    progress_bar: bool
    max_plot_cells: int


def fail(arg: str, message: str) -> MappingInputError:
    """The refusal of ``arg`` (an option such as ``--query``) for ``message``."""
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
        raise fail("--fine-tune", str(err)) from None


def check_accelerator(accelerator: str) -> None:
    """Refuse a training device that :func:`regvi.data.device.training_device` refuses."""
    from regvi.data.device import training_device

    try:
        training_device(accelerator)
    except ValueError as err:
        raise fail("--accelerator", str(err)) from None


def check_number(value: Any, arg: str, low: float, high: float, integer: bool) -> None:
    """Refuse ``value`` unless it is a number (an integer if asked) in ``[low, high]``."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (low <= value <= high):
        what = "an integer" if integer else "a number"
        raise fail(arg, f"expected {what} in [{low:g}, {high:g}], got {value!r}")


def check_numbers(s: MappingSettings) -> None:
    """The numeric settings: epochs, patience, batch size, kNN settings, plotted cells."""
    check_number(s.train_epochs, "--train-epochs", 0, 1e9, True)
    check_number(s.patience, "--patience", 1, 1e9, True)
    check_number(s.batch_size, "--batch-size", 2, 1e9, True)
    check_number(s.n_neighbors, "--n-neighbors", 1, 1e9, True)
    check_number(s.threshold, "--threshold", 0.0, 1.0, False)
    check_number(s.max_plot_cells, "max_plot_cells", 10, 1e12, True)


def check_h5ad_input(path: str | os.PathLike, arg: str) -> Path:
    """An existing, readable ``.h5ad`` file given as ``arg``."""
    path = Path(path)
    if path.suffix != ".h5ad":
        raise fail(arg, f"{str(path)!r} is not an .h5ad file (expected the suffix .h5ad)")
    if not path.exists():
        raise fail(arg, f"{str(path)!r} does not exist")
    if not path.is_file():
        raise fail(arg, f"{str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise fail(arg, f"{str(path)!r} is not readable")
    return path


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output ``.h5ad``: not a directory, new unless ``overwrite``, in a writable folder."""
    path = Path(path)
    if path.suffix != ".h5ad":
        raise fail("--out", f"{str(path)!r}: the output must end in .h5ad")
    if path.is_dir():
        raise fail("--out", f"{str(path)!r} is a directory")
    if path.exists() and not overwrite:
        raise fail("--out", f"{str(path)!r} exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise fail("--out", f"the output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise fail("--out", f"the output directory {str(parent)!r} is not writable")
    return path


def check_model_dir_out(path: str | os.PathLike | None, overwrite: bool) -> Path | None:
    """Where ``--save-model`` saves the query model (``None`` when not asked for)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not overwrite:
        raise fail("--save-model", f"{str(path)!r} exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise fail("--save-model", f"{str(path)!r} exists and is not a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise fail("--save-model", f"the directory {str(parent)!r} is missing or not writable")
    return path


@dataclass(frozen=True)
class Paths:
    """The checked files of a mapping."""

    query: Path
    reference: Path | None
    out: Path
    model_dir: Path | None


def check_paths(s: MappingSettings) -> Paths:
    """The query, reference, output and model directory; the label keys they need."""
    query_path = check_h5ad_input(s.query, "--query")
    ref_path = check_h5ad_input(s.reference, "--reference") if s.reference is not None else None
    if ref_path is not None and not s.labels_key:
        raise fail("--labels-key", "label transfer needs the reference's label column")
    if s.query_labels_key and ref_path is None:
        raise fail(
            "--query-labels-key",
            "scoring transferred labels needs --reference (the atlas AnnData with its labels)",
        )
    out_path = check_output(s.out, s.overwrite)
    inputs = [query_path] + ([ref_path] if ref_path is not None else [])
    if out_path.resolve() in [i.resolve() for i in inputs]:
        raise fail("--out", "must not be the query or the reference file")
    model_dir = check_model_dir_out(s.save_model, s.overwrite)
    return Paths(query_path, ref_path, out_path, model_dir)


def read_h5ad(path: Path, arg: str) -> Any:
    """``path`` read as AnnData; a file that is not one is refused as ``arg``."""
    import anndata as ad

    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types
        raise fail(arg, f"cannot read {str(path)!r} as AnnData: {err}") from None


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
