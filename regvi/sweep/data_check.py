"""Pre-flight check of a sweep's data: keys, layers and counts, read without loading the data.

``python -m regvi.sweep CONFIG --dry-run`` and every sweep (before Ray, MLflow or any folder)
run :func:`check_data_files`. Each ``.h5ad`` is opened with h5py; only ``obs`` and ``var`` are
read, the count matrix is inspected through its HDF5 metadata (layer present, encoding, shape,
dtype) plus its first :data:`SAMPLE_VALUES` stored values (negative, NaN/inf, non-integer), so
the check costs about the same on an atlas as on the bundled data. The covariate registry is
built from the real ``obs`` with the config's data keys, exactly as the model builds it, once
more for every value a searched covariate purpose may take (``search.<purpose_key>``), and for
multimodal data the modalities
are checked to hold the same cells. Marker files of the neighbourhood metrics are matched
against the genes.

The counts of the whole matrix are validated once more when a (non-dry) sweep reads the data
before Ray starts (:func:`regvi.sweep.runner.check_data`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from regvi.model import REGISTRY_ARGS
from regvi.sweep.config import BUNDLED_PREFIX, ConfigError, SweepConfig, decode_data_value
from regvi.sweep.trial_eval import counts_modality

#: Stored values of the count matrix whose values are checked (the first ones on disk).
SAMPLE_VALUES = 1_000_000
#: Data keys that name obs columns (every REGISTRY_ARGS entry but ``layer``).
COLUMN_KEYS = tuple(k for k in REGISTRY_ARGS if k != "layer")


@dataclass
class FileSummary:
    """What the check found in one ``.h5ad``."""

    path: str
    modality: str | None
    n_obs: int
    n_vars: int
    matrix: str  # "X" or "layers['counts']"
    encoding: str
    dtype: str
    n_checked: int  # stored values whose counts were checked

    def describe(self) -> str:
        """One line: file, shape, matrix."""
        mod = f"{self.modality}: " if self.modality else ""
        return (
            f"{mod}{self.path}: {self.n_obs} cells x {self.n_vars} features, counts in "
            f"{self.matrix} ({self.encoding}, {self.dtype}; first {self.n_checked} stored "
            "values checked)"
        )


@dataclass
class DataSummary:
    """Result of :func:`check_data_files`."""

    files: list[FileSummary]
    levels: dict[str, int] = field(default_factory=dict)  # obs key → categories
    n_markers: int | None = None

    def describe(self) -> str:
        """Human-readable summary (for ``--dry-run``)."""
        lines = [f"  {f.describe()}" for f in self.files]
        if self.levels:
            keys = ", ".join(f"{k} ({n} levels)" for k, n in sorted(self.levels.items()))
            lines.append(f"  obs keys: {keys}")
        if self.n_markers is not None:
            lines.append(f"  marker genes found: {self.n_markers}")
        return "\n".join(lines)


def _read_elem(node: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # pragma: no cover - anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=0.5)
    return f"closest: {close}; " if close else ""


def _file_path(cfg: SweepConfig) -> dict[str | None, tuple[str, str]]:
    """Modality (``None``: single) → (config key, file path)."""
    if cfg.multimodal:
        return {m: (f"data.modalities.{m}", p) for m, p in sorted(cfg.data["modalities"].items())}
    path = str(cfg.data["path"])
    if path.startswith(BUNDLED_PREFIX):
        from importlib import resources

        from regvi.datasets import KANG_SMALL

        path = str(resources.files("regvi.datasets") / KANG_SMALL)
    return {None: ("data.path", path)}


def _per_modality(cfg: SweepConfig, key: str, modality: str | None) -> Any:
    value = cfg.data.get(key)
    if isinstance(value, dict):
        if modality is None:
            raise ConfigError(
                f"data.{key}: {value!r}; a per-modality mapping needs data.modalities"
            )
        bad = sorted(set(value) - set(cfg.data["modalities"]))
        if bad:
            raise ConfigError(
                f"data.{key}: unknown modalities {bad}; data.modalities: "
                f"{sorted(cfg.data['modalities'])}"
            )
        return value.get(modality)
    return value


def _sparse_layout(node: Any) -> tuple[str, tuple[int, int]] | None:
    """(encoding, shape) of a sparse matrix group (current and legacy h5ad), else None."""
    enc = node.attrs.get("encoding-type")
    if isinstance(enc, bytes):
        enc = enc.decode()
    legacy = node.attrs.get("h5sparse_format")
    if enc is None and legacy is not None:
        legacy = legacy.decode() if isinstance(legacy, bytes) else legacy
        enc = f"{legacy}_matrix"
    shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
    if enc in ("csr_matrix", "csc_matrix") and shape is not None and "data" in node:
        return enc, (int(shape[0]), int(shape[1]))
    return None


def _check_matrix(
    f: Any, path: str, layer: Any, allow_non_integer: bool, n_obs: int, n_vars: int
) -> tuple[str, str, str, int]:
    """Layer present, shape, dtype and the first stored values of the count matrix."""
    import h5py

    if layer is not None and not isinstance(layer, str):
        raise ConfigError(f"data.layer: {layer!r}; expected a layer name")
    layers = sorted(f["layers"].keys()) if "layers" in f else []
    if layer is None:
        if "X" not in f:
            raise ConfigError(
                f"data.layer: {path} has no X matrix; set data.layer to the layer with raw "
                f"counts (layers: {layers})"
            )
        node, where = f["X"], "X"
    else:
        if layer not in layers:
            raise ConfigError(
                f"data.layer: {layer!r} is not a layer of {path}; {_closest(layer, layers)}"
                f"available layers: {layers}"
            )
        node, where = f["layers"][layer], f"layers[{layer!r}]"
    if isinstance(node, h5py.Dataset):
        encoding, shape, values = "dense", tuple(int(s) for s in node.shape), node
    else:
        layout = _sparse_layout(node)
        if layout is None:  # another encoding: leave it to the full check of the sweep
            return where, str(node.attrs.get("encoding-type", "unknown")), "unknown", 0
        (encoding, shape), values = layout, node["data"]
    if shape != (n_obs, n_vars):
        raise ConfigError(
            f"data: {path} {where} has shape {shape} but obs x var is ({n_obs}, {n_vars})"
        )
    if n_obs == 0 or n_vars == 0:
        raise ConfigError(
            f"data: {path} {where} has shape {shape}; expected at least one cell and one feature"
        )
    dtype = values.dtype
    if dtype.kind not in "uif":
        raise ConfigError(f"data: {path} {where} has dtype {dtype}; expected numeric raw counts")
    if encoding == "dense":
        rows = max(1, min(n_obs, SAMPLE_VALUES // max(n_vars, 1)))
        sample = np.asarray(values[:rows], dtype=np.float64).ravel()
    else:
        sample = np.asarray(values[:SAMPLE_VALUES], dtype=np.float64)
    where_cfg = "data.layer" if layer is not None else "data (counts in X)"
    first = f"in its first {sample.size} stored values"
    n_bad = int(np.count_nonzero(~np.isfinite(sample)))
    if n_bad:
        raise ConfigError(f"{where_cfg}: {path} {where} has NaN/inf values {first}")
    n_neg = int(np.count_nonzero(sample < 0))
    if n_neg:
        raise ConfigError(
            f"{where_cfg}: {path} {where} has negative values (min {sample.min():g}) {first}; "
            f"regvi needs raw counts (layers: {layers})"
        )
    if not allow_non_integer and dtype.kind == "f":
        frac = sample[sample != np.floor(sample)]
        if frac.size:
            raise ConfigError(
                f"{where_cfg}: {path} {where} has non-integer values (e.g. {frac[0]:g}) {first}; "
                f"regvi needs raw counts: set data.layer to the counts layer (layers: {layers}) "
                "or data.allow_non_integer: true"
            )
    return where, encoding, str(dtype), int(sample.size)


def _read_annotations(f: Any, path: str) -> tuple[Any, Any]:
    """obs and var of an open h5ad; files ``read_elem`` cannot decode (older layouts) are read
    by anndata in backed mode, which leaves the matrix on disk."""
    try:
        return _read_elem(f["obs"]), _read_elem(f["var"])
    except Exception:  # any layout read_elem does not know
        import anndata as ad

        backed = ad.read_h5ad(path, backed="r")
        try:
            return backed.obs.copy(), backed.var.copy()
        finally:
            backed.file.close()


def _read_file(
    cfg: SweepConfig, modality: str | None, key: str, path: str
) -> tuple[FileSummary, Any]:
    """obs + var of one file (as an AnnData without X) and its matrix checked."""
    import h5py
    from anndata import AnnData

    try:
        with h5py.File(path, "r") as f:
            missing = [g for g in ("obs", "var") if g not in f]
            if missing:
                raise ConfigError(f"{key}: {path} is not an AnnData file (no {missing})")
            obs, var = _read_annotations(f, path)
            allow = _per_modality(cfg, "allow_non_integer", modality)
            matrix = _check_matrix(
                f,
                path,
                _per_modality(cfg, "layer", modality),
                bool(allow),
                len(obs),
                len(var),
            )
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{key}: cannot read {path}: {err}") from None
    summary = FileSummary(path, modality, len(obs), len(var), *matrix)
    return summary, AnnData(obs=obs, var=var)


def _check_columns(cfg: SweepConfig, columns: dict[str, set[str]], where: str) -> None:
    """Every data key names an existing obs column (``columns``: file → its obs columns)."""
    available = sorted(set().union(*columns.values()))
    for key in COLUMN_KEYS:
        value = cfg.data.get(key)
        for col in _as_list(value):
            if not isinstance(col, str):
                raise ConfigError(f"data.{key}: {value!r}; expected obs column name(s)")
            if not any(col in cols for cols in columns.values()):
                shown = available if len(available) <= 30 else [*available[:30], "..."]
                raise ConfigError(
                    f"data.{key}: {col!r} is not an obs column of {where}; "
                    f"{_closest(col, available)}obs columns: {shown}"
                )


def _check_markers(cfg: SweepConfig, var_names: list[str], path: str) -> int | None:
    """Marker genes of the neighbourhood metrics found in the counts' genes (``None``: none
    given, or data-driven markers)."""
    ev = cfg.evaluation
    markers = ev.get("markers")
    if ev.get("neighbourhood", True) is False or markers in (None, "data"):
        return None
    if isinstance(markers, str):
        from evaluation.markers import load_marker_csv

        try:
            found = load_marker_csv(markers, var_names)
        except (OSError, ValueError) as err:
            raise ConfigError(f"evaluation.markers: {err}") from None
        source = markers
    else:
        present = set(var_names)
        found = [g for g in _as_list(markers) if g in present]
        source = "the list"
    if len(found) < 2:
        raise ConfigError(
            f"evaluation.markers: {len(found)} of the genes in {source} are in the var_names of "
            f"{path}; the neighbourhood metrics need at least 2 (they would be skipped)"
        )
    return len(found)


def check_data_files(cfg: SweepConfig) -> DataSummary:
    """Check the data of ``cfg`` without loading it; raise :class:`ConfigError` naming the key,
    the file and the value.

    Checks: the file(s) open; the count matrix (``X`` or ``data.layer``) exists, matches obs x
    var, is numeric, and its first :data:`SAMPLE_VALUES` stored values are finite,
    non-negative and (unless ``data.allow_non_integer``) integers; every data key is an obs
    column; the covariate registry builds (no NaN in a key, each library in one dataset, no
    conflicting purpose keys); multimodal files hold the same cells in the same order;
    marker files name at least two of the genes. Messages start with
    ``data check (<config file>):``.
    """
    try:
        return _check(cfg)
    except ConfigError as err:
        raise ConfigError(f"data check ({cfg.config_path or 'config'}): {err}") from None


def _check_keys(cfg: SweepConfig, files: dict, adatas: dict, where: str) -> Any:
    """Every data key is an obs column and the covariate registry builds from ``obs``."""
    from regvi.data.registry import CovariateRegistry

    _check_columns(cfg, {p: set(adatas[m].obs.columns) for m, (_, p) in files.items()}, where)
    registry_kwargs = {k: cfg.data[k] for k in COLUMN_KEYS if k in cfg.data}
    try:
        if cfg.multimodal:
            from anndata import AnnData

            from regvi.multimodal import select_modalities, shared_obs

            mods = select_modalities(adatas, None)
            keys = sorted({c for k in COLUMN_KEYS for c in _as_list(cfg.data.get(k))})
            obs = shared_obs(mods, mods, keys)
            return CovariateRegistry.from_anndata(AnnData(obs=obs), **registry_kwargs)
        layer = cfg.data.get("layer")
        return CovariateRegistry.from_anndata(adatas[None], **registry_kwargs, layer=layer)
    except (KeyError, TypeError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"data ({where}): {msg}") from None


def _check(cfg: SweepConfig) -> DataSummary:
    files = _file_path(cfg)
    summaries, adatas = [], {}
    for modality, (key, path) in files.items():
        summary, adata = _read_file(cfg, modality, key, path)
        summaries.append(summary)
        adatas[modality] = adata
    where = " or ".join(f"{m + ': ' if m else ''}{p}" for m, (_, p) in files.items())
    registry = _check_keys(cfg, files, adatas, where)
    # every value a searched covariate purpose may take, as if fixed under data
    for p in cfg.params:
        if p.target != "data":
            continue
        for i, value in enumerate(p.values or []):
            data = {k: v for k, v in cfg.data.items() if k != p.name}
            decoded = decode_data_value(value)
            if decoded is not None:
                data[p.name] = decoded
            try:
                _check_keys(replace(cfg, data=data), files, adatas, where)
            except ConfigError as err:
                raise ConfigError(f"search.{p.name}.values[{i}] = {decoded!r}: {err}") from None
    levels = {k: len(v) for k, v in registry.categories.items()}
    if cfg.multimodal:
        counted = counts_modality(cfg.data)
    else:
        counted = None
    var_names = [str(v) for v in adatas[counted].var_names]
    n_markers = _check_markers(cfg, var_names, files[counted][1])
    return DataSummary(summaries, levels, n_markers)
