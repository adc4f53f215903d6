"""Integration quality: regvi against PCA, Harmony and scvi-tools SCVI on every shared dataset.

One invocation trains every method (3 seeds each by default) on every real dataset in
``../shared/data`` and scores all latents of a dataset together in ONE scib-metrics
``Benchmarker`` (scib's defaults, unscaled Total, the log-normalised PCA as pre-integrated
embedding). Prints the table (mean ± sd over seeds, worst seed), writes JSON and one PNG per
dataset (the scib table), and checks the quality goals of issue #14.

Datasets (library / batch key, labels ``cell_type``; Kang reduced to 2,000 HVGs, seurat_v3 on
the counts by ctrl / stim lane): ``kang_sample`` (Kang 2018 PBMC by sample, 14k cells), ``kang_condition``
(the same by ctrl / stim lane), ``kang_ctrl`` (muscat ctrl cells by donor, 8.7k),
``mop`` (SNARE-seq2 MOp RNA by batch, 10k).

Methods: ``pca`` (the Benchmarker's unintegrated reference), ``harmony`` (harmonypy on that
PCA), ``scvi`` / ``scvi_large`` (scvi-tools SCVI 128/10 and 512/128 with its defaults and early
stopping, in its own virtualenv: ``benchmarks/setup_scvi_env.sh``), ``regvi`` (defaults, only
``library_key`` set), ``regvi_large`` (``RegVI.preset("large")``), ``regvi_b1`` /
``regvi_large_b1`` (the previous default: the plain ELBO, ``max_kl_weight=1``), ``regvi_noenc`` /
``regvi_large_noenc`` (the one before: also encoders without the library key,
``encoder_covariate_keys=[]``), ``regvi_nl10`` (the one before: also ``n_latent=10``),
``regvi_log1p`` (before that: ``log1p`` encoder input), ``regvi_batchfree`` (before that: also
the batch-free decoder, ``nn_conditioning_covariate_keys=[]``), and any setting given with
``--set`` (e.g. the sweep's best; ``"$library"`` stands for the dataset's key).

Every trained latent is cached under ``benchmarks/results/.cache/quality/<dataset>/`` as
``<method>_s<seed>.npy`` with a ``.json`` record (training time, epochs, the setting it was
trained with, regvi version and git commit), so a run can be split over processes
(``--datasets`` / ``--methods`` / ``--seeds``) and extended later; ``--score-only`` scores what
is cached. A cached entry whose recorded setting differs from the requested one is retrained;
entries cached before settings were recorded are kept as they are (with a note).

Usage
-----
::

    pip install -e ".[bench]"                        # once: harmonypy, scikit-misc
    benchmarks/setup_scvi_env.sh                     # once: scvi-tools in its own venv
    .venv/bin/python benchmarks/bench_quality.py     # everything (hours on 2 CPUs)
    .venv/bin/python benchmarks/bench_quality.py --datasets kang_ctrl --methods regvi,scvi \\
        --set '{"name": "regvi_nncond", "model": {"nn_conditioning_covariate_keys": "$library"}}'
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (  # next to this file
    DEFAULT_SCVI_PYTHON,
    REPO_ROOT,
    add_stable_totals,
    benchmarker_scores,
    check_scvi_python,
    git_commit,
    prepare_for_scib,
    regvi_model_kwargs,
    run_script,
)

REPO = REPO_ROOT
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "benchmarks" / "results" / ".cache" / "quality"
OUT = REPO / "benchmarks" / "results" / "bench_quality.json"
PNG_DIR = REPO / "benchmarks" / "results" / "quality"
SCVI_PYTHON = DEFAULT_SCVI_PYTHON

#: dataset → (file, batch key, label key)
DATASETS = {
    "kang_sample": ("kang2018_ifnb_pbmc.h5ad", "sample", "cell_type"),
    "kang_condition": ("kang2018_ifnb_pbmc.h5ad", "condition", "cell_type"),
    "kang_ctrl": ("kang2018_muscat_ctrl.h5ad", "donor", "cell_type"),
    "mop": ("mop_snareseq2_rna.h5ad", "batch", "cell_type"),
}
#: built-in methods; trained ones run once per seed
METHODS = (
    "pca",
    "harmony",
    "scvi",
    "scvi_large",
    "regvi",
    "regvi_large",
    "regvi_b1",
    "regvi_large_b1",
    "regvi_noenc",
    "regvi_large_noenc",
    "regvi_nl10",
    "regvi_log1p",
    "regvi_batchfree",
)
#: the plain ELBO (``max_kl_weight=1``), the default before beta = 2
B1 = {"max_kl_weight": 1.0}
REGVI_SETTINGS = {
    "regvi": {"name": "regvi"},
    "regvi_large": {"name": "regvi_large", "preset": "large"},
    # the default before the KL weight beta = 2 (2026-12-07)
    "regvi_b1": {"name": "regvi_b1", "train": B1},
    "regvi_large_b1": {"name": "regvi_large_b1", "preset": "large", "train": B1},
    # the one before: also encoders without the library key (2026-12-07)
    "regvi_noenc": {"name": "regvi_noenc", "model": {"encoder_covariate_keys": []}, "train": B1},
    "regvi_large_noenc": {
        "name": "regvi_large_noenc",
        "preset": "large",
        "model": {"encoder_covariate_keys": []},
        "train": B1,
    },
    # the default before n_latent=20 (chosen by the quality sweep, 2026-12-07)
    "regvi_nl10": {
        "name": "regvi_nl10",
        "model": {"n_latent": 10, "encoder_covariate_keys": []},
        "train": B1,
    },
    # the default before the depth-normalised encoder input (encoder_input="normalised")
    "regvi_log1p": {
        "name": "regvi_log1p",
        "model": {"encoder_input": "log1p", "n_latent": 10, "encoder_covariate_keys": []},
        "train": B1,
    },
    # the default before that: also the batch-free decoder
    "regvi_batchfree": {
        "name": "regvi_batchfree",
        "model": {
            "nn_conditioning_covariate_keys": [],
            "encoder_input": "log1p",
            "n_latent": 10,
        },
        "train": B1,
    },
}
SCVI_SIZES = {"scvi": (128, 10), "scvi_large": (512, 128)}
N_TOP_GENES = 2000


# ------------------------------------------------------------------ data
def prepared(name: str) -> Path:
    """The dataset as raw counts (HVG-reduced where it has > 4,000 genes), cached as .h5ad."""
    path = CACHE / name / "data.h5ad"
    if path.is_file():
        return path
    import anndata as ad
    import scanpy as sc

    file, key, _ = DATASETS[name]
    adata = ad.read_h5ad(SHARED / file)
    if adata.n_vars > 4000:
        # by the two Kang lanes (ctrl / stim) for both Kang variants: the same genes for both,
        # and seurat_v3's loess fails on the smallest of the 17 sample groups
        sc.pp.highly_variable_genes(
            adata,
            n_top_genes=N_TOP_GENES,
            flavor="seurat_v3",
            batch_key="condition" if name.startswith("kang") else key,
            subset=True,
        )
    adata.obs[key] = adata.obs[key].astype(str).astype("category")
    adata.obs_names_make_unique()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.rename(path)
    return path


def pca_of(adata) -> np.ndarray:
    """The Benchmarker's pre-integrated embedding: PCA (50) of the log-normalised counts."""
    norm = adata.copy()
    prepare_for_scib(norm, {}, pca_key=None)
    return np.asarray(norm.obsm["X_pca"], dtype=np.float32)


# ------------------------------------------------------------------ methods
def _cached(name: str, method: str, seed: int | None) -> tuple[Path, Path]:
    stem = CACHE / name / (method if seed is None else f"{method}_s{seed}")
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def method_of(emb: str) -> str:
    """The method of a cached embedding: ``regvi_large_s2`` → ``regvi_large``, ``pca`` → ``pca``.

    Method names hold no ``_s`` (checked for ``--set``), so the suffix is unambiguous.
    """
    head, sep, seed = emb.rpartition("_s")
    return head if sep and seed.isdigit() else emb


def requested(name: str, method: str, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a cache entry of ``method`` on ``name`` is trained with: ``setting`` (the method's
    settings; for regvi the ``--set`` JSON or built-in setting) and, for regvi, ``resolved``
    (the ``RegVI`` keyword arguments after the preset and ``"$library"``, and ``train``)."""
    _, key, _ = DATASETS[name]
    if method in settings:
        setting = settings[method]
        resolved = {
            "model": {"library_key": key, **regvi_model_kwargs(setting, key)},
            "train": setting.get("train", {}),
        }
        out = {"setting": setting, "resolved": resolved}
    elif method in SCVI_SIZES:
        n_hidden, n_latent = SCVI_SIZES[method]
        out = {"setting": {"name": method, "n_hidden": n_hidden, "n_latent": n_latent}}
    else:
        out = {"setting": {"name": method}}
    return json.loads(json.dumps(out))  # as it reads back from the record


def is_current(rec: Path, want: dict[str, Any], label: str) -> bool:
    """Whether the cached record ``rec`` was trained with ``want`` (see :func:`requested`).

    A record without a stored setting (made before settings were recorded) is accepted.
    """
    stored = json.loads(rec.read_text()) if rec.is_file() else {}
    if "setting" not in stored:
        print(f"note: {label}: cached before settings were recorded; kept as it is", flush=True)
        return True
    for k, v in want.items():
        if k in stored and stored[k] != v:
            print(f"{label}: cached {k} {stored[k]} differs from {v}; retraining", flush=True)
            return False
    return True


def provenance(want: dict[str, Any]) -> dict[str, Any]:
    """The record fields that say what an entry was trained with: settings, regvi, commit."""
    from importlib import metadata

    try:
        version = metadata.version("regvi")
    except metadata.PackageNotFoundError:
        version = None
    return {**want, "regvi": version, "git_commit": git_commit()}


def _store(npy: Path, rec: Path, latent: np.ndarray, record: dict[str, Any]) -> None:
    np.save(npy, np.asarray(latent, dtype=np.float32))
    rec.write_text(json.dumps(record))


def lowcount_robustness(model, adata, label: str, n_cells: int = 4000) -> dict[str, float]:
    """evaluation's low-count robustness (thinning to 50 / 25 / 10 % of the UMIs, re-encoded)
    on a fixed random subsample of ``n_cells`` cells."""
    from evaluation.robustness import low_count_robustness

    idx = np.sort(np.random.default_rng(0).permutation(adata.n_obs)[:n_cells])
    sub = adata[idx].copy()

    def encode(X):
        thinned = sub.copy()
        thinned.X = X
        return model.get_latent_representation(thinned, batch_size=1024)

    emb = model.get_latent_representation(sub, batch_size=1024)
    labels = sub.obs[label].astype(str).to_numpy()
    found = low_count_robustness(encode, sub.X, emb, labels, seed=0)
    return {k: float(v) for k, v in found.items() if v is not None}


def train_regvi(
    name: str, want: dict[str, Any], seed: int, threads: int, lowcount: bool = False
) -> None:
    """Train regvi with ``want`` (:func:`requested`) and cache its latent and record."""
    import anndata as ad
    import torch

    import regvi

    torch.set_num_threads(threads)
    adata = ad.read_h5ad(prepared(name))
    model = regvi.RegVI(adata, **want["resolved"]["model"])
    t0 = time.perf_counter()
    history = model.train(progress_bar=False, seed=seed, **want["resolved"]["train"])
    wall = time.perf_counter() - t0
    es = model.early_stopping
    record = {
        "train_s": round(wall, 1),
        "epochs": len(history),
        "best_epoch": int(es.best_epoch) if es is not None and es.best_epoch is not None else None,
        **provenance(want),
    }
    if lowcount:
        record["lowcount"] = lowcount_robustness(model, adata, DATASETS[name][2])
    _store(*_cached(name, want["setting"]["name"], seed), model.get_latent_representation(), record)


def train_scvi(
    name: str, method: str, seed: int, threads: int, python: Path, want: dict[str, Any]
) -> None:
    """scvi-tools SCVI in its own venv (``quality_scvi_child.py``); adds ``want`` to its record."""
    check_scvi_python(python)
    _, key, _ = DATASETS[name]
    n_hidden, n_latent = SCVI_SIZES[method]
    npy, _ = _cached(name, method, seed)
    args = [prepared(name), key, n_hidden, n_latent, seed, threads, npy.with_suffix("")]
    run_script(python, "quality_scvi_child.py", args, npy.with_suffix(".log"))
    rec = npy.with_suffix(".json")
    rec.write_text(json.dumps({**json.loads(rec.read_text()), **provenance(want)}))


def train_harmony(name: str, seed: int, want: dict[str, Any]) -> None:
    import anndata as ad
    import harmonypy

    _, key, _ = DATASETS[name]
    adata = ad.read_h5ad(prepared(name))
    pca = _pca(name, adata)
    t0 = time.perf_counter()
    h = harmonypy.run_harmony(pca, adata.obs[[key]], key, random_state=seed)
    z = np.asarray(h.Z_corr)
    z = z if z.shape[0] == adata.n_obs else z.T
    record = {"train_s": round(time.perf_counter() - t0, 1), **provenance(want)}
    _store(*_cached(name, "harmony", seed), z, record)


def _pca(name: str, adata, force: bool = False) -> np.ndarray:
    npy, rec = _cached(name, "pca", None)
    if force or not npy.is_file():
        _store(
            npy, rec, pca_of(adata), {"train_s": None, **provenance({"setting": {"name": "pca"}})}
        )
    return np.load(npy)


# ------------------------------------------------------------------ scoring
def score(
    name: str, n_jobs: int, skip: frozenset[str] = frozenset()
) -> dict[str, dict[str, float]]:
    """One Benchmarker over every cached latent of ``name`` (but those in ``skip``):
    embedding → metrics (unscaled; each embedding's metrics depend only on it, the labels,
    the batches and the PCA reference, so rows of separate Benchmarkers can be merged)."""
    import anndata as ad

    _, key, label = DATASETS[name]
    adata = ad.read_h5ad(prepared(name))
    latents = {
        npy.stem: npy
        for npy in sorted((CACHE / name).glob("*.npy"))
        if npy.stem != "pca" and npy.stem not in skip
    }
    keys = prepare_for_scib(adata, latents, pca=_pca(name, adata), pca_key="pca")
    scores = benchmarker_scores(adata, key, label, keys, n_jobs)
    add_stable_totals(scores, {k: adata.obsm[k] for k in keys}, adata.obs[label].to_numpy())
    return scores


def stable_scores(name: str, scores: dict[str, dict[str, float]]) -> None:
    """Add the KMeans-start averages to already computed Benchmarker rows of ``name`` (in
    place) from the cached latents, without rerunning the Benchmarker."""
    import anndata as ad

    _, _, label = DATASETS[name]
    adata = ad.read_h5ad(prepared(name), backed="r")
    latents = {e: np.load(CACHE / name / f"{e}.npy") for e in scores if e != "pca"}
    latents["pca"] = _pca(name, adata)
    add_stable_totals(scores, latents, adata.obs[label].to_numpy())


def cached_records(name: str, embeddings: Any) -> dict[str, dict[str, Any]]:
    """The cache records (training time, epochs, setting, low-count results) of those
    ``embeddings`` of ``name`` that are cached."""
    out = {}
    for e in embeddings:
        rec = CACHE / name / f"{e}.json"
        if rec.is_file():
            out[e] = json.loads(rec.read_text())
    return out


def known_records(
    name: str, stored: dict[str, dict[str, Any]], scores: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The training records of ``scores``' embeddings: the JSON's ``stored`` ones, overridden
    by the cache's where it has them."""
    records = {**stored, **cached_records(name, scores)}
    return {e: r for e, r in records.items() if e in scores}


def summarise(
    name: str,
    scores: dict[str, dict[str, float]],
    records: dict[str, dict[str, Any]] | None = None,
    previous: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Method → mean ± sd over seeds of Total / Bio / Batch, worst seed, time and epochs.

    ``records``: embedding → training record, as the JSON keeps them (``None``: read from the
    cache); a method with an embedding without a record keeps the time, epochs and low-count
    means of ``previous`` (the summary the JSON held, over the same number of seeds), so a lost
    cache loses nothing and one retrained seed does not stand for all.
    """
    if records is None:
        records = cached_records(name, scores)
    methods: dict[str, list[str]] = {}
    for emb in scores:
        methods.setdefault(method_of(emb), []).append(emb)
    out = {}
    for method, embs in methods.items():
        tot = np.array([scores[e]["Total"] for e in embs])
        stable = np.array([scores[e].get("Total (stable)", np.nan) for e in embs])
        recs = [records.get(e, {}) for e in embs]
        times = [r["train_s"] for r in recs if r.get("train_s") is not None]
        epochs = [r["epochs"] for r in recs if r.get("epochs") is not None]
        worst = embs[int(np.argmin(tot))]
        out[method] = {
            "n_seeds": len(embs),
            "total_mean": float(tot.mean()),
            "total_sd": float(tot.std(ddof=1)) if len(tot) > 1 else 0.0,
            "bio_mean": float(np.mean([scores[e]["Bio conservation"] for e in embs])),
            "batch_mean": float(np.mean([scores[e]["Batch correction"] for e in embs])),
            "worst": worst,
            "worst_total": float(tot.min()),
            "train_s_mean": float(np.mean(times)) if times else None,
            "epochs_mean": float(np.mean(epochs)) if epochs else None,
        }
        if np.isfinite(stable).all():
            out[method].update(
                {
                    "total_stable_mean": float(stable.mean()),
                    "total_stable_sd": float(stable.std(ddof=1)) if len(embs) > 1 else 0.0,
                    "worst_stable": embs[int(np.argmin(stable))],
                    "worst_total_stable": float(stable.min()),
                }
            )
        low = [r["lowcount"] for r in recs if r.get("lowcount")]
        if low:
            out[method]["lowcount_mean"] = {
                k: float(np.mean([r[k] for r in low if k in r])) for k in low[0]
            }
        old = (previous or {}).get(method)
        if not all(recs) and old and old.get("n_seeds") == len(embs):
            for k in ("train_s_mean", "epochs_mean", "lowcount_mean"):
                if old.get(k) is not None:
                    out[method][k] = old[k]
    return out


def goals(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The quality goals of issue #14 that this dataset's rows can check."""
    s, lines = summary, []

    def check(label: str, a: str, b: str, margin: float, worst: bool = False) -> None:
        if a in s and b in s:
            left = s[a]["worst_total" if worst else "total_mean"]
            right = s[b]["total_mean"] + margin
            mark = "ok  " if left >= right else "MISS"
            line = f"  {mark} {label}: {left:.3f} vs {right:.3f}"
            if "total_stable_mean" in s[a] and "total_stable_mean" in s[b]:
                sl = s[a]["worst_total_stable" if worst else "total_stable_mean"]
                sr = s[b]["total_stable_mean"] + margin
                line += (
                    f"  (KMeans-start mean: {'ok' if sl >= sr else 'MISS'} {sl:.3f} vs {sr:.3f})"
                )
            lines.append(line)

    check("regvi >= scvi + 0.02", "regvi", "scvi", 0.02)
    check("regvi >= harmony", "regvi", "harmony", 0.0)
    check("regvi_large (worst seed) >= regvi - 0.01", "regvi_large", "regvi", -0.01, worst=True)
    check("regvi_large (worst seed) >= scvi_large", "regvi_large", "scvi_large", 0.0, worst=True)
    return lines


def leave_one_out(
    doc: dict[str, Any], default: str = "regvi", key: str = "total_mean"
) -> dict[str, Any]:
    """Leave-one-dataset-out choice among the regvi settings scored on every dataset.

    For each dataset d, the setting with the best mean Total over the OTHER datasets is chosen
    and scored on d against ``default``: a setting is adopted as a default only if it wins
    on datasets that played no part in choosing it. ``key``: the summary's ``total_mean`` (the
    Benchmarker's Total) or ``total_stable_mean`` (averaged over KMeans starts)."""
    data = {n: d["summary"] for n, d in doc.get("datasets", {}).items()}
    out: dict[str, Any] = {}
    if not data:
        return out
    shared = set.intersection(*({m for m in s if key in s[m]} for s in data.values()))
    candidates = sorted(m for m in shared if m.startswith("regvi") and "large" not in m)
    if len(data) < 2 or default not in candidates or len(candidates) < 2:
        return out
    for held in data:
        others = [n for n in data if n != held]
        pick = max(candidates, key=lambda m: np.mean([data[n][m][key] for n in others]))
        out[held] = {
            "chosen_on_others": pick,
            "total": data[held][pick][key],
            "default_total": data[held][default][key],
            "gain": data[held][pick][key] - data[held][default][key],
        }
    return out


SWEEP_METRICS = ("scib_total", "scib_total_stable", "scib_bio", "scib_bio_stable", "scib_batch")


def sweep_results(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """The finished trials of a regvi sweep from its MLflow experiment: params + scib metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"--sweep: no MLflow experiment {experiment!r} at {tracking_uri}")
    trials = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if "regvi.trial_id" not in run.data.tags or "scib_total" not in run.data.metrics:
            continue
        m = run.data.metrics
        trials.append(
            {
                "params": dict(run.data.params),
                **{k: m[k] for k in SWEEP_METRICS if k in m},
                "epochs": m.get("epoch"),
            }
        )
    # best first by the start-averaged Total where the sweep logged it (sweeps optimise it)
    trials.sort(key=lambda t: -t.get("scib_total_stable", t["scib_total"]))
    return {"experiment": experiment, "n_trials": len(trials), "trials": trials}


def plot(name: str, scores: dict[str, dict[str, float]], summary: dict[str, Any]) -> Path:
    """The scib table of one dataset as a PNG: methods × metrics, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.plots import save_figure

    last = [t for t in ("Total (stable)", "Total") if t in next(iter(scores.values()))]
    metrics = [m for m in next(iter(scores.values())) if m not in (*last, "KMeans starts")] + last
    order = sorted(summary, key=lambda m: -summary[m]["total_mean"])
    grid = np.array(
        [
            [np.mean([scores[e][m] for e in scores if method_of(e) == meth]) for m in metrics]
            for meth in order
        ]
    )
    fig, ax = plt.subplots(figsize=(1.0 + 0.85 * len(metrics), 0.9 + 0.42 * len(order)))
    ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for i in range(len(order)):
        for j in range(len(metrics)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    labels = [f"{m} (n={summary[m]['n_seeds']})" for m in order]
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.set_xticks(range(len(metrics)), metrics, rotation=40, ha="right", fontsize=7)
    _, key, _ = DATASETS[name]
    ax.set_title(f"{name} (batch: {key}) — scib-metrics, unscaled, mean over seeds", fontsize=9)
    PNG_DIR.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, PNG_DIR / f"scib_{name}.png", dpi=130)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-jobs", type=int, default=2, help="Benchmarker neighbour-search jobs")
    p.add_argument("--set", action="append", default=[], help="a JSON regvi setting to add")
    p.add_argument("--scvi-python", type=Path, default=SCVI_PYTHON)
    p.add_argument("--train-only", action="store_true", help="train and cache; do not score")
    p.add_argument("--score-only", action="store_true", help="score the cached latents only")
    p.add_argument(
        "--score-missing",
        action="store_true",
        help="with --score-only: score only the cached latents the JSON has no scores for",
    )
    p.add_argument(
        "--stable-only",
        action="store_true",
        help="add the KMeans-start averages (Total (stable)) to the JSON's existing scores",
    )
    p.add_argument("--force", action="store_true", help="retrain cached latents")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--lowcount",
        action="store_true",
        help="also measure low-count robustness of each regvi run (thinned re-encoding)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="TRACKING_URI#EXPERIMENT",
        help="store a finished regvi sweep's trials (from MLflow) in the JSON",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; adds ``settings`` (name → regvi setting) and the
    lists ``datasets``, ``methods`` and ``seeds``."""
    p = build_parser()
    args = p.parse_args(argv)
    args.datasets = args.datasets.split(",")
    bad = sorted(set(args.datasets) - set(DATASETS))
    if bad:
        p.error(f"--datasets: unknown {bad}; expected some of {list(DATASETS)}")
    args.settings = dict(REGVI_SETTINGS)
    for raw in args.set:
        s = json.loads(raw)
        if not isinstance(s, dict) or "name" not in s or "_s" in s["name"]:
            p.error(f"--set {raw!r}: expected a JSON object with a 'name' (no '_s' in it)")
        args.settings[s["name"]] = s
    methods = args.methods.split(",") + [json.loads(r)["name"] for r in args.set]
    args.methods = list(dict.fromkeys(methods))
    unknown = sorted(set(args.methods) - set(METHODS) - set(args.settings))
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected some of {list(METHODS)} or a --set name")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def train_one(
    name: str, method: str, seed: int | None, want: dict[str, Any], args: argparse.Namespace
) -> None:
    """Train (or compute) one cache entry with ``want`` (:func:`requested`), cached or not."""
    if method == "pca":
        import anndata as ad

        _pca(name, ad.read_h5ad(prepared(name)), force=True)
    elif method == "harmony":
        train_harmony(name, seed, want)
    elif method in SCVI_SIZES:
        train_scvi(name, method, seed, args.threads, args.scvi_python, want)
    else:
        train_regvi(name, want, seed, args.threads, lowcount=args.lowcount)


def train_all(args: argparse.Namespace) -> None:
    """Train every (dataset, method, seed) not cached with the requested setting."""
    for name in args.datasets:
        prepared(name)
        for method in args.methods:
            for seed in [None] if method == "pca" else args.seeds:
                npy, rec = _cached(name, method, seed)
                label = f"{name} {method} seed {seed}"
                want = requested(name, method, args.settings)
                if npy.is_file() and not args.force and is_current(rec, want, label):
                    continue
                t0 = time.perf_counter()
                train_one(name, method, seed, want, args)
                print(f"trained {label}: {time.perf_counter() - t0:.0f} s", flush=True)


def print_summary(name: str, summary: dict[str, dict[str, Any]]) -> None:
    """One line per method (best Total first), low-count agreement, and the goals."""
    for method, r in sorted(summary.items(), key=lambda kv: -kv[1]["total_mean"]):
        t = f"{r['train_s_mean']:.0f}" if r["train_s_mean"] is not None else "-"
        ep = f"{r['epochs_mean']:.0f}" if r["epochs_mean"] is not None else "-"
        print(
            f"{name:<15} {method:<16} {r['n_seeds']:>2} {r['total_mean']:.3f} ± "
            f"{r['total_sd']:.3f} {r['bio_mean']:>6.3f} {r['batch_mean']:>6.3f} "
            f"{r['worst_total']:>6.3f} {t:>8} {ep:>6}"
            + (
                f"  stable {r['total_stable_mean']:.3f} ± {r['total_stable_sd']:.3f} "
                f"worst {r['worst_total_stable']:.3f}"
                if "total_stable_mean" in r
                else ""
            )
        )
        if "lowcount_mean" in r:
            low = r["lowcount_mean"]
            agree = " ".join(
                f"q{q}: {low[f'lowcount_q{q}_label_majority']:.3f}"
                for q in (0.5, 0.25, 0.1)
                if f"lowcount_q{q}_label_majority" in low
            )
            print(f"{'':<15} {'':<16} low-count label agreement {agree}")
    for line in goals(summary):
        print(line)


def score_all(args: argparse.Namespace) -> dict[str, Any]:
    """Score every dataset's cached latents, print and plot them; the JSON document (written
    to ``--out`` after every dataset, merged with what it held)."""
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
            "command": "benchmarks/bench_quality.py",
            "scib": "scib-metrics Benchmarker, defaults, min_max_scale=False, one per dataset",
        }
    )
    doc.setdefault("datasets", {})
    for spec in args.sweep:
        uri, _, experiment = spec.rpartition("#")
        doc.setdefault("sweeps", {})[experiment] = sweep_results(uri, experiment)
        best = doc["sweeps"][experiment]["trials"][:1]
        print(f"sweep {experiment}: {doc['sweeps'][experiment]['n_trials']} trials; best {best}")
    header = f"{'dataset':<15} {'method':<16} {'n':>2} {'total':>13} {'bio':>6} {'batch':>6} "
    print(header + f"{'worst':>6} {'train s':>8} {'epochs':>6}")
    for name in args.datasets:
        prev = doc["datasets"].get(name, {})
        if args.score_missing and name in doc["datasets"]:
            scores = dict(prev["scores"])
            scores.update(score(name, args.n_jobs, skip=frozenset(scores)))
        else:
            scores = score(name, args.n_jobs)
        records = known_records(name, prev.get("records", {}), scores)
        summary = summarise(name, scores, records, previous=prev.get("summary"))
        png = plot(name, scores, summary)
        doc["datasets"][name] = {
            "batch_key": DATASETS[name][1],
            "summary": summary,
            "scores": scores,
            "records": records,
            "png": str(png.relative_to(REPO)),
        }
        print_summary(name, summary)
        doc = merge_into(args.out, doc, name)
    return doc


def merge_into(out: Path, doc: dict[str, Any], name: str) -> dict[str, Any]:
    """Write ``doc``'s dataset ``name`` (and its top-level keys other than ``datasets``) into
    ``out``, keeping every other dataset as the file holds it now; returns the merged document.

    Read, merge and write happen under an exclusive lock on ``<out>.lock`` and the write is
    atomic (temporary file, then rename), so processes scoring different datasets side by side
    do not overwrite each other's results.
    """
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
        current.update({k: v for k, v in doc.items() if k != "datasets"})
        current.setdefault("datasets", {})[name] = doc["datasets"][name]
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(current, indent=1))
        tmp.replace(out)
    return current


def report_leave_one_out(doc: dict[str, Any], out: Path, key: str = "total_mean") -> None:
    """Add the leave-one-dataset-out choice to ``doc`` (and ``out``) and print it
    (``key="total_stable_mean"``: by the Total averaged over KMeans starts)."""
    loo = leave_one_out(doc, key=key)
    if not loo:
        return
    stable = key == "total_stable_mean"
    doc["leave_one_dataset_out_stable" if stable else "leave_one_dataset_out"] = loo
    out.write_text(json.dumps(doc, indent=1))
    print(
        "leave-one-dataset-out"
        + (" by Total (stable)" if stable else "")
        + " (setting chosen on the other datasets, scored on this one):"
    )
    for held, r in loo.items():
        print(
            f"  {held:<15} {r['chosen_on_others']:<16} {r['total']:.3f} vs regvi "
            f"{r['default_total']:.3f} ({r['gain']:+.3f})"
        )


def main(argv: list[str] | None = None) -> None:
    """Train what is missing (unless ``--score-only``), then score (unless ``--train-only``)."""
    args = parse_args(argv)
    if args.stable_only:
        doc = json.loads(args.out.read_text())
        for name in args.datasets:
            entry = doc["datasets"][name]
            stable_scores(name, entry["scores"])
            records = known_records(name, entry.get("records", {}), entry["scores"])
            entry["summary"] = summarise(
                name, entry["scores"], records, previous=entry.get("summary")
            )
            print_summary(name, entry["summary"])
            args.out.write_text(json.dumps(doc, indent=1))
        report_leave_one_out(doc, args.out, key="total_stable_mean")
        return
    if not args.score_only:
        train_all(args)
    if args.train_only:
        return
    score_all(args)
    doc = json.loads(args.out.read_text())  # with what other processes scored meanwhile
    report_leave_one_out(doc, args.out)
    report_leave_one_out(doc, args.out, key="total_stable_mean")
    print(f"wrote {args.out} and {PNG_DIR.relative_to(REPO)}/scib_<dataset>.png")


if __name__ == "__main__":
    main()
