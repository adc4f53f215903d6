"""Helpers shared by the benchmark scripts (stdlib-only at module level)."""

from __future__ import annotations

from typing import Any


def benchmarker_scores(
    adata: Any, batch_key: str, label_key: str, keys: list[str], n_jobs: int
) -> dict[str, dict[str, float]]:
    """Score the embeddings ``adata.obsm[keys]`` with ONE scib-metrics ``Benchmarker``.

    scib's default metrics, the log-normalised PCA in ``adata.obsm["X_pca"]`` as the
    pre-integrated embedding, unscaled results. Returns embedding → {metric: value}, including
    ``Bio conservation``, ``Batch correction`` and ``Total``.
    """
    from scib_metrics.benchmark import Benchmarker

    bm = Benchmarker(
        adata,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=keys,
        pre_integrated_embedding_obsm_key="X_pca",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bm.benchmark()
    df = bm.get_results(min_max_scale=False)
    df = df.loc[df.index != "Metric Type"]
    return {str(e): {str(k): float(v) for k, v in row.items()} for e, row in df.iterrows()}
