"""A sweep's storage filling up: disk full, quota exceeded, file-size limit.

Retrying does not help when storage is full, so the sweep stops at the first such failure
(:class:`StorageFullError`, naming the folder and its free space). Retrying would only burn each
trial's retries and then mark healthy trials failed. After a stop, every trial is either
complete in MLflow (a run is set FINISHED only after all its artifacts and its model were
written) or unfinished and resumable from its last checkpoint. Free space, then ``--resume``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

#: errno values meaning "no room to write": disk full, quota exceeded, file-size limit.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: The same failures after Ray, pyarrow or SQLite turned them into text (a remote traceback).
NO_SPACE_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "database or disk is full",
    "[Errno 28]",
    "[Errno 122]",
    "[Errno 27]",
)


class StorageFullError(OSError):
    """The sweep's storage is full (or over quota); the sweep stopped, ``--resume`` continues."""


def _chain(err: BaseException):
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_storage_full(err: BaseException | str | None) -> bool:
    """Whether ``err`` (an exception, with its causes, or an error text) is a storage-full one."""
    if err is None:
        return False
    if isinstance(err, str):
        return any(t in err for t in NO_SPACE_TEXT)
    return any(
        (isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS)
        or any(t in str(e) for t in NO_SPACE_TEXT)
        for e in _chain(err)
    )


def first_line(err: BaseException | str) -> str:
    """The line of ``err``'s text that names the storage failure (for messages)."""
    if isinstance(err, BaseException):
        for e in _chain(err):  # a StorageFullError raised below a wrapper (TuneError) says it best
            if isinstance(e, StorageFullError) or (
                isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS
            ):
                return f"{type(e).__name__}: {e}"[:500]
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    for line in text.splitlines():
        if any(t in line for t in NO_SPACE_TEXT):
            return line.strip()[:500]
    return text.strip().splitlines()[-1][:500] if text.strip() else "no space left"


def free_space(path: Path) -> str:
    """Free space on ``path``'s filesystem, e.g. ``'0.0 MiB free'`` (or ``'free space unknown'``)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free"
            except OSError:
                break
    return "free space unknown"


def stopped_message(sweep_dir: Path, err: BaseException | str) -> str:
    """The message of a sweep stopped by full storage: folder, free space, cause, what to do."""
    return (
        f"storage.path: no space left for the sweep folder {sweep_dir} ({free_space(sweep_dir)}): "
        f"{first_line(err)}. The sweep stopped: trials logged as completed in MLflow are "
        "complete, the others continue from their last checkpoint. Free space, then run the "
        "same command with --resume."
    )
