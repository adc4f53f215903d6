"""Sweep state that survives a full disk or a killed driver: no truncated file, no mixed state.

Tune and Train write their state files in place (``open`` truncates, then writes). When the
disk fills up, or the driver is killed, mid-write, the file on storage is left truncated. Tune
then fails to read it on ``--resume`` and silently *restarts the experiment* (new trial ids, every
trial run again); Train fails the trial whose ``checkpoint_manager_snapshot.json`` is cut short.
Two guards:

:func:`atomic_filesystem`
    The pyarrow filesystem given to Tune and Train for the sweep folder. Every file is written
    to a temporary name and renamed over the target once complete (``os.replace``, atomic on
    POSIX), so a file on storage is always a complete old or a complete new version.
:class:`TuneStateSnapshot`
    Tune's experiment state is several files (trials, searcher, callbacks) uploaded one by one;
    a failure between two uploads leaves a new searcher with old trials (trials lost, or the
    grid generated twice). At every Tune checkpoint, right after Tune wrote the files to its
    local staging folder, this callback copies the set into a new generation folder
    ``.regvi_tune_state/gen-<n>`` and renames it into place only once all files are written.
    :func:`prepare_resume` puts the newest complete generation back before Tune restores, and
    refuses (naming the file) state it cannot read, instead of letting Tune start afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SNAPSHOT_DIR = ".regvi_tune_state"
#: Tune's experiment-level state files (in the experiment folder's root).
TUNE_STATE_PATTERNS = (
    "experiment_state-*.json",
    "basic-variant-state-*.json",
    "searcher-state-*.pkl",
    "callback-states-*.pkl",
)
KEEP_GENERATIONS = 2


def _tmp_name(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"))


class _AtomicWriter:
    """File object for :class:`pyarrow.PythonFile`: writes a temporary file, renames on close.

    A failed write or flush (disk full) removes the temporary file and leaves the target as it
    was."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = _tmp_name(path)
        self._f = open(self.tmp, "wb")  # closed in close()
        self._failed = False
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._f.tell()

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._failed:  # a write already raised: drop the partial file, keep the target
            _quiet_close(self._f)
            Path(self.tmp).unlink(missing_ok=True)
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except BaseException:
            _quiet_close(self._f)
            Path(self.tmp).unlink(missing_ok=True)
            raise
        os.replace(self.tmp, self.path)


def _quiet_close(f) -> None:
    try:
        f.close()
    except OSError:
        pass


class AtomicLocalHandler(pafs.FileSystemHandler):
    """Local filesystem whose output streams and copies replace their target atomically."""

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()

    def __reduce__(self):
        return AtomicLocalHandler, ()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "regvi-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the filesystem root")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        tmp = _tmp_name(dest)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def open_input_stream(self, path: str):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        import pyarrow as pa

        return pa.PythonFile(_AtomicWriter(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._fs.open_append_stream(path)


def atomic_filesystem() -> pafs.PyFileSystem:
    """A pyarrow filesystem for local paths that never leaves a partly written file."""
    return pafs.PyFileSystem(AtomicLocalHandler())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _generations(root: Path) -> list[Path]:
    gens = [p for p in root.glob("gen-*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(gens, key=lambda p: int(p.name[4:]))


def write_generation(staging: Path, root: Path) -> Path | None:
    """Copy Tune's state files in ``staging`` into a new complete generation under ``root``.

    Returns the generation folder, or ``None`` when there was nothing to copy. An ``OSError``
    (disk full) leaves the previous generation in place and no partial one behind."""
    files = sorted(f for pat in TUNE_STATE_PATTERNS for f in staging.glob(pat) if f.is_file())
    if not files:
        return None
    root.mkdir(parents=True, exist_ok=True)
    gens = _generations(root)
    n = int(gens[-1].name[4:]) + 1 if gens else 0
    tmp = root / f".gen-{n}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for f in files:
            with open(f, "rb") as src, open(tmp / f.name, "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
        final = root / f"gen-{n}"
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in _generations(root)[:-KEEP_GENERATIONS]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".gen-*.tmp-*"):  # left by a driver killed mid-copy
        shutil.rmtree(stale, ignore_errors=True)
    return final


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


class TuneStateSnapshot(_TuneCallback):
    """Tune callback: a complete, consistent copy of Tune's state at every Tune checkpoint.

    Tune calls callbacks' ``get_state`` while it saves its state, after the trial and searcher
    files were written to the driver's staging folder; the copy is made then. Returns ``None``
    (the callback has no state of its own)."""

    def __init__(self, sweep_dir: Path):
        self.root = Path(sweep_dir) / SNAPSHOT_DIR
        self._staging: Path | None = None
        self.last_error: str | None = None

    def on_trial_add(self, iteration, trials, trial, **info):
        self._staging = Path(trial.storage.experiment_driver_staging_path)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._staging = Path(trial.storage.experiment_driver_staging_path)

    def get_state(self) -> dict[str, Any] | None:
        if self._staging is not None and self._staging.is_dir():
            try:
                write_generation(self._staging, self.root)
                self.last_error = None
            except OSError as err:  # disk full: keep the last complete generation
                self.last_error = f"{type(err).__name__}: {err}"
        return None


def _load_pickle(path: Path) -> Any:
    import ray.cloudpickle as cloudpickle

    with open(path, "rb") as f:
        return cloudpickle.load(f)


def check_tune_state(sweep_dir: Path) -> None:
    """Raise ``ValueError`` naming the file when Tune's newest state in ``sweep_dir`` is unreadable.

    Tune itself would log the error and start the whole experiment again."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        raise ValueError(
            f"--resume: no Tune experiment state (experiment_state-*.json) in {sweep_dir}"
        )
    checks: list[tuple[Path, Any]] = [(states[-1], lambda p: json.loads(p.read_text()))]
    for pat in TUNE_STATE_PATTERNS[1:]:
        found = sorted(sweep_dir.glob(pat))
        if found:
            checks.append((found[-1], _load_pickle))
    for path, load in checks:
        try:
            state = load(path)
        except Exception as err:
            raise ValueError(
                f"--resume: Tune state file {path} is unreadable ({type(err).__name__}: {err}); "
                "it was cut short (disk full or a killed driver) and no complete copy is left "
                f"in {sweep_dir / SNAPSHOT_DIR}"
            ) from None
        if path == states[-1] and not state.get("trial_data"):
            raise ValueError(f"--resume: Tune state file {path} holds no trials")


def prepare_resume(sweep_dir: Path) -> Path | None:
    """Before ``Tuner.restore``: put the newest complete snapshot generation back in place of
    Tune's own (possibly cut short or mixed) state files, then check that they read.

    Returns the generation used (``None`` for a sweep without snapshots)."""
    gens = _generations(sweep_dir / SNAPSHOT_DIR)
    gen = gens[-1] if gens else None
    if gen is not None:
        for pat in TUNE_STATE_PATTERNS:
            for f in sweep_dir.glob(pat):
                f.unlink()
        for f in sorted(gen.iterdir()):
            tmp = sweep_dir / f".{f.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(f, tmp)
            os.replace(tmp, sweep_dir / f.name)
    check_tune_state(sweep_dir)
    return gen
