"""Memory-mapped CSR count matrices on disk, for data larger than memory.

Format: a directory with three ``.npy`` files (``data``, ``indices``, ``indptr``; plain numeric
arrays, no pickle) and a small ``meta.json`` (format, shape, nnz, dtypes). ``meta.json`` is
written last, so its presence marks a complete matrix. :func:`open_mmap_csr` returns an ordinary
``scipy.sparse.csr_matrix`` whose ``data`` and ``indices`` are read-only memmaps of those files
(scipy keeps them without copying), so ``AnnData(X=open_mmap_csr(path), obs=...)`` and
:class:`regvi.RegVI` work unchanged: every setup pass reads the matrix in row chunks and
minibatches slice only their rows, so resident memory stays about one copy of the file (the
page cache mapped into the process) plus the model.

A directory may also hold ``obs.csv`` / ``var.csv`` (cell and feature annotations) and
``truth.npz`` (simulation ground truth, plain arrays); :func:`open_mmap_anndata` reads them.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)

FORMAT = "regvi-mmap-csr"
VERSION = 1
ARRAYS = ("data", "indices", "indptr")
#: Fixed size of the ``.npy`` headers written by :func:`write_mmap_csr` (a multiple of 64; room
#: for any length), so a file can be appended to before its final length is known.
_HEADER_BYTES = 128
_INT32_MAX = int(np.iinfo(np.int32).max)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    """A version-1.0 ``.npy`` header for a 1-D C-order array, padded to ``_HEADER_BYTES``."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({int(length)},), }}"
    body = text.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == _HEADER_BYTES
    return header


class _NpyAppender:
    """Append 1-D chunks to a ``.npy`` file; the header is rewritten with the length at the end."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self.fh = open(path, "wb")  # closed in finish() / abort()
        self.fh.write(_npy_header(self.dtype, 0))

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(values.tobytes())
        self.length += values.size

    def finish(self) -> None:
        self.fh.seek(0)
        self.fh.write(_npy_header(self.dtype, self.length))
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


def _as_row_chunks(X_or_chunks: Any, chunk_rows: int) -> Iterable[Any]:
    """Row chunks of a matrix (CSR/CSC/COO/dense), or the given iterable of chunks as is."""
    if sp.issparse(X_or_chunks) or isinstance(X_or_chunks, np.ndarray):
        X = X_or_chunks
        if sp.issparse(X) and X.format != "csr":
            X = sp.csr_matrix(X)
        return (X[s : s + chunk_rows] for s in range(0, X.shape[0], chunk_rows))
    return X_or_chunks


def write_mmap_csr(
    path: str | os.PathLike,
    X_or_chunks: Any,
    n_cols: int | None = None,
    dtype: Any = None,
    chunk_rows: int = 100_000,
    overwrite: bool = False,
) -> Path:
    """Write a CSR matrix to ``path`` (a directory) in row chunks, never holding it all in memory.

    Parameters
    ----------
    path
        Output directory (created).
    X_or_chunks
        A matrix (scipy sparse or dense, written in chunks of ``chunk_rows`` rows) or an iterable
        of row chunks (scipy sparse or dense, each ``n_rows × n_cols``), e.g. a generator.
    n_cols
        Number of columns (default: that of the matrix / first chunk); every chunk is checked.
    dtype
        Value dtype on disk (default: the first chunk's); later chunks must cast safely
        (``same_kind``) to it.
    chunk_rows
        Rows per chunk when a whole matrix is given.
    overwrite
        Replace an existing matrix at ``path``.

    Returns
    -------
    Path
        ``path``. Indices are int32 (int64 if a dimension or the number of non-zeros needs it);
        ``indptr`` has the same dtype as ``indices``, so scipy maps both without a copy.
    """
    path = Path(path)
    if (path / "meta.json").exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a matrix (meta.json); pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").unlink(missing_ok=True)
    if n_cols is None and (sp.issparse(X_or_chunks) or isinstance(X_or_chunks, np.ndarray)):
        n_cols = X_or_chunks.shape[1]
    index_dtype = np.int64 if n_cols is not None and n_cols > _INT32_MAX else np.int32
    data_w: _NpyAppender | None = None
    indices_w = _NpyAppender(path / "indices.npy", index_dtype)
    row_nnz: list[np.ndarray] = []
    try:
        for chunk in _as_row_chunks(X_or_chunks, chunk_rows):
            chunk = sp.csr_matrix(chunk)  # no copy for CSR input
            if n_cols is None:
                n_cols = chunk.shape[1]
            if chunk.shape[1] != n_cols:
                raise ValueError(f"chunk has {chunk.shape[1]} columns; expected n_cols={n_cols}")
            if not chunk.has_canonical_format:
                chunk = chunk.copy()
                chunk.sum_duplicates()
            if data_w is None:
                data_w = _NpyAppender(path / "data.npy", chunk.dtype if dtype is None else dtype)
            if not np.can_cast(chunk.dtype, data_w.dtype, "same_kind"):
                raise TypeError(
                    f"chunk dtype {chunk.dtype} cannot be written as {data_w.dtype} (same_kind)"
                )
            data_w.append(chunk.data)
            indices_w.append(chunk.indices)
            row_nnz.append(np.diff(chunk.indptr).astype(np.int64))
        if data_w is None:  # no chunks: an empty matrix
            data_w = _NpyAppender(path / "data.npy", np.float32 if dtype is None else dtype)
        if n_cols is None:
            raise ValueError("n_cols is needed when no chunk is given")
        data_w.finish()
        indices_w.finish()
    except BaseException:
        for w in (data_w, indices_w):
            if w is not None:
                w.abort()
        raise
    indptr = np.zeros(sum(len(r) for r in row_nnz) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(row_nnz) if row_nnz else np.zeros(0, np.int64), out=indptr[1:])
    nnz, n_rows = int(indptr[-1]), len(indptr) - 1
    if max(nnz, n_rows, n_cols) > _INT32_MAX and index_dtype == np.int32:
        _widen_indices(path / "indices.npy", nnz)
        index_dtype = np.int64
    np.save(path / "indptr.npy", indptr.astype(index_dtype), allow_pickle=False)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "shape": [n_rows, int(n_cols)],
        "nnz": nnz,
        "dtype": np.dtype(data_w.dtype).str,
        "index_dtype": np.dtype(index_dtype).str,
    }
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path / "meta.json")
    return path


def _widen_indices(file: Path, nnz: int, chunk: int = 1 << 24) -> None:
    """Rewrite an int32 ``indices.npy`` as int64, in chunks (for > 2^31 non-zeros)."""
    src = np.load(file, mmap_mode="r", allow_pickle=False)
    wide = _NpyAppender(file.with_suffix(".wide"), np.int64)
    for s in range(0, nnz, chunk):
        wide.append(src[s : s + chunk])
    wide.finish()
    del src
    file.with_suffix(".wide").replace(file)


def read_mmap_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a memory-mapped CSR directory (checked for format and version)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(
            f"{path} holds no complete memory-mapped matrix (no meta.json); "
            "write one with write_mmap_csr / h5ad_to_mmap / simulate_to_mmap"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r} v{meta.get('version')}")
    return meta


def open_mmap_csr(path: str | os.PathLike) -> sp.csr_matrix:
    """Open a matrix written by :func:`write_mmap_csr` as a ``csr_matrix`` over read-only memmaps.

    Nothing is read up front: ``data`` and ``indices`` stay on disk (``np.load(...,
    mmap_mode="r", allow_pickle=False)``) and pages come in as rows are used. Row slices
    (``X[idx]``, ``X[a:b]``) return ordinary in-memory CSR matrices.
    """
    path = Path(path)
    meta = read_mmap_meta(path)
    n_rows, n_cols = (int(v) for v in meta["shape"])
    arrays = {}
    for name in ARRAYS:
        arr = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if arr.ndim != 1:
            raise ValueError(f"{path / name}.npy is not 1-D")
        arrays[name] = arr
    nnz = int(meta["nnz"])
    if len(arrays["indptr"]) != n_rows + 1 or len(arrays["data"]) != nnz:
        raise ValueError(f"{path}: array lengths disagree with meta.json {meta}")
    if len(arrays["indices"]) != nnz or int(arrays["indptr"][-1]) != nnz:
        raise ValueError(f"{path}: indices / indptr disagree with meta.json {meta}")
    X = sp.csr_matrix(
        (arrays["data"], arrays["indices"], arrays["indptr"]), shape=(n_rows, n_cols), copy=False
    )
    if nnz and not (
        np.shares_memory(X.data, arrays["data"]) and np.shares_memory(X.indices, arrays["indices"])
    ):  # pragma: no cover - depends on scipy internals
        raise RuntimeError(f"scipy copied the memory-mapped arrays of {path} into memory")
    # written canonical (sorted, no duplicates): say so, so scipy never tries to sort in place
    X.has_sorted_indices = True
    X.has_canonical_format = True
    return X


def csr_nbytes(path: str | os.PathLike) -> int:
    """Bytes of the matrix on disk: ``data`` + ``indices`` + ``indptr`` files."""
    return sum(os.path.getsize(Path(path) / f"{name}.npy") for name in ARRAYS)


def is_mmap_backed(X: Any) -> bool:
    """Whether ``X`` is a CSR matrix whose values are memory-mapped (e.g. from open_mmap_csr)."""
    if not sp.issparse(X):
        return isinstance(X, np.memmap)
    data = getattr(X, "data", None)
    while data is not None:
        if isinstance(data, np.memmap):
            return True
        data = getattr(data, "base", None)
    return False


def _annotations_to_csv(frame: pd.DataFrame, file: Path) -> None:
    frame.to_csv(file, index=True, index_label="_index")


def _annotations_from_csv(file: Path) -> pd.DataFrame:
    frame = pd.read_csv(file, index_col="_index", dtype={"_index": str})
    frame.index = frame.index.astype(str)
    frame.index.name = None
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = pd.Categorical(frame[col])
    return frame


def open_mmap_anndata(path: str | os.PathLike) -> AnnData:
    """AnnData with the memory-mapped matrix at ``path`` as ``X``.

    ``obs`` / ``var`` come from ``obs.csv`` / ``var.csv`` when present (text columns become
    categorical), otherwise numbered names; ``uns["truth"]`` from ``truth.npz`` when present.
    """
    path = Path(path)
    X = open_mmap_csr(path)
    obs = (
        _annotations_from_csv(path / "obs.csv")
        if (path / "obs.csv").exists()
        else pd.DataFrame(index=[f"cell_{i}" for i in range(X.shape[0])])
    )
    var = (
        _annotations_from_csv(path / "var.csv")
        if (path / "var.csv").exists()
        else pd.DataFrame(index=[f"gene_{g}" for g in range(X.shape[1])])
    )
    adata = AnnData(X=X, obs=obs, var=var)
    if (path / "truth.npz").exists():
        with np.load(path / "truth.npz", allow_pickle=False) as truth:
            adata.uns["truth"] = {k: truth[k] for k in truth.files}
    return adata


def _read_elem(group: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(group)


def h5ad_to_mmap(
    h5ad_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    layer: str | None = None,
    chunk_rows: int = 100_000,
    overwrite: bool = False,
) -> AnnData:
    """Convert the counts of an ``.h5ad`` file to a memory-mapped CSR, reading row chunks.

    The file is read with h5py, ``chunk_rows`` rows at a time (CSR or dense ``X`` /
    ``layers[layer]``), so the matrix is never in memory at once.

    Parameters
    ----------
    h5ad_path
        Input file (CSR or dense counts; CSC cannot be read by rows).
    out_dir
        Output directory for :func:`write_mmap_csr`.
    layer
        Layer with the counts (default ``X``).
    chunk_rows
        Rows read per chunk.
    overwrite
        Replace an existing matrix in ``out_dir``.

    Returns
    -------
    AnnData
        ``X`` = the memory-mapped counts, ``obs`` / ``var`` read from the file (other fields
        are not read). The same object later: ``AnnData(X=open_mmap_csr(out_dir), obs=...,
        var=...)``.
    """
    import h5py

    with h5py.File(h5ad_path, "r") as f:
        if layer is None:
            elem, where = f["X"], "X"
        else:
            if "layers" not in f or layer not in f["layers"]:
                raise KeyError(f"layer={layer!r} is not in {h5ad_path}")
            elem, where = f["layers"][layer], f"layers/{layer}"
        encoding = elem.attrs.get("encoding-type", "array")
        if isinstance(encoding, bytes):
            encoding = encoding.decode()
        if isinstance(elem, h5py.Dataset):
            n_rows, n_cols = elem.shape
            chunks: Iterable[Any] = (
                sp.csr_matrix(elem[s : s + chunk_rows]) for s in range(0, n_rows, chunk_rows)
            )
        elif encoding == "csr_matrix":
            n_rows, n_cols = (int(v) for v in elem.attrs["shape"])
            indptr = elem["indptr"][:]
            chunks = _h5_csr_chunks(elem, indptr, n_rows, n_cols, chunk_rows)
        else:
            raise ValueError(
                f"{h5ad_path}:{where} is {encoding!r}; h5ad_to_mmap reads CSR or dense counts "
                "by rows (convert CSC to CSR first, e.g. in memory with X.tocsr())"
            )
        dtype = elem.dtype if isinstance(elem, h5py.Dataset) else elem["data"].dtype
        logger.info("converting %s:%s (%d × %d) to %s", h5ad_path, where, n_rows, n_cols, out_dir)
        write_mmap_csr(out_dir, chunks, n_cols, dtype=dtype, overwrite=overwrite)
        obs, var = _read_elem(f["obs"]), _read_elem(f["var"])
    return AnnData(X=open_mmap_csr(out_dir), obs=obs, var=var)


def _h5_csr_chunks(
    elem: Any, indptr: np.ndarray, n_rows: int, n_cols: int, chunk_rows: int
) -> Iterable[sp.csr_matrix]:
    for s in range(0, n_rows, chunk_rows):
        e = min(s + chunk_rows, n_rows)
        lo, hi = int(indptr[s]), int(indptr[e])
        yield sp.csr_matrix(
            (elem["data"][lo:hi], elem["indices"][lo:hi], indptr[s : e + 1] - lo),
            shape=(e - s, n_cols),
        )
