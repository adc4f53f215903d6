"""Orchestration: one call scores an embedding in an AnnData and writes tables and plots.

Metrics are plain functions (``evaluation.scib``, ``evaluation.neighbourhood``,
``evaluation.robustness``); this module only prepares the shared pieces (subsample, kNN,
reference PCA, markers) and collects a flat metrics dict.

Flat metric names
-----------------
``scib_<metric>``, ``scib_bio``, ``scib_batch``, ``scib_total``
    scib-metrics values, unscaled (see :mod:`evaluation.scib`).
``nc_<headline>``
    Neighbourhood-correlation headline numbers and composite (see
    :mod:`evaluation.neighbourhood`); ``nc_random_<headline>`` for the random-graph baseline.
``lowcount_q<q>_<metric>``
    Low-count robustness (see :mod:`evaluation.robustness`).
``eval_n_cells``, ``eval_n_markers``, ``eval_seconds_<stage>``
    Bookkeeping.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from evaluation.knn import compute_neighbours
from evaluation.reference import unintegrated_pca
from evaluation.scib import KMEANS_STARTS, check_kmeans_starts
from evaluation.subsample import stratified_subsample


@dataclass
class Evaluation:
    """Result of :func:`evaluate`.

    ``per_cell`` has one row per evaluated cell, in the order of ``indices`` (positions of the
    evaluated cells in the AnnData); rows are aligned by position, so duplicated obs_names are
    kept as they are, never joined on."""

    metrics: dict[str, float]
    per_cell: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    indices: np.ndarray | None = None


def counts_matrix(adata: AnnData, layer: str | None) -> sp.csr_matrix | np.ndarray:
    """Raw counts of ``adata`` (``X`` or ``layer``) as CSR or a dense array."""
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"layer={layer!r} not in adata.layers ({sorted(adata.layers)})")
    X = adata.X if layer is None else adata.layers[layer]
    return sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)


def check_inputs(
    adata: AnnData,
    embedding_key: str,
    library_key: str,
    label_key: str | None,
    dataset_key: str | None,
    technical_keys: Sequence[str],
    markers: str | Path | Sequence[str] | None,
    neighbourhood: bool = True,
) -> None:
    """Refuse bad input before any work: names the missing key / file and what exists.

    With ``neighbourhood``, a curated marker file or gene list must have at least
    :data:`~evaluation.markers.MIN_MARKERS` genes in ``adata.var_names`` (else ``ValueError``
    naming the source and how many of how many genes were found), and ``markers="data"`` needs
    ``label_key``: the ``nc_*`` metrics are never silently left out."""
    if embedding_key not in adata.obsm:
        raise KeyError(f"embedding {embedding_key!r} not in adata.obsm (have {list(adata.obsm)})")
    emb = np.asarray(adata.obsm[embedding_key])
    if emb.ndim != 2 or emb.shape[0] != adata.n_obs:
        raise ValueError(
            f"adata.obsm[{embedding_key!r}] has shape {emb.shape}; expected (n_obs, d)"
        )
    if not np.isfinite(emb).all():
        raise ValueError(f"adata.obsm[{embedding_key!r}] contains NaN/inf")
    for role, key in [
        ("library_key", library_key),
        ("label_key", label_key),
        ("dataset_key", dataset_key),
    ] + [("technical key", k) for k in technical_keys]:
        if key is None:
            continue
        if key not in adata.obs.columns:
            raise KeyError(f"{role} {key!r} not in adata.obs (columns: {list(adata.obs.columns)})")
        n_nan = int(adata.obs[key].isna().sum())
        if n_nan:
            raise ValueError(f"{role} {key!r} has {n_nan} missing values")
    if isinstance(markers, str | Path) and str(markers) != "data" and not Path(markers).is_file():
        raise FileNotFoundError(f"marker file {markers} does not exist")
    if not neighbourhood or markers is None:
        return
    if isinstance(markers, str) and markers == "data":
        if label_key is None:
            raise ValueError("markers='data' (data-driven markers) needs label_key")
        return
    from evaluation.markers import present_marker_genes

    present_marker_genes(markers, [str(v) for v in adata.var_names])


def evaluate(
    adata: AnnData,
    embedding_key: str,
    library_key: str,
    label_key: str | None = None,
    dataset_key: str | None = None,
    technical_keys: Sequence[str] = (),
    layer: str | None = None,
    markers: str | Path | Sequence[str] | None = None,
    n_subsample: int | None = 20_000,
    seed: int = 0,
    scib: bool = True,
    neighbourhood: bool = True,
    encode: Callable[[sp.csr_matrix, np.ndarray], np.ndarray] | None = None,
    reference_cache: str | Path | None = None,
    n_jobs: int = 1,
    kmeans_starts: int = KMEANS_STARTS,
) -> Evaluation:
    """Score ``adata.obsm[embedding_key]`` on a fixed stratified subsample.

    Parameters
    ----------
    adata
        Cells with raw counts (``X`` or ``layer``), the embedding and obs keys.
    embedding_key
        obsm key of the embedding (from regvi, scVI, PCA, anything).
    library_key
        Batch key for scib and the library level of the neighbourhood metrics.
    label_key
        Cell labels: needed for scib, data-driven markers and the label-majority metric.
    dataset_key, technical_keys
        Optional higher levels for the neighbourhood metrics.
    layer
        Layer with raw counts (default ``X``).
    markers
        Curated marker CSV path, a list of gene names, ``"data"`` (data-driven from
        ``label_key``) or ``None`` (data-driven when labels exist, else skipped and recorded in
        ``info["neighbourhood_skipped"]``). With ``neighbourhood``, fewer than 2 marker genes in
        the data is a ``ValueError`` raised before the kNN graph is built (a curated file or
        list: before any work).
    n_subsample
        Evaluation subsample size (label × library strata, seeded); ``None`` = all cells.
    seed
        Seed for the subsample and baselines.
    scib, neighbourhood
        Switch metric families.
    encode
        ``encode(counts_csr, subsample_indices) -> embedding`` re-encodes thinned counts for the
        low-count robustness metrics (e.g. a trained model's latent); skipped when ``None``.
    reference_cache
        Folder caching the unintegrated PCA per dataset.
    n_jobs
        Parallel jobs for scib-metrics.
    kmeans_starts
        KMeans starts averaged by ``scib_bio_stable`` / ``scib_total_stable`` (see
        :mod:`evaluation.scib`).
    """
    technical_keys = list(technical_keys)
    check_kmeans_starts(kmeans_starts)
    check_inputs(
        adata,
        embedding_key,
        library_key,
        label_key,
        dataset_key,
        technical_keys,
        markers,
        neighbourhood,
    )
    _warn_duplicated_names(adata.obs_names)
    run = _Scoring.subsample(adata, embedding_key, library_key, label_key, layer, n_subsample, seed)
    run.neighbours(adata, markers, neighbourhood)
    if scib and run.labels is not None:
        run.scib(reference_cache, n_jobs, kmeans_starts)
    elif scib:
        run.info["scib_skipped"] = "no label_key"
    if neighbourhood:
        run.neighbourhood(adata, dataset_key, technical_keys)
    if encode is not None:
        run.low_count(encode)
    return run.result()


@dataclass
class _Scoring:
    """One :func:`evaluate` call: the evaluated subsample and the results so far."""

    idx: np.ndarray
    obs: pd.DataFrame
    emb: np.ndarray
    counts: sp.csr_matrix | np.ndarray
    library: np.ndarray
    labels: np.ndarray | None
    label_key: str | None
    seed: int
    metrics: dict[str, float]
    info: dict[str, object]
    per_cell: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    genes: list[str] | None = None
    nb: object = None

    @classmethod
    def subsample(
        cls,
        adata: AnnData,
        embedding_key: str,
        library_key: str,
        label_key: str | None,
        layer: str | None,
        n_subsample: int | None,
        seed: int,
    ) -> _Scoring:
        """The stratified (label × library) subsample: its embedding, counts and keys."""
        started = time.perf_counter()
        strata = [k for k in (label_key, library_key) if k is not None]
        idx = stratified_subsample(adata.obs, strata, n_subsample, seed)
        obs = adata.obs.iloc[idx]
        return cls(
            idx=idx,
            obs=obs,
            emb=np.asarray(adata.obsm[embedding_key], dtype=np.float32)[idx],
            counts=counts_matrix(adata, layer)[idx],
            library=obs[library_key].astype(str).to_numpy(),
            labels=obs[label_key].astype(str).to_numpy() if label_key else None,
            label_key=label_key,
            seed=seed,
            metrics={"eval_n_cells": float(len(idx))},
            info={
                "embedding_key": embedding_key,
                "library_key": library_key,
                "label_key": label_key,
            },
            per_cell=pd.DataFrame(index=obs.index),
            started=started,
        )

    def neighbours(
        self, adata: AnnData, markers: str | Path | Sequence[str] | None, neighbourhood: bool
    ) -> None:
        """Marker genes (with ``neighbourhood``) and the kNN graph of the embedding."""
        if neighbourhood:
            self.genes = _marker_genes(adata, self.counts, self.labels, self.label_key, markers)
        self.nb = nb = compute_neighbours(self.emb, k=90, seed=self.seed)
        self.timings["knn"] = time.perf_counter() - self.started
        self.info["knn_method"] = nb.method

    def scib(self, reference_cache: str | Path | None, n_jobs: int, kmeans_starts: int) -> None:
        """scib-metrics against the unintegrated PCA."""
        from evaluation.scib import scib_metrics, scib_version

        t = time.perf_counter()
        reference = unintegrated_pca(self.counts, cache_dir=reference_cache, seed=self.seed)
        self.metrics.update(
            scib_metrics(
                self.emb,
                self.labels,
                self.library,
                reference,
                self.nb,
                n_jobs=n_jobs,
                kmeans_starts=kmeans_starts,
            )
        )
        self.info["scib_metrics_version"] = scib_version()
        self.timings["scib"] = time.perf_counter() - t

    def neighbourhood(
        self, adata: AnnData, dataset_key: str | None, technical_keys: Sequence[str]
    ) -> None:
        """Neighbourhood-correlation metrics (skipped, and recorded, without markers)."""
        t = time.perf_counter()
        nc = _neighbourhood(
            adata,
            self.counts,
            self.obs,
            self.nb,
            self.library,
            self.genes,
            dataset_key,
            technical_keys,
            self.seed,
        )
        if nc is not None:
            result, n_markers = nc
            self.metrics["eval_n_markers"] = float(n_markers)
            self.metrics.update({f"nc_{k}": float(v) for k, v in result.headline.items()})
            self.per_cell = _add_columns(self.per_cell, result.per_cell)
            self.tables.update({f"nc_summary_{k}": v for k, v in result.summaries.items()})
        else:
            self.info["neighbourhood_skipped"] = "no markers (give markers= or label_key)"
        self.timings["neighbourhood"] = time.perf_counter() - t

    def low_count(self, encode: Callable[[sp.csr_matrix, np.ndarray], np.ndarray]) -> None:
        """Low-count robustness: ``encode`` re-encodes thinned counts of the subsample."""
        from evaluation.robustness import low_count_robustness

        t = time.perf_counter()
        idx = self.idx
        self.metrics.update(
            low_count_robustness(
                lambda X: encode(X, idx), self.counts, self.emb, self.labels, seed=self.seed
            )
        )
        self.timings["lowcount"] = time.perf_counter() - t

    def result(self) -> Evaluation:
        """The :class:`Evaluation`, with the timings and a hash of the subsample."""
        self.metrics.update({f"eval_seconds_{k}": v for k, v in self.timings.items()})
        self.info["subsample_indices_sha"] = str(pd.util.hash_array(self.idx).sum())
        return Evaluation(
            self.metrics, self.per_cell, self.tables, self.info, self.emb, indices=self.idx
        )


def _evaluated_obs(ev: Evaluation, obs: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``obs`` (the evaluated AnnData's obs) that ``ev`` scored, by position."""
    if ev.indices is not None and len(obs) > int(np.max(ev.indices, initial=-1)):
        sub = obs.iloc[ev.indices]
        if sub.index.equals(ev.per_cell.index):
            return sub.copy()
    if not ev.per_cell.index.is_unique or not obs.index.is_unique:
        raise ValueError(
            "obs is not the obs of the evaluated AnnData and its names are not unique: cannot "
            "match the evaluated cells (call adata.obs_names_make_unique() first)"
        )
    return obs.loc[ev.per_cell.index].copy()


def _add_columns(per_cell: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``new``'s columns added to ``per_cell`` row by row (by position, not by name).

    A join on obs_names would multiply the rows of every duplicated name (common after
    concatenating libraries): k copies of a name become k² rows."""
    if len(new) != len(per_cell):
        raise ValueError(f"per-cell results have {len(new)} rows for {len(per_cell)} cells")
    out = per_cell.copy()
    for col in new.columns:
        out[col] = new[col].to_numpy()
    return out


def _warn_duplicated_names(obs_names: pd.Index) -> None:
    """Warn that per-cell rows repeat duplicated obs_names (results are aligned by position)."""
    dup = obs_names[obs_names.duplicated()].unique()
    if len(dup):
        shown = ", ".join(map(repr, dup[:5].tolist())) + (", ..." if len(dup) > 5 else "")
        warnings.warn(
            f"adata.obs_names has {len(dup)} duplicated name(s) ({shown}); cells are evaluated "
            "by position, but the per-cell table repeats those names. Call "
            "adata.obs_names_make_unique() to join per-cell results back by name.",
            UserWarning,
            stacklevel=3,
        )


def _marker_genes(adata, counts, labels, label_key, markers) -> list[str] | None:
    """Marker genes of the neighbourhood metrics (``None``: no markers and no labels, skipped).

    Raises ``ValueError`` when fewer than :data:`~evaluation.markers.MIN_MARKERS` are found."""
    from evaluation.markers import data_driven_markers, present_marker_genes, require_markers

    var_names = [str(v) for v in adata.var_names]
    if markers is None and labels is None:
        return None
    if markers is None or (isinstance(markers, str) and markers == "data"):
        if labels is None:
            raise ValueError("markers='data' (data-driven markers) needs label_key")
        return require_markers(
            data_driven_markers(counts, var_names, labels),
            None,
            f"data-driven markers from label_key {label_key!r} ({len(set(labels))} labels, "
            f"{len(labels)} subsampled cells; genes with a cluster mean > 1 count per 10k and "
            "specificity > 0.1)",
            hint="check that the counts are raw, or give a curated marker list (markers=CSV path "
            "or gene names), or neighbourhood=False",
        )
    return present_marker_genes(markers, var_names)


def _neighbourhood(adata, counts, obs, nb, library, genes, dataset_key, technical_keys, seed):
    from evaluation.markers import marker_indices
    from evaluation.neighbourhood import neighbourhood_metrics

    if genes is None:
        return None
    marker_idx = marker_indices(genes, [str(v) for v in adata.var_names])
    dataset = obs[dataset_key].astype(str).to_numpy() if dataset_key else None
    technical = {k: obs[k].astype(str).to_numpy() for k in technical_keys} or None
    result = neighbourhood_metrics(
        counts, nb.connectivities(50), marker_idx, library, dataset, technical, seed=seed
    )
    return result, len(genes)


def write_outputs(
    ev: Evaluation,
    obs: pd.DataFrame,
    out_dir: str | Path,
    keys: Sequence[str],
    umap: bool = True,
    coords: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write metrics (JSON + CSV), per-cell table, summaries and PNG plots to ``out_dir``.

    ``coords``: 2-d UMAP coordinates of ``ev.embedding`` when already computed."""
    from evaluation.plots import plot_correlation_histograms, plot_embedding, umap_2d

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    (out / "metrics.json").write_text(
        json.dumps({"metrics": ev.metrics, "info": ev.info}, indent=2, default=str)
    )
    paths["metrics_json"] = out / "metrics.json"
    pd.Series(ev.metrics, name="value").to_csv(out / "metrics.csv", index_label="metric")
    paths["metrics_csv"] = out / "metrics.csv"
    ev.per_cell.to_csv(out / "per_cell.csv")
    paths["per_cell"] = out / "per_cell.csv"
    for name, table in ev.tables.items():
        table.to_csv(out / f"{name}.csv")
        paths[name] = out / f"{name}.csv"
    hist = plot_correlation_histograms(ev.per_cell, out / "neighbourhood_correlation.png")
    if hist is not None:
        paths["neighbourhood_png"] = hist
    if umap and ev.embedding is not None:
        sub_obs = _evaluated_obs(ev, obs)
        for c in ev.per_cell.columns:
            if c.startswith("failure_mode_"):
                sub_obs[c] = ev.per_cell[c].to_numpy()
        panel_keys = [k for k in keys if k in sub_obs.columns] + [
            c for c in sub_obs.columns if c.startswith("failure_mode_")
        ]
        if coords is None:
            coords = umap_2d(ev.embedding)
        paths["umap"] = plot_embedding(
            coords,
            sub_obs,
            panel_keys,
            out / "umap.png",
            title=str(ev.info.get("embedding_key", "embedding")),
        )
    return paths
