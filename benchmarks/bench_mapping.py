"""Reference mapping (issue #16): regvi query mapping against scArches and de novo integration.

Held-out libraries of the shared real data: the reference is trained on some libraries, the
query libraries are mapped onto it, and the joint reference + query embedding is judged by
label transfer (reference labels → query cells, kNN vote of ``regvi.map.labels``) and by one
scib-metrics ``Benchmarker`` per split over every method's joint embedding.

Splits (data prepared by ``bench_quality.prepared``: Kang reduced to 2,000 HVGs, seurat_v3 by
ctrl / stim lane; MOp RNA as is; labels ``cell_type``). The query is the LAST 4 libraries in
sorted order (deterministic, recorded in the JSON):

* ``mop``: SNARE-seq2 MOp RNA by ``batch``: reference 09A–09H (8), query 09I–09L (4).
* ``kang_sample``: Kang 2018 PBMC by ``sample``: query 1256_ctrl, 1256_stim, 1488_ctrl,
  1488_stim (two donors never seen, both arms); reference the other 12 samples plus the 203
  cells of ``unknown_stim`` (no demuxlet donor; kept in the reference, never a query library).
* ``mop_multiome`` (optional, ``--splits mop_multiome``): RegMultiVI reference on MOp RNA +
  ATAC of the reference libraries, RNA-only query (``RegMultiVI.load_query_data({"rna":
  query})``); the embedding compared is the RNA block of the joint latent (the block both
  reference and query cells have). Needs ``RegMultiVI.load_query_data``.

Methods (128 hidden / 10 latent everywhere, seeds ``--seeds``):

* ``regvi_map``: ``RegVI(ref, library_key=KEY).train(seed=s)``, then
  ``RegVI.load_query_data(query, ref).train(seed=s)`` (a query model's defaults: only the
  query libraries' technical terms are fitted, at most 100 epochs, patience 10, no KL
  warm-up). Joint latent = reference latent of the reference cells + query
  model latent of the query cells.
* ``regvi_map_ft``: the same reference, ``load_query_data(..., fine_tune=["conditioning",
  "encoder"])``; joint latent = the query model's latent of reference AND query cells.
* ``regvi_denovo``: ``RegVI`` on all cells with ``library_key`` (with ``--reuse-quality``
  bench_quality's ``regvi`` latent of the same prepared file and seed, if cached).
* ``scarches``: scvi-tools SCVI (defaults, early stopping) on the reference, then
  ``prepare_query_anndata`` + ``load_query_data`` + ``train(max_epochs=200,
  plan_kwargs=dict(weight_decay=0.0))`` (``mapping_scvi_child.py``, own virtualenv).
* ``scvi_denovo``: SCVI with its defaults on all cells. With ``--reuse-quality`` the latents
  bench_quality.py cached for the same prepared file, method ``scvi`` and seed are reused
  (same data, same scvi-tools; the record says so).
* ``regvi_multi_map`` (split ``mop_multiome`` only).

Every latent (all cells, the prepared file's order) is cached under
``benchmarks/results/.cache/mapping/<split>/`` with its times and epochs, so a run can be
split (``--splits`` / ``--methods`` / ``--seeds``), resumed and re-scored (``--score-only``).

Goals checked per split: label-transfer macro-F1 of regvi_map ≥ scarches; joint scib Total of
regvi_map within 0.02 of regvi_denovo; regvi query fitting time ≤ 0.2 × regvi de novo time.

Usage
-----
::

    .venv/bin/python benchmarks/bench_mapping.py --splits mop,kang_sample --seeds 0,1 \\
        --threads 1 --reuse-quality
    .venv/bin/python benchmarks/bench_mapping.py --splits mop_multiome --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SHARED = REPO.parent / "shared" / "data"
CACHE = REPO / "benchmarks" / "results" / ".cache" / "mapping"
QUALITY_CACHE = REPO / "benchmarks" / "results" / ".cache" / "quality"
OUT = REPO / "benchmarks" / "results" / "bench_mapping.json"
PNG_DIR = REPO / "benchmarks" / "results" / "mapping"
SCVI_PYTHON = REPO / "benchmarks" / ".venv-scvi" / "bin" / "python"

#: split → (bench_quality dataset, library key, label key)
SPLITS = {
    "mop": ("mop", "batch", "cell_type"),
    "kang_sample": ("kang_sample", "sample", "cell_type"),
    "mop_multiome": ("mop", "batch", "cell_type"),
}
#: libraries never used as query (no demuxlet donor: a mixture, not a library of one sample)
NOT_QUERY = {"unknown_stim"}
N_QUERY = 4
N_HIDDEN, N_LATENT = 128, 10
METHODS = ("regvi_map", "regvi_map_ft", "regvi_denovo", "scarches", "scvi_denovo")
MULTI_METHODS = ("regvi_multi_map",)
MAPPING = {"regvi_map", "regvi_map_ft", "scarches", "regvi_multi_map"}


# ------------------------------------------------------------------ data
def data_path(split: str) -> Path:
    """The split's prepared counts (bench_quality's file: same cells, genes and order)."""
    from bench_quality import prepared  # next to this file

    return prepared(SPLITS[split][0])


def query_libraries(libraries: Any) -> list[str]:
    """The last ``N_QUERY`` libraries in sorted order (those in ``NOT_QUERY`` left out)."""
    candidates = sorted(set(map(str, libraries)) - NOT_QUERY)
    return candidates[-N_QUERY:]


def load_split(split: str):
    """(all cells, query mask, query libraries) of a split."""
    import anndata as ad

    adata = ad.read_h5ad(data_path(split))
    key = SPLITS[split][1]
    libs = adata.obs[key].astype(str).to_numpy()
    query = query_libraries(libs)
    return adata, np.isin(libs, query), query


# ------------------------------------------------------------------ cache
def _cached(split: str, method: str, seed: int | None) -> tuple[Path, Path]:
    stem = CACHE / split / (method if seed is None else f"{method}_s{seed}")
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _store(npy: Path, rec: Path, latent: np.ndarray, record: dict[str, Any]) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, np.asarray(latent, dtype=np.float32))
    rec.write_text(json.dumps(record))


# ------------------------------------------------------------------ regvi
def _history_len(history: Any) -> int:
    return len(history) if history is not None else 0


def train_regvi_reference(split: str, seed: int, threads: int):
    """The regvi reference of (split, seed), trained once and saved (loaded when cached)."""
    import torch

    import regvi

    torch.set_num_threads(threads)
    adata, is_query, _ = load_split(split)
    key = SPLITS[split][1]
    folder = CACHE / split / f"regvi_ref_s{seed}"
    rec = folder.with_suffix(".json")
    if (folder / "done").is_file() and rec.is_file():
        record = json.loads(rec.read_text())
        if record.get("sizes") == regvi.RegVI.preset("default"):
            model = regvi.load(str(folder), adata[~is_query].copy())
            return model, record, adata, is_query
        print(f"{split} reference seed {seed}: trained at other sizes; retraining", flush=True)
    ref_adata = adata[~is_query].copy()
    model = regvi.RegVI(ref_adata, library_key=key)
    t0 = time.perf_counter()
    history = model.train(progress_bar=False, seed=seed)
    record = {
        "ref_train_s": round(time.perf_counter() - t0, 1),
        "ref_epochs": _history_len(history),
        "sizes": {"n_hidden": model.config.n_hidden, "n_latent": model.config.n_latent},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(folder), overwrite=True)
    (folder / "done").write_text("ok")
    rec.write_text(json.dumps(record))
    return model, record, adata, is_query


def train_regvi_map(split: str, method: str, seed: int, threads: int) -> None:
    import regvi

    ref, ref_record, adata, is_query = train_regvi_reference(split, seed, threads)
    ref_adata, query_adata = adata[~is_query].copy(), adata[is_query].copy()
    fine_tune = ["conditioning", "encoder"] if method == "regvi_map_ft" else None
    q = regvi.RegVI.load_query_data(query_adata, ref, fine_tune=fine_tune)
    t0 = time.perf_counter()
    history = q.train(progress_bar=False, seed=seed)
    wall = time.perf_counter() - t0
    z_query = q.get_latent_representation()
    latent = np.zeros((adata.n_obs, z_query.shape[1]), dtype=np.float32)
    latent[is_query] = z_query
    if fine_tune:
        latent[~is_query] = q.get_latent_representation(ref_adata)
    else:
        latent[~is_query] = ref.get_latent_representation(ref_adata)
    record = {
        **ref_record,
        "query_train_s": round(wall, 1),
        "query_epochs": _history_len(history),
        "fine_tune": fine_tune,
    }
    _store(*_cached(split, method, seed), latent, record)


def train_regvi_denovo(split: str, seed: int, threads: int) -> None:
    import torch

    import regvi

    torch.set_num_threads(threads)
    adata, _, _ = load_split(split)
    model = regvi.RegVI(adata, library_key=SPLITS[split][1])
    t0 = time.perf_counter()
    history = model.train(progress_bar=False, seed=seed)
    record = {"train_s": round(time.perf_counter() - t0, 1), "epochs": _history_len(history)}
    _store(*_cached(split, "regvi_denovo", seed), model.get_latent_representation(), record)


def train_regvi_multi_map(split: str, seed: int, threads: int) -> None:
    """RegMultiVI reference on RNA + ATAC of the reference libraries, RNA-only query."""
    import anndata as ad
    import torch

    import regvi

    if not hasattr(regvi.RegMultiVI, "load_query_data"):
        raise SystemExit(
            "split mop_multiome: regvi.RegMultiVI.load_query_data does not exist yet; skipped"
        )
    torch.set_num_threads(threads)
    rna, is_query, _ = load_split(split)
    atac = ad.read_h5ad(SHARED / "mop_snareseq2_atac.h5ad")
    if not np.array_equal(atac.obs_names, rna.obs_names):
        raise SystemExit("mop_multiome: ATAC and RNA cells differ")
    atac.obs[SPLITS[split][1]] = rna.obs[SPLITS[split][1]].to_numpy()
    key = SPLITS[split][1]
    ref = regvi.RegMultiVI(
        {"rna": rna[~is_query].copy(), "atac": atac[~is_query].copy()},
        library_key=key,
        n_hidden=N_HIDDEN,
        n_latent=N_LATENT,
    )
    t0 = time.perf_counter()
    history = ref.train(progress_bar=False, seed=seed)
    ref_wall = time.perf_counter() - t0
    q = regvi.RegMultiVI.load_query_data({"rna": rna[is_query].copy()}, ref)
    t0 = time.perf_counter()
    q_history = q.train(progress_bar=False, seed=seed)
    wall = time.perf_counter() - t0
    z_ref = ref.get_latent_representation(modality="rna")
    z_query = q.get_latent_representation(modality="rna")
    latent = np.zeros((rna.n_obs, z_ref.shape[1]), dtype=np.float32)
    latent[~is_query], latent[is_query] = z_ref, z_query
    record = {
        "ref_train_s": round(ref_wall, 1),
        "ref_epochs": _history_len(history),
        "query_train_s": round(wall, 1),
        "query_epochs": _history_len(q_history),
        "latent": "RNA block of the joint latent",
    }
    _store(*_cached(split, "regvi_multi_map", seed), latent, record)


# ------------------------------------------------------------------ scvi-tools
def train_scvi(split: str, method: str, seed: int, threads: int, python: Path) -> None:
    from _common import check_scvi_python, run_script  # next to this file

    check_scvi_python(python)
    _, key, _ = SPLITS[split]
    _, _, query = load_split(split)
    npy, _ = _cached(split, method, seed)
    npy.parent.mkdir(parents=True, exist_ok=True)
    mode = "arches" if method == "scarches" else "denovo"
    args = [mode, data_path(split), key, ",".join(query), N_HIDDEN, N_LATENT, seed, threads]
    args.append(npy.with_suffix(""))
    run_script(python, "mapping_scvi_child.py", args, npy.with_suffix(".log"))


#: bench_mapping method → the bench_quality method that trains the same model on the same cells
QUALITY_METHOD = {"scvi_denovo": "scvi", "regvi_denovo": "regvi"}


def reuse_quality(split: str, method: str, seed: int) -> bool:
    """Copy bench_quality's de novo latent (SCVI or regvi defaults) of the same prepared file
    and seed, if cached; the record names where it came from."""
    src = QUALITY_CACHE / SPLITS[split][0] / f"{QUALITY_METHOD[method]}_s{seed}"
    if not (src.with_suffix(".npy").is_file() and src.with_suffix(".json").is_file()):
        return False
    npy, rec = _cached(split, method, seed)
    npy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src.with_suffix(".npy"), npy)
    record = json.loads(src.with_suffix(".json").read_text())
    record["reused_from"] = str(src.relative_to(REPO))
    rec.write_text(json.dumps(record))
    return True


# ------------------------------------------------------------------ scoring
def _method_of(emb: str) -> str:
    head, _, tail = emb.rpartition("_s")
    return head if head and tail.isdigit() else emb


def score(split: str, n_jobs: int) -> dict[str, dict[str, Any]]:
    """Label transfer and one Benchmarker over every cached latent of ``split``."""
    from _common import benchmarker_scores  # next to this file
    from bench_quality import pca_of

    from regvi.map.labels import transfer_accuracy, transfer_labels

    adata, is_query, _ = load_split(split)
    _, key, label = SPLITS[split]
    labels = adata.obs[label].astype(str).to_numpy()
    pca = CACHE / split / "pca.npy"
    if not pca.is_file():
        np.save(pca, pca_of(adata))
    adata.obsm["X_pca"] = np.load(pca)
    adata.obsm["pca"] = adata.obsm["X_pca"]
    keys, out = [], {}
    embeddings = [("pca", adata.obsm["X_pca"])]
    embeddings += [(f.stem, np.load(f)) for f in sorted((CACHE / split).glob("*_s[0-9]*.npy"))]
    for emb, z in embeddings:
        adata.obsm[emb] = z
        keys.append(emb)
        out[emb] = {}
        for field, threshold in (("transfer", 0.5), ("transfer_t0", 0.0)):
            table = transfer_labels(
                z[~is_query], labels[~is_query], z[is_query], threshold=threshold
            )
            out[emb][field] = transfer_accuracy(labels[is_query], table["label"].to_numpy())
    scib = benchmarker_scores(adata, key, label, keys, n_jobs)
    for emb, row in scib.items():
        out.setdefault(emb, {})["scib"] = row
    return out


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "worst": float(a.min()),
    }


def summarise(split: str, scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    methods: dict[str, list[str]] = {}
    for emb in scores:
        methods.setdefault(_method_of(emb), []).append(emb)
    out: dict[str, Any] = {}
    for method, embs in methods.items():
        recs = []
        for e in embs:
            rec = CACHE / split / f"{e}.json"
            recs.append(json.loads(rec.read_text()) if rec.is_file() else {})
        row: dict[str, Any] = {"n_seeds": len(embs), "seeds": embs}
        total = [scores[e]["scib"]["Total"] for e in embs]
        row["scib_total"] = _stats(total)
        row["worst_seed_total"] = embs[int(np.argmin(total))]
        row["scib_bio"] = float(np.mean([scores[e]["scib"]["Bio conservation"] for e in embs]))
        row["scib_batch"] = float(np.mean([scores[e]["scib"]["Batch correction"] for e in embs]))
        if all("transfer" in scores[e] for e in embs):
            f1 = [scores[e]["transfer"]["macro_f1"] for e in embs]
            row["macro_f1"] = _stats(f1)
            row["worst_seed_f1"] = embs[int(np.argmin(f1))]
            row["accuracy"] = _stats([scores[e]["transfer"]["accuracy"] for e in embs])
            row["macro_f1_t0"] = _stats([scores[e]["transfer_t0"]["macro_f1"] for e in embs])
            row["accuracy_t0"] = _stats([scores[e]["transfer_t0"]["accuracy"] for e in embs])
            row["fraction_unknown"] = float(
                np.mean([scores[e]["transfer"]["fraction_unknown"] for e in embs])
            )
        for field in ("train_s", "epochs", "ref_train_s", "ref_epochs", "query_train_s"):
            vals = [r[field] for r in recs if r.get(field) is not None]
            row[field] = float(np.mean(vals)) if vals else None
        vals = [r["query_epochs"] for r in recs if r.get("query_epochs") is not None]
        row["query_epochs"] = float(np.mean(vals)) if vals else None
        if any(r.get("reused_from") for r in recs):
            source = QUALITY_METHOD.get(method, method)
            row["reused_from"] = f"bench_quality cache (same prepared data, method {source})"
        out[method] = row
    return out


def goals(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    s, out = summary, []
    if "regvi_map" in s and "scarches" in s and "macro_f1" in s["scarches"]:
        a, b = s["regvi_map"]["macro_f1"]["mean"], s["scarches"]["macro_f1"]["mean"]
        out.append(("label-transfer macro-F1 regvi_map >= scarches", a >= b, f"{a:.3f} vs {b:.3f}"))
    if "regvi_map" in s and "regvi_denovo" in s:
        a, b = s["regvi_map"]["scib_total"]["mean"], s["regvi_denovo"]["scib_total"]["mean"]
        out.append(
            ("scib Total regvi_map >= regvi_denovo - 0.02", a >= b - 0.02, f"{a:.3f} vs {b:.3f}")
        )
    if "regvi_map" in s and "regvi_denovo" in s and s["regvi_denovo"]["train_s"]:
        a, b = s["regvi_map"]["query_train_s"], s["regvi_denovo"]["train_s"]
        out.append(
            (
                "regvi query time <= 0.2 x regvi de novo time",
                a <= 0.2 * b,
                f"{a:.0f} s vs {b:.0f} s",
            )
        )
    return out


def plot(split: str, summary: dict[str, Any], title: str) -> Path:
    """Bars of macro-F1, scib Total and fitting time (query fit for mapping methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.plots import save_figure

    order = [m for m in (*METHODS, *MULTI_METHODS, "pca") if m in summary]
    colours = {
        "regvi_map": "#1f77b4",
        "regvi_map_ft": "#6baed6",
        "regvi_denovo": "#08306b",
        "regvi_multi_map": "#9467bd",
        "scarches": "#ff7f0e",
        "scvi_denovo": "#a63603",
        "pca": "#999999",
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [
        ("label transfer macro-F1 (query)", lambda r: r.get("macro_f1")),
        ("scib Total (reference + query)", lambda r: r.get("scib_total")),
    ]
    for ax, (name, get) in zip(axes[:2], panels, strict=False):
        ms = [m for m in order if get(summary[m])]
        means = [get(summary[m])["mean"] for m in ms]
        sds = [get(summary[m])["sd"] for m in ms]
        ax.bar(range(len(ms)), means, yerr=sds, color=[colours[m] for m in ms], capsize=3)
        for i, v in enumerate(means):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        lo = min(means) - 0.1
        ax.set_ylim(max(0.0, lo), min(1.0, max(means) + 0.05))
        ax.set_xticks(range(len(ms)), ms, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
    ax = axes[2]
    ms = [m for m in order if m != "pca"]
    vals, hatch = [], []
    for m in ms:
        r = summary[m]
        if m in MAPPING:
            vals.append(r.get("query_train_s") or 0.0)
            hatch.append("")
        else:
            vals.append(r.get("train_s") or 0.0)
            hatch.append("//")
    bars = ax.bar(range(len(ms)), vals, color=[colours[m] for m in ms])
    for b, h in zip(bars, hatch, strict=True):
        b.set_hatch(h)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    names = [f"{m}*" if summary[m].get("reused_from") else m for m in ms]
    ax.set_xticks(range(len(ms)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("s (1 thread; * = bench_quality's run)", fontsize=8)
    ax.set_title("fit time: query fit (plain) / de novo on all cells (hatched)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    PNG_DIR.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, PNG_DIR / f"mapping_{split}.png", dpi=130)


# ------------------------------------------------------------------ main
def _fmt(r: dict[str, Any] | None) -> str:
    return f"{r['mean']:.3f} ± {r['sd']:.3f} ({r['worst']:.3f})" if r else "-"


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="mop,kang_sample")
    p.add_argument("--methods", default=None, help="default: every method of the split")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-jobs", type=int, default=1, help="Benchmarker neighbour-search jobs")
    p.add_argument("--scvi-python", type=Path, default=SCVI_PYTHON)
    p.add_argument(
        "--reuse-quality",
        action="store_true",
        help="reuse bench_quality's de novo SCVI and regvi latents",
    )
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--score-only", action="store_true")
    p.add_argument("--force", action="store_true", help="retrain cached latents")
    p.add_argument("--out", type=Path, default=OUT)
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    splits = args.splits.split(",")
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        p.error(f"--splits: unknown {bad}; expected some of {list(SPLITS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.score_only:
        for split in splits:
            train_split(split, seeds, args, p)
    if args.train_only:
        return
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
            f"{args.threads} torch thread(s)",
            "command": "benchmarks/bench_mapping.py " + " ".join(sys.argv[1:]),
            "scib": "scib-metrics Benchmarker, defaults, min_max_scale=False, one per split "
            "over all cells (reference + query), batch = the library key",
            "label_transfer": "regvi.map.labels.transfer_labels defaults (15 neighbours, "
            "distance weighting, threshold 0.5: 'unknown' counts as wrong; *_t0: threshold 0, "
            "no unknown calls) on the joint latent, reference labels → query cells; "
            "transfer_accuracy vs true query labels",
        }
    )
    doc.setdefault("splits", {})
    for split in splits:
        if not (CACHE / split).is_dir() or not list((CACHE / split).glob("*_s[0-9]*.npy")):
            print(f"{split}: nothing cached; skipped")
            continue
        title, summary, checked = score_split(split, args.n_jobs, doc)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))
        print(title)
        print_summary(summary, checked)
    print(f"wrote {args.out} and {PNG_DIR.relative_to(REPO)}/mapping_<split>.png")


def _stale_regvi(method: str, npy: Path) -> bool:
    """A cached regvi latent (RNA split) of another latent size than the current default:
    trained before a default changed, so it is retrained."""
    if method not in ("regvi_map", "regvi_map_ft", "regvi_denovo"):
        return False
    import regvi

    n_latent = regvi.RegVI.preset("default")["n_latent"]
    if np.load(npy, mmap_mode="r").shape[1] == n_latent:
        return False
    print(f"{npy.name}: latent size differs from the default {n_latent}; retraining", flush=True)
    return True


def train_split(
    split: str, seeds: list[int], args: argparse.Namespace, p: argparse.ArgumentParser
) -> None:
    """Train the latents of ``split`` that are not cached (all with ``--force``)."""
    default = MULTI_METHODS if split == "mop_multiome" else METHODS
    methods = args.methods.split(",") if args.methods else list(default)
    if split == "mop_multiome":
        import regvi

        if not hasattr(regvi.RegMultiVI, "load_query_data"):
            print("mop_multiome: regvi.RegMultiVI.load_query_data missing; skipped")
            return
    for seed in seeds:
        for method in methods:
            npy, _ = _cached(split, method, seed)
            if npy.is_file() and not args.force and not _stale_regvi(method, npy):
                continue
            t0 = time.perf_counter()
            if (
                method in QUALITY_METHOD
                and args.reuse_quality
                and reuse_quality(split, method, seed)
            ):
                pass
            elif method in ("regvi_map", "regvi_map_ft"):
                train_regvi_map(split, method, seed, args.threads)
            elif method == "regvi_denovo":
                train_regvi_denovo(split, seed, args.threads)
            elif method == "regvi_multi_map":
                train_regvi_multi_map(split, seed, args.threads)
            elif method in ("scarches", "scvi_denovo"):
                train_scvi(split, method, seed, args.threads, args.scvi_python)
            else:
                p.error(f"--methods: unknown {method!r}")
            print(
                f"trained {split} {method} seed {seed}: {time.perf_counter() - t0:.0f} s",
                flush=True,
            )


def score_split(
    split: str, n_jobs: int, doc: dict[str, Any]
) -> tuple[str, dict[str, Any], list[tuple[str, bool, str]]]:
    """Score the cached latents of ``split``, plot them and record them in ``doc["splits"]``:
    the split's title line, its summary and its checked goals."""
    adata, is_query, query = load_split(split)
    key = SPLITS[split][1]
    scores = score(split, n_jobs)
    summary = summarise(split, scores)
    ref_libs = sorted(set(adata.obs[key].astype(str)) - set(query))
    title = (
        f"{split}: reference {len(ref_libs)} libraries ({(~is_query).sum()} cells), "
        f"query {', '.join(query)} ({is_query.sum()} cells)"
    )
    png = plot(split, summary, title)
    checked = goals(summary)
    doc["splits"][split] = {
        "library_key": key,
        "query_libraries": query,
        "reference_libraries": ref_libs,
        "n_reference_cells": int((~is_query).sum()),
        "n_query_cells": int(is_query.sum()),
        "summary": summary,
        "scores": scores,
        "goals": [{"goal": g, "met": bool(ok), "values": v} for g, ok, v in checked],
        "png": str(png.relative_to(REPO)),
    }
    return title, summary, checked


def print_summary(summary: dict[str, Any], checked: list[tuple[str, bool, str]]) -> None:
    """The summary table of one split and its goals, on stdout."""
    print(
        f"{'method':<16} {'n':>2} {'macro-F1 mean ± sd (worst)':>27} {'F1 thr 0':>22} "
        f"{'scib Total':>22} {'ref s':>6} {'query s':>7} {'q ep':>5} {'de novo s':>9} {'ep':>4}"
    )
    order = [m for m in (*METHODS, *MULTI_METHODS, "pca") if m in summary]
    for m in order:
        r = summary[m]

        def num(v: Any, fmt: str = ".0f") -> str:
            return format(v, fmt) if v is not None else "-"

        print(
            f"{m:<16} {r['n_seeds']:>2} {_fmt(r.get('macro_f1')):>27} "
            f"{_fmt(r.get('macro_f1_t0')):>22} {_fmt(r['scib_total']):>22} "
            f"{num(r['ref_train_s']):>6} {num(r['query_train_s']):>7} "
            f"{num(r['query_epochs']):>5} {num(r['train_s']):>9} {num(r['epochs']):>4}"
        )
    for g, ok, v in checked:
        print(f"  {'ok  ' if ok else 'MISS'} {g}: {v}")


if __name__ == "__main__":
    main()
