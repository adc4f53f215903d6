"""Read the parts of R data files (``.rda``) the Kang recipes need, in pure Python.

The files are parsed with the ``rdata`` package's low-level parser
(:func:`rdata.parser.parse_file`, R's XDR serialisation format, any compression), which turns
every R object, S4 objects and environments included, into a tree of ``RObject`` nodes. This
module walks that tree the way the R calls in the data README's ``make_datasets.py`` did
(``attr(x, "slot")``, ``x$name``, ``rownames``, ``as.character`` of a factor), without
converting whole objects: the high-level ``rdata.conversion`` does not know Seurat or
SingleCellExperiment classes.

``rdata`` is an optional dependency (``pip install 'regvi[datasets]'``); :func:`require`
raises a clear error when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

#: how to install the optional dependencies of the dataset recipes (one definition)
INSTALL_HINT = "pip install 'regvi[datasets]'"


class MissingDependency(ImportError):
    """An optional dependency of a dataset recipe is not installed."""


def require() -> Any:
    """The ``rdata`` module; :class:`MissingDependency` naming the install command without it."""
    try:
        import rdata.parser
    except ImportError as err:
        raise MissingDependency(
            "reading the R data files (.rda) of this dataset's sources needs the optional "
            f"package 'rdata'; install it with `{INSTALL_HINT}`"
        ) from err
    return rdata


def _types():
    return require().parser.RObjectType


class RObjectError(ValueError):
    """An R object is not of the expected shape."""


def load(path: str | Path) -> dict[str, Any]:
    """The named top-level objects of an ``.rda`` file (``load()`` in R), as raw ``RObject``s."""
    rdata = require()
    parsed = rdata.parser.parse_file(Path(path), extension=".rda")
    return pairlist(parsed.object)


def deref(obj: Any) -> Any:
    """Follow a serialisation back-reference (REFSXP) to the object it names."""
    while obj is not None and obj.info.type == _types().REF:
        obj = obj.referenced_object
    return obj


def _symbol_name(tag: Any) -> str | None:
    tag = deref(tag)
    if tag is None or tag.info.type != _types().SYM:
        return None
    return deref(tag.value).value.decode()


def pairlist(obj: Any) -> dict[str, Any]:
    """A tagged pairlist (LISTSXP chain: attributes, an environment's frame) as name → value."""
    T = _types()
    out: dict[str, Any] = {}
    obj = deref(obj)
    while obj is not None and obj.info.type == T.LIST:
        out[_symbol_name(obj.tag)] = obj.value[0]
        obj = deref(obj.value[1])
    return out


def attributes(obj: Any) -> dict[str, Any]:
    """``attributes(x)``: name → value (S4 slots are attributes)."""
    obj = deref(obj)
    return pairlist(obj.attributes) if obj.attributes is not None else {}


def attr(obj: Any, name: str) -> Any:
    """``attr(x, name)``; :class:`RObjectError` when ``x`` has no such attribute / slot."""
    attrs = attributes(obj)
    if name not in attrs:
        raise RObjectError(f"R object has no attribute {name!r} (it has {sorted(attrs)})")
    return deref(attrs[name])


def is_null(obj: Any) -> bool:
    """``is.null(x)`` (NILVALUE, or the ``\\001NULL\\001`` symbol S4 uses for a NULL slot)."""
    T = _types()
    obj = deref(obj)
    if obj is None or obj.info.type in (T.NILVALUE, T.NIL):
        return True
    return obj.info.type == T.SYM and _symbol_name(obj) == "\x01NULL\x01"


def class_of(obj: Any) -> list[str]:
    """The ``class`` attribute (empty for an object without one)."""
    attrs = attributes(obj)
    return strings(attrs["class"]) if "class" in attrs else []


def strings(obj: Any) -> list[str | None]:
    """A character vector (STRSXP) as str, ``None`` for ``NA``."""
    T = _types()
    obj = deref(obj)
    if obj.info.type != T.STR:
        raise RObjectError(f"expected a character vector, got {obj.info.type.name}")
    return [None if c.value is None else c.value.decode("utf-8") for c in map(deref, obj.value)]


def numbers(obj: Any) -> np.ndarray:
    """An integer / double / logical vector as a numpy array (integer ``NA`` becomes a masked
    value: use :func:`numpy.ma.getmaskarray` to find them)."""
    T = _types()
    obj = deref(obj)
    if obj.info.type not in (T.INT, T.REAL, T.LGL):
        raise RObjectError(f"expected a numeric vector, got {obj.info.type.name}")
    return obj.value


def as_character(obj: Any) -> list[str | None]:
    """``as.character(x)`` for a character vector or a factor (``NA`` → ``None``)."""
    T = _types()
    obj = deref(obj)
    if obj.info.type == T.STR:
        return strings(obj)
    if obj.info.type == T.INT and "factor" in class_of(obj):
        levels = strings(attr(obj, "levels"))
        codes = numbers(obj)
        na = np.ma.getmaskarray(codes)
        values = np.ma.getdata(codes)
        return [None if m else levels[int(c) - 1] for c, m in zip(values, na, strict=True)]
    raise RObjectError(f"expected a character vector or a factor, got {obj.info.type.name}")


def named_list(obj: Any) -> dict[str, Any]:
    """A named list (VECSXP with ``names``), name → element."""
    T = _types()
    obj = deref(obj)
    if obj.info.type != T.VEC:
        raise RObjectError(f"expected a list, got {obj.info.type.name}")
    names = strings(attr(obj, "names")) if obj.value else []
    return dict(zip(names, (deref(v) for v in obj.value), strict=True))


def row_names(obj: Any) -> list[str]:
    """``rownames(df)`` of a data.frame (character, or R's compact ``c(NA, -n)`` form)."""
    T = _types()
    rn = attr(obj, "row.names")
    if rn.info.type == T.STR:
        return strings(rn)
    values = np.ma.getdata(numbers(rn))
    if len(values) == 2 and np.ma.getmaskarray(numbers(rn))[0]:
        return [str(i + 1) for i in range(abs(int(values[1])))]
    return [str(int(v)) for v in values]


def env_get(env: Any, name: str) -> Any:
    """``get(name, envir=env)`` within the environment itself (its frame and hash table);
    an S4 object that wraps an environment (``.xData``, e.g. a reference class) is unwrapped.
    A reference-class field with a declared class lives in ``.->name``; it is found too."""
    T = _types()
    env = deref(env)
    if env.info.type == T.S4:
        env = attr(env, ".xData")
    if env.info.type != T.ENV:
        raise RObjectError(f"expected an environment, got {env.info.type.name}")
    bindings = dict(pairlist(env.value.frame))
    table = deref(env.value.hash_table)
    if table is not None and table.info.type == T.VEC:
        for bucket in table.value:
            bindings.update(pairlist(bucket))
    for key in (f".->{name}", name):
        if key in bindings and deref(bindings[key]).info.type != T.CLO:
            return deref(bindings[key])
    raise RObjectError(f"environment has no binding {name!r} (it has {sorted(bindings)})")


def _dimnames(obj: Any, name: str) -> tuple[list[str] | None, list[str] | None]:
    attrs = attributes(obj)
    if name not in attrs or is_null(attrs[name]):
        return None, None
    rows, cols = (None if is_null(d) else strings(d) for d in deref(attrs[name]).value)
    return rows, cols


def matrix(obj: Any) -> tuple[sp.csc_matrix, list[str] | None, list[str] | None]:
    """A numeric matrix as (scipy CSC, rownames, colnames): a base R matrix (a vector with a
    ``dim`` attribute, column-major) or a Matrix ``dgCMatrix`` (``as(Matrix(m, sparse=TRUE),
    "CsparseMatrix")`` in R gives the same)."""
    T = _types()
    obj = deref(obj)
    if obj.info.type in (T.INT, T.REAL, T.LGL) and "dim" in attributes(obj):
        dim = [int(d) for d in np.ma.getdata(numbers(attr(obj, "dim")))]
        if len(dim) != 2:
            raise RObjectError(f"expected a 2-d matrix, got dim {dim}")
        values = numbers(obj)
        if np.ma.getmaskarray(values).any():
            raise RObjectError("the matrix has NA values")
        dense = np.asarray(np.ma.getdata(values), dtype=np.float64).reshape(dim, order="F")
        return (sp.csc_matrix(dense), *_dimnames(obj, "dimnames"))
    if "dgCMatrix" in class_of(obj):
        return dgcmatrix(obj)
    raise RObjectError(
        f"expected a numeric matrix or a dgCMatrix, got {obj.info.type.name} {class_of(obj)}"
    )


def dgcmatrix(obj: Any) -> tuple[sp.csc_matrix, list[str] | None, list[str] | None]:
    """A Matrix ``dgCMatrix`` (compressed sparse column, double) as (scipy CSC, rownames,
    colnames)."""
    if "dgCMatrix" not in class_of(obj):
        raise RObjectError(f"expected a dgCMatrix, got class {class_of(obj)}")
    dim = [int(d) for d in np.ma.getdata(numbers(attr(obj, "Dim")))]
    m = sp.csc_matrix(
        (
            np.asarray(numbers(attr(obj, "x")), dtype=np.float64),
            np.asarray(np.ma.getdata(numbers(attr(obj, "i"))), dtype=np.int64),
            np.asarray(np.ma.getdata(numbers(attr(obj, "p"))), dtype=np.int64),
        ),
        shape=tuple(dim),
    )
    return (m, *_dimnames(obj, "Dimnames"))
