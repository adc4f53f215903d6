"""scib metrics through scib-metrics (not re-implemented), on a precomputed shared kNN.

Per run, aggregates are on UNSCALED values: Bio = mean of bio metrics, Batch = mean of batch
metrics, Total = 0.6 Bio + 0.4 Batch. Min–max scaling is only applied when comparing several
runs (:func:`compare_runs`), and the table says so.

scib-metrics' KMeans NMI / ARI come from ONE k-means++ start (seed 0). On the same embedding
another start can move ARI by 0.3–0.5 and Total by 0.03–0.08 (Kang PBMC, 4 unequal cell
types), so the Total of one run is partly a draw of that start. ``scib_bio_stable`` /
``scib_total_stable`` are the same aggregates with KMeans NMI / ARI averaged over
``kmeans_starts`` seeds (0, 1, …; seed 0 is the Benchmarker's own fit): the expectation of
Total over the KMeans start, a less noisy objective for comparing settings.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

# JAX (used by scib-metrics) must not pre-allocate GPU memory that torch needs: allocate on
# demand and give it back after each metric (read by JAX when its backend starts).
JAX_MEMORY_ENV = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "XLA_PYTHON_CLIENT_ALLOCATOR": "platform",
}
for _key, _value in JAX_MEMORY_ENV.items():
    os.environ.setdefault(_key, _value)

from evaluation.knn import Neighbours, compute_neighbours  # noqa: E402

BIO_METRICS = ("isolated_labels", "nmi_ari_cluster_labels_kmeans", "silhouette_label", "clisi_knn")
BATCH_METRICS = ("bras", "ilisi_knn", "kbet_per_label", "graph_connectivity", "pcr_comparison")
OPTIONAL_BIO = ("nmi_ari_cluster_labels_leiden",)
BIO_WEIGHT, BATCH_WEIGHT = 0.6, 0.4
#: KMeans starts averaged by the ``*_stable`` aggregates (seed 0 is the Benchmarker's start)
KMEANS_STARTS = 10
#: reported next to scib-metrics' own values; not metrics of their own in :func:`compare_runs`
STABLE_KEYS = ("kmeans_nmi_mean", "kmeans_ari_mean", "bio_stable", "total_stable")
_KMEANS = "nmi_ari_cluster_labels_kmeans"


def scib_version() -> str:
    """Installed scib-metrics version (values are not comparable across versions)."""
    from importlib.metadata import version

    return version("scib-metrics")


def _selection(
    names: Mapping[str, bool] | None, defaults: tuple[str, ...], optional: tuple[str, ...]
):
    chosen = {n: True for n in defaults}
    chosen.update({n: False for n in optional})
    if names:
        unknown = sorted(set(names) - set(defaults) - set(optional))
        if unknown:
            raise ValueError(
                f"unknown scib metric(s) {unknown}; known: {sorted(defaults + optional)}"
            )
        chosen.update(names)
    return chosen


@contextmanager
def _exact_diffusion_neighbours():
    """kBET's per-label diffusion-map neighbours by exact search instead of pynndescent.

    scib-metrics' ``kbet_per_label`` embeds each label's cells with diffusion maps and finds
    their neighbours with pynndescent, whose numba code is compiled anew in every process
    (~20 s; a sweep evaluates each trial in a fresh worker) and approximate. Label subsets of
    an evaluation subsample are small, so exact blocked search is both faster and exact. Falls
    back to pynndescent where exact search does not apply (more neighbours than cells,
    non-finite coordinates) or if scib-metrics' layout changed.
    """
    try:
        from scib_metrics.utils import _diffusion_nn as module
    except ImportError:  # pragma: no cover - scib-metrics layout changed
        yield
        return
    original = getattr(module, "nearest_neighbors", None)
    if original is None or not hasattr(original, "pynndescent"):  # pragma: no cover
        yield
        return

    def pynndescent(X, n_neighbors, random_state=0, n_jobs=1):
        X = np.asarray(X, dtype=np.float32)
        if n_neighbors > X.shape[0] or not np.isfinite(X).all():
            return original.pynndescent(X, n_neighbors, random_state=random_state, n_jobs=n_jobs)
        nb = compute_neighbours(X, k=n_neighbors, method="exact")
        return original.NeighborsResults(indices=nb.indices, distances=nb.distances)

    module.nearest_neighbors = SimpleNamespace(
        **{k: getattr(original, k) for k in dir(original) if not k.startswith("__")},
    )
    module.nearest_neighbors.pynndescent = pynndescent
    try:
        yield
    finally:
        module.nearest_neighbors = original


@contextmanager
def _young_gc_only():
    """scib-metrics' Benchmarker runs a full ``gc.collect()`` after every metric.

    In a process that also holds torch, JAX and the data each full collection takes ~0.45 s:
    5 s of a 6 s warm evaluation on the bundled data. Reference counting frees the metrics'
    arrays already; the youngest generation catches their short-lived cycles."""
    import gc

    try:
        from scib_metrics.benchmark import _core as module
    except ImportError:  # pragma: no cover - scib-metrics layout changed
        yield
        return
    original = getattr(module, "gc", None)
    if original is not gc:  # pragma: no cover - scib-metrics changed how it collects
        yield
        return
    module.gc = SimpleNamespace(collect=lambda *args, **kwargs: gc.collect(0))
    try:
        yield
    finally:
        module.gc = original


def scib_metrics(
    embedding: np.ndarray,
    labels: np.ndarray,
    batch: np.ndarray,
    reference: np.ndarray,
    neighbours: Neighbours | None = None,
    bio_metrics: Mapping[str, bool] | None = None,
    batch_metrics: Mapping[str, bool] | None = None,
    n_jobs: int = 1,
    kmeans_starts: int = KMEANS_STARTS,
) -> dict[str, float]:
    """Raw (unscaled) scib metrics and aggregates for one embedding.

    Parameters
    ----------
    embedding
        ``(n_cells, n_dims)`` latent.
    labels, batch
        Cell labels and batch (library) per cell.
    reference
        Unintegrated embedding (PCA of log1p-normalised counts) for PCR comparison.
    neighbours
        Precomputed kNN with ≥ 90 neighbours (computed here when ``None``).
    bio_metrics, batch_metrics
        ``{metric: on/off}`` overrides of the defaults (Leiden NMI/ARI is off by default).
    n_jobs
        Parallel jobs for scib-metrics.
    kmeans_starts
        KMeans starts averaged by the ``*_stable`` aggregates (≥ 1; 1 makes them equal to
        ``scib_bio`` / ``scib_total``).

    Returns
    -------
    dict
        ``scib_<metric>`` for each metric, ``scib_bio``, ``scib_batch``, ``scib_total``; with
        KMeans NMI / ARI on, also ``scib_kmeans_nmi_mean`` / ``scib_kmeans_ari_mean`` (over
        ``kmeans_starts`` starts) and ``scib_bio_stable`` / ``scib_total_stable`` (Bio and
        Total with those means in place of the single start's values).

    Notes
    -----
    Parity with scib-metrics' own ``Benchmarker`` (same cells and embedding, its PCA of the
    log1p-normalised counts, its pynndescent kNN, ``get_results(min_max_scale=False)``; tested
    in ``tests/test_evaluation_fixes.py``): every metric but kBET agrees to 5 decimals, and the
    aggregates are formed as there (means of the unscaled metrics, NaN metrics left out).

    Known remaining difference, kBET: the kNN here is exact, the Benchmarker's approximate, and
    scib-metrics' per-label diffusion map is numerically unstable. It weights the trivial
    eigenvector by 1 when its float32 eigenvalue is exactly 1.0 but by ``e / (1 - e)`` ≈ 1.7e7
    when it rounds to 0.99999994, and then that eigenvector decides the label's diffusion
    neighbours. A one-ulp difference in the kNN distances can so move one label's kBET
    acceptance rate by up to 1 (0.17 measured), i.e. ``scib_total`` by up to
    ``0.08 / n_labels``: +0.0011 and -0.0014 measured on Kang PBMC (14k and 1,500 cells), in
    either direction. Without that flip kBET agrees within 1e-3.
    """
    from anndata import AnnData
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    n = embedding.shape[0]
    check_kmeans_starts(kmeans_starts)
    if not (len(labels) == len(batch) == reference.shape[0] == n):
        raise ValueError(
            f"lengths differ: embedding {n}, labels {len(labels)}, batch {len(batch)}, "
            f"reference {reference.shape[0]}"
        )
    if neighbours is None:
        neighbours = compute_neighbours(embedding, k=90)
    k_max = neighbours.k
    bio = BioConservation(**_selection(bio_metrics, BIO_METRICS, OPTIONAL_BIO))
    bat = BatchCorrection(**_selection(batch_metrics, BATCH_METRICS, ()))
    adata = AnnData(
        X=np.zeros((n, 1), dtype=np.float32),
        obs=pd.DataFrame(
            {
                "batch": pd.Categorical(np.asarray(batch).astype(str)),
                "label": pd.Categorical(np.asarray(labels).astype(str)),
            },
            index=[str(i) for i in range(n)],
        ),
    )
    adata.obsm["embedding"] = np.asarray(embedding, dtype=np.float32)
    adata.obsm["reference"] = np.asarray(reference, dtype=np.float32)
    bm = Benchmarker(
        adata,
        batch_key="batch",
        label_key="label",
        embedding_obsm_keys=["embedding"],
        bio_conservation_metrics=bio,
        batch_correction_metrics=bat,
        pre_integrated_embedding_obsm_key="reference",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    with warnings.catch_warnings(), _exact_diffusion_neighbours(), _young_gc_only():
        warnings.simplefilter("ignore")
        bm.prepare(neighbor_computer=lambda X, k: neighbours.to_scib(min(k, k_max)))
        bm.benchmark()
    raw = bm.get_results(min_max_scale=False, clean_names=False)
    types = raw.loc["Metric Type"]
    values = raw.loc["embedding"]
    out: dict[str, float] = {}
    for name in raw.columns:
        if types[name] in ("Bio conservation", "Batch correction"):
            out[f"scib_{name}"] = float(values[name])
    bio_vals = [float(values[c]) for c in raw.columns if types[c] == "Bio conservation"]
    bat_vals = [float(values[c]) for c in raw.columns if types[c] == "Batch correction"]
    # NaN metrics (e.g. kBET when no label has >= 10 cells in >= 2 batches) are left out of
    # the means, as scib-metrics' Benchmarker does (pandas' mean skips NaN)
    out["scib_bio"] = _nanmean(bio_vals)
    out["scib_batch"] = _nanmean(bat_vals)
    out["scib_total"] = (
        BIO_WEIGHT * out["scib_bio"] + BATCH_WEIGHT * out["scib_batch"]
        if bio_vals and bat_vals
        else float("nan")
    )
    if f"scib_{_KMEANS}_nmi" in out:
        bio_names = [f"scib_{c}" for c in raw.columns if types[c] == "Bio conservation"]
        out.update(_stable_aggregates(out, embedding, labels, bio_names, kmeans_starts))
    return out


def check_kmeans_starts(value: object) -> None:
    """Refuse a ``kmeans_starts`` that is not an integer >= 1 (naming it)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"kmeans_starts={value!r}: expected an integer >= 1")
    if value < 1:
        raise ValueError(f"kmeans_starts={value}: expected an integer >= 1")


def _stable_aggregates(
    out: dict[str, float],
    embedding: np.ndarray,
    labels: np.ndarray,
    bio_names: list[str],
    starts: int,
) -> dict[str, float]:
    """``scib_kmeans_*_mean`` and ``scib_{bio,total}_stable``: the Benchmarker's start (seed 0,
    already in ``out``) and ``starts - 1`` more, averaged."""
    nmi_key, ari_key = f"scib_{_KMEANS}_nmi", f"scib_{_KMEANS}_ari"
    nmi, ari = start_averaged(embedding, labels, (out[nmi_key], out[ari_key]), starts)
    # Bio with the single start's NMI / ARI swapped for their means (NaN metrics left out)
    means = {nmi_key: nmi, ari_key: ari}
    bio = _nanmean([means.get(name, out[name]) for name in bio_names])
    total = BIO_WEIGHT * bio + BATCH_WEIGHT * out["scib_batch"]
    return {
        "scib_kmeans_nmi_mean": nmi,
        "scib_kmeans_ari_mean": ari,
        "scib_bio_stable": bio,
        "scib_total_stable": total,
    }


def start_averaged(
    embedding: np.ndarray, labels: np.ndarray, first: tuple[float, float], starts: int
) -> tuple[float, float]:
    """Mean NMI and ARI over ``starts`` KMeans starts: ``first`` is seed 0's (the
    Benchmarker's own fit, already computed), seeds 1..``starts``-1 are fitted here."""
    more = kmeans_nmi_ari(embedding, labels, range(1, starts))
    nmi = float(np.mean([first[0], *(m[0] for m in more)]))
    ari = float(np.mean([first[1], *(m[1] for m in more)]))
    return nmi, ari


def kmeans_nmi_ari(
    embedding: np.ndarray, labels: np.ndarray, seeds: int | Sequence[int]
) -> list[tuple[float, float]]:
    """NMI and ARI of scib-metrics' KMeans (k = number of labels), one start per seed.

    Seed 0 is exactly scib-metrics' ``nmi_ari_cluster_labels_kmeans`` (the Benchmarker's
    fit); other seeds are other k-means++ starts of the same algorithm. Each start uses
    scib-metrics' own k-means++ initialisation and distance / label function; the Lloyd
    iterations stop once the labels repeat (a fixed point), where scib-metrics always runs all
    300, so the clusters are the same (tested) at 10–40× less time.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    seeds = [seeds] if isinstance(seeds, int | np.integer) else list(seeds)
    if not seeds:
        return []
    labels = np.asarray(labels)
    x = np.array(embedding, dtype=np.float32, order="C")  # a copy: centred below
    k = len(np.unique(labels))
    try:
        predicted = [_kmeans_labels(x, k, int(s)) for s in seeds]
    except (ImportError, AttributeError):  # pragma: no cover - scib-metrics layout changed
        from scib_metrics.utils import KMeans

        predicted = [np.asarray(KMeans(k, seed=s).fit(x.copy()).labels_) for s in seeds]
    return [
        (
            float(normalized_mutual_info_score(labels, p, average_method="arithmetic")),
            float(adjusted_rand_score(labels, p)),
        )
        for p in predicted
    ]


def _kmeans_labels(x: np.ndarray, k: int, seed: int, max_iter: int = 300) -> np.ndarray:
    """Labels of ``scib_metrics.utils.KMeans(k, seed=seed).fit(x)``, iterated to convergence."""
    import jax
    import jax.numpy as jnp
    from scib_metrics.utils._kmeans import _get_dist_labels, _initialize_plus_plus
    from scib_metrics.utils._utils import validate_seed

    xj = jnp.asarray(x - x.mean(axis=0))  # KMeans.fit centres the data first
    key = jax.random.split(validate_seed(seed), 1)[0]  # its one start (n_init=1)
    centroids = _initialize_plus_plus(xj, k, key)
    labels = None
    for _ in range(max_iter):
        _, new = _get_dist_labels(xj, centroids)
        if labels is not None and bool(jnp.array_equal(new, labels)):
            break  # same labels -> same centroids: every further iteration repeats this one
        labels = new
        centroids = _centroid_means()(xj, labels, k)
    return np.asarray(_get_dist_labels(xj, centroids)[1])


@functools.cache
def _centroid_means() -> Any:
    """Jitted ``(x, labels, k) ->`` mean of each cluster's points (an empty cluster's
    centroid is 0, as in scib-metrics: its count is clipped to 1)."""
    import jax
    import jax.numpy as jnp

    def means(x, labels, k):
        counts = jnp.clip(jnp.bincount(labels, length=k), 1)[:, None]
        return jax.ops.segment_sum(x, labels, num_segments=k) / counts

    return jax.jit(means, static_argnums=2)


def _nanmean(values: list[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none (no warning)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def compare_runs(
    results: Mapping[str, Mapping[str, float]], min_max_scale: bool = True
) -> pd.DataFrame:
    """Table of scib metrics across runs (rows), optionally min–max scaled per metric.

    Aggregates (``bio``, ``batch``, ``total``) are recomputed from the (scaled) metrics, as
    scib-metrics' Benchmarker does, so the table is consistent. The frame's ``attrs["scaling"]``
    records which was used.
    """
    df = pd.DataFrame(
        {
            run: {
                k[5:]: v for k, v in r.items() if k.startswith("scib_") and k[5:] not in STABLE_KEYS
            }
            for run, r in results.items()
        }
    ).T
    metric_cols = [c for c in df.columns if c not in ("bio", "batch", "total")]
    df = df[metric_cols].astype(float)
    if min_max_scale and len(df) > 1:
        lo, hi = df.min(), df.max()
        span = (hi - lo).replace(0, np.nan)
        df = ((df - lo) / span).fillna(0.0)
    bio_cols = [c for c in metric_cols if _is_bio(c)]
    bat_cols = [c for c in metric_cols if not _is_bio(c)]
    df["bio"] = df[bio_cols].mean(axis=1)
    df["batch"] = df[bat_cols].mean(axis=1)
    df["total"] = BIO_WEIGHT * df["bio"] + BATCH_WEIGHT * df["batch"]
    df.attrs["scaling"] = "min-max across runs" if min_max_scale and len(df) > 1 else "none (raw)"
    return df.sort_values("total", ascending=False)


def _is_bio(metric: str) -> bool:
    return any(metric.startswith(b) for b in BIO_METRICS + OPTIONAL_BIO)
