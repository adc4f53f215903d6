"""Helpers shared by the benchmark scripts (stdlib-only at module level).

Child processes, thread caps, peak RSS, library versions, the scib-metrics preparation and
scoring, regvi settings with ``"$library"`` placeholders, and fixed-width tables. The module
imports only the standard library at module level, so the scvi-tools children (another
virtualenv, no regvi) can import it too; the scripts find it next to themselves
(``sys.path[0]`` is ``benchmarks/`` when a script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
#: interpreter of the scvi-tools virtualenv made by ``benchmarks/setup_scvi_env.sh``
DEFAULT_SCVI_PYTHON = REPO_ROOT / "benchmarks" / ".venv-scvi" / "bin" / "python"
#: placeholder in a setting's model options for the dataset's library (batch) key
LIBRARY_PLACEHOLDER = "$library"
#: torch / BLAS threads of the CPU benchmarks' training children
N_THREADS = 2
SEED = 0
#: fraction of the cells trained on (the rest validates after every epoch)
TRAIN_SIZE = 0.9
#: minibatch size of ``get_latent_representation``
LATENT_BATCH_SIZE = 1024
#: ``pgrep -f`` pattern of processes whose presence makes CPU timings worthless
CPU_COMPETITORS = "bench_multivi|bench_scale|regvi.sweep|pytest"


# --------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Arch:
    """Encoder/decoder architecture (``n_hidden``, ``n_latent``, ``n_layers``)."""

    n_hidden: int
    n_latent: int
    n_layers: int = 1

    @property
    def name(self) -> str:
        """Short identifier, e.g. ``h128_l10``."""
        return f"h{self.n_hidden}_l{self.n_latent}"

    def sizes(self) -> dict[str, int]:
        """``n_hidden``, ``n_latent`` and ``n_layers`` as keyword arguments of a model."""
        return {"n_hidden": self.n_hidden, "n_latent": self.n_latent, "n_layers": self.n_layers}


def parse_archs(spec: str) -> list[Arch]:
    """Parse an architecture list such as ``"128x10,512x128"`` (``n_layers=1``)."""
    archs = []
    for item in spec.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            hidden, latent = item.split("x")
            archs.append(Arch(int(hidden), int(latent)))
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"bad architecture {item!r}; expected e.g. 128x10,512x128"
            ) from err
    if not archs:
        raise argparse.ArgumentTypeError("no architecture given")
    return archs


def parse_ints(spec: str) -> list[int]:
    """Parse ``"128,1024"`` into ``[128, 1024]`` (positive integers)."""
    try:
        out = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"bad integer list {spec!r}") from err
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {spec!r}")
    return out


def lr_for(batch_size: int, base_lr: float, scaling: str, reference: int = 128) -> float:
    """The lr at ``batch_size``: linear scaling from batch ``reference`` (``"linear"``) or not."""
    return base_lr * batch_size / reference if scaling == "linear" else base_lr


def resolve_setting(model_options: Mapping[str, Any], library_key: str) -> dict[str, Any]:
    """A setting's model options with ``"$library"`` replaced by ``library_key``.

    The placeholder is replaced where it is the whole value and where it is an item of a list
    or tuple value (``{"nn_conditioning_covariate_keys": ["$library"]}``).
    """

    def resolve(v: Any) -> Any:
        if isinstance(v, str):
            return library_key if v == LIBRARY_PLACEHOLDER else v
        if isinstance(v, list | tuple):
            return [resolve(x) for x in v]
        return v

    return {k: resolve(v) for k, v in model_options.items()}


def regvi_model_kwargs(
    setting: Mapping[str, Any], library_key: str, preset: str | None = None
) -> dict[str, Any]:
    """``RegVI(...)`` keyword arguments of a setting: the preset's sizes, then its model options.

    ``preset`` defaults to the setting's own ``"preset"`` (else ``"default"``); the setting's
    ``"model"`` options (``"$library"`` resolved) override the preset's sizes.
    """
    import regvi

    sizes = regvi.RegVI.preset(preset or setting.get("preset", "default"))
    return {**sizes, **resolve_setting(setting.get("model", {}), library_key)}


# --------------------------------------------------------------------------- memory, threads


def _proc_status_kib(field: str) -> int | None:
    """Read a ``kB`` field (``VmHWM``, ``VmRSS``) from ``/proc/self/status``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``VmHWM``, else ``ru_maxrss``)."""
    hwm = _proc_status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024.0


def current_rss_mib() -> float | None:
    """Current resident set size of this process in MiB (``None`` if unknown)."""
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024.0


def set_threads(n: int) -> None:
    """Pin torch to ``n`` intra-op threads and one inter-op thread."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set by an imported library
        pass


def child_env(n_threads: int) -> dict[str, str]:
    """Environment for child processes: BLAS / OpenMP thread caps, quiet warnings, CPU JAX."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(n_threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


# --------------------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    """Parent pid from ``/proc`` (``None`` if unknown)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def competitors(pattern: str) -> list[str]:
    """Command lines of running processes matching ``pattern`` (would disturb timings)."""
    try:
        res = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    except OSError:
        return []
    own = {os.getpid(), os.getppid()}
    out = []
    for line in res.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        # "flock LOCK cmd" waits for the CPU lock (its cmd, once running, is listed itself);
        # an orphaned mlflow server left by a killed test idles
        if not pid.isdigit() or int(pid) in own or cmd.startswith("flock "):
            continue
        if "mlflow server" in cmd and _ppid(int(pid)) == 1:
            continue
        out.append(cmd[:200])
    return out


def loadavg() -> float | None:
    """The 1-minute load average (``None`` where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def launch(
    script: str | Path,
    python: str,
    child_args: list[str],
    log: Path,
    record: Path,
    *,
    n_threads: int = N_THREADS,
    competitor_pattern: str | None = None,
    tag: str = "bench",
) -> dict[str, Any]:
    """Run ``script`` as a child under ``python`` and collect the JSON record it writes.

    Parameters
    ----------
    script
        The child's script (usually the caller's own file).
    python
        Interpreter to run the child with.
    child_args
        Arguments after the script path (``--record RECORD`` is appended).
    log
        File receiving the child's stdout and stderr.
    record
        JSON file the child writes on success.
    n_threads
        BLAS / OpenMP thread cap of the child.
    competitor_pattern
        ``pgrep -f`` pattern of processes that would disturb the timing; when given, the
        record gets ``contention`` (matching processes and the 1-min load average before and
        after) and a warning is printed when any run.
    tag
        Prefix of the printed warnings.

    Returns
    -------
    dict
        The child's record plus ``wall_s``, or ``{"error": ..., "log_tail": ..., "wall_s":
        ...}`` on failure.
    """
    cmd = [python, str(Path(script).resolve()), *child_args, "--record", str(record)]
    before = competitors(competitor_pattern) if competitor_pattern else []
    load0 = loadavg()
    if before:
        print(f"[{tag}] WARNING: competing processes running: {before}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(n_threads),
            cwd=REPO_ROOT,
            check=False,
        )
    wall = time.perf_counter() - t0
    extra: dict[str, Any] = {"wall_s": wall}
    if competitor_pattern:
        after = competitors(competitor_pattern)
        extra["contention"] = {
            "before": before,
            "after": after,
            "loadavg_1min_before": load0,
            "loadavg_1min_after": loadavg(),
        }
        if after and not before:
            print(f"[{tag}] WARNING: competing processes appeared: {after}", flush=True)
    if proc.returncode != 0 or not record.exists():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-60:])
        return {"error": f"exit code {proc.returncode}", "log_tail": tail, **extra}
    return {**json.loads(record.read_text()), **extra}


def launch_cpu_timed(
    script: str | Path,
    python: str,
    child_args: list[str],
    log: Path,
    record: Path,
    tag: str = "bench",
) -> dict[str, Any]:
    """:func:`launch` of a CPU timing child: :data:`N_THREADS` threads, and the record's
    ``contention`` names the :data:`CPU_COMPETITORS` running before and after."""
    return launch(
        script, python, child_args, log, record, competitor_pattern=CPU_COMPETITORS, tag=tag
    )


def check_scvi_python(python: Path) -> None:
    """FileNotFoundError naming the setup script when the scvi-tools interpreter is missing."""
    if not python.is_file():
        raise FileNotFoundError(
            f"scvi-tools virtualenv {python} missing: run benchmarks/setup_scvi_env.sh"
        )


def run_script(python: Path, script: str, args: Sequence[Any], log: Path) -> None:
    """Run ``benchmarks/<script>`` with ``args`` under ``python``, its stdout and stderr to
    ``log``; CalledProcessError if it fails."""
    with log.open("w") as fh:
        subprocess.run(
            [str(python), str(REPO_ROOT / "benchmarks" / script), *map(str, args)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=True,
        )


def add_run_args(p: argparse.ArgumentParser, out: Path) -> None:
    """Options shared by the scripts that train children and score with scib-metrics."""
    p.add_argument("--scvi-python", default=str(DEFAULT_SCVI_PYTHON),
                   help="interpreter of the scvi-tools venv (benchmarks/setup_scvi_env.sh)")  # fmt: skip
    p.add_argument("--skip-scib", action="store_true", help="skip the scib-metrics evaluation")
    p.add_argument("--n-jobs", type=int, default=2, help="scib neighbour-search jobs")
    p.add_argument("--out", default=str(out), help="JSON results path")
    p.add_argument("--workdir", default=None, help="keep intermediate files here")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the temp workdir")
    # child-only options
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--latent-out", help=argparse.SUPPRESS)


def dispatch(
    parser: argparse.ArgumentParser,
    run_child: Callable[[argparse.Namespace], int],
    run_parent: Callable[[argparse.Namespace], int],
    argv: list[str] | None = None,
) -> int:
    """Parse ``argv``: a child step where ``--child`` is given, else the parent benchmark."""
    args = parser.parse_args(argv)
    return run_child(args) if args.child else run_parent(args)


def write_record(args: argparse.Namespace, rec: dict[str, Any]) -> int:
    """End of a child: add the interpreter to ``rec`` and write it to ``--record`` as JSON."""
    rec["python"] = sys.executable
    Path(args.record).write_text(json.dumps(rec, indent=2))
    return 0


def workdir_for(workdir: str | None, prefix: str) -> Path:
    """``--workdir`` (created), or a new temporary folder named ``prefix…``."""
    import tempfile

    if workdir:
        path = Path(workdir).resolve()
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"[bench] workdir {path}", flush=True)
    return path


# --------------------------------------------------------------------------- versions


def git_commit() -> str | None:
    """The repository's ``HEAD`` commit (``None`` outside a git checkout)."""
    res = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.stdout.strip() or None if res.returncode == 0 else None


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def versions(scvi_python: str | None = None) -> dict[str, str | None]:
    """Library versions in this interpreter (regvi side) and, if given, in the scvi venv.

    The scvi venv's versions are ``scvi-tools`` and ``<package>_scvi_venv`` for torch,
    lightning, mudata, anndata and python (``None`` where a package is missing).
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "regvi", "scib-metrics", "scanpy", "anndata", "lightning"):
        out[pkg] = _version(pkg)
    out["git_commit"] = git_commit()
    if scvi_python and Path(scvi_python).exists():
        code = (
            "import json, platform; from importlib import metadata as m\n"
            "def v(p):\n"
            "    try:\n        return m.version(p)\n"
            "    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({**{p: v(p) for p in "
            "('scvi-tools', 'torch', 'lightning', 'mudata', 'anndata')}, "
            "'python': platform.python_version()}))"
        )
        res = subprocess.run([scvi_python, "-c", code], capture_output=True, text=True, check=False)
        if res.returncode == 0:
            other = json.loads(res.stdout.strip().splitlines()[-1])
            out["scvi-tools"] = other.pop("scvi-tools")
            out.update({f"{k}_scvi_venv": v for k, v in other.items()})
    return out


def host() -> dict[str, Any]:
    """Platform, machine, processor and CPU count of this host."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }


# --------------------------------------------------------------------------- training records


def epoch_timer() -> Any:
    """A Lightning callback recording the wall time of every epoch (training + validation)."""
    import lightning

    class EpochTimer(lightning.pytorch.Callback):
        """Wall time per epoch, training plus validation."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            # Lightning 2.x runs the validation loop before this hook.
            self.times.append(time.perf_counter() - self._t0)

    return EpochTimer()


def scvi_train_kwargs(epochs: int, batch_size: int, timer: Any) -> dict[str, Any]:
    """``train`` arguments of the scvi-tools models: fixed epochs, validation after every
    epoch, CPU, quiet, the epoch ``timer`` (:func:`epoch_timer`)."""
    return {
        "max_epochs": epochs,
        "batch_size": batch_size,
        "train_size": TRAIN_SIZE,
        "early_stopping": False,
        "check_val_every_n_epoch": 1,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "callbacks": [timer],
    }


@dataclass
class TrainedRun:
    """What a training child measured: the latent, training wall time, epochs run, per-epoch
    times and the RSS before training."""

    z: Any
    train_s: float
    epochs_run: int
    epoch_times: list[float]
    rss_before: float | None

    def timing(self, epochs: int) -> dict[str, Any]:
        """The :func:`timing_record` of this run (``epochs`` requested)."""
        return timing_record(
            self.train_s, epochs, self.epochs_run, self.epoch_times, self.rss_before
        )


def timed(train: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """``train()``'s result, its wall time in seconds and this process's RSS (MiB) before it."""
    rss_before = current_rss_mib()
    t0 = time.perf_counter()
    result = train()
    return result, time.perf_counter() - t0, rss_before


def last_values(hist: Any) -> dict[str, float]:
    """Last-epoch numeric values of a regvi history ``DataFrame``."""
    final: dict[str, float] = {}
    if len(hist):
        for k, v in hist.iloc[-1].items():
            try:
                final[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
    return final


def regvi_history_record(hist: Any) -> dict[str, Any]:
    """A regvi training child's ``regvi`` version, ``history_columns`` and ``final`` values."""
    import regvi

    return {
        "regvi": getattr(regvi, "__version__", "unknown"),
        "history_columns": [str(c) for c in hist.columns],
        "final": last_values(hist),
    }


def history_epoch_times(hist: Any) -> list[float]:
    """Per-epoch wall times of a regvi history (empty where not recorded)."""
    return [float(t) for t in hist["epoch_time_s"]] if "epoch_time_s" in hist.columns else []


def save_latent(z: Any, shape: tuple[int, int], path: Path) -> None:
    """Check a latent (shape, finite) and save it as float32 ``.npy``."""
    import numpy as np

    z = np.asarray(z, dtype=np.float32)
    if z.shape != shape:
        raise ValueError(f"latent has shape {z.shape}, expected {shape}")
    if not np.isfinite(z).all():
        raise ValueError("latent contains non-finite values")
    np.save(path, z)


def timing_record(
    train_s: float,
    epochs: int,
    epochs_run: int,
    epoch_times: Sequence[float],
    rss_before: float | None,
) -> dict[str, Any]:
    """Timing and memory fields of a training child's record."""
    import numpy as np

    return {
        "train_s": train_s,
        "epochs_requested": epochs,
        "epochs_run": int(epochs_run),
        "s_per_epoch": train_s / max(int(epochs_run), 1),
        "epoch_times_s": list(epoch_times),
        "median_epoch_s": float(np.median(epoch_times)) if len(epoch_times) else None,
        "min_epoch_s": float(np.min(epoch_times)) if len(epoch_times) else None,
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }


# --------------------------------------------------------------------------- scib-metrics


def prepare_for_scib(
    adata: Any,
    latents: Mapping[str, Any],
    *,
    pca: Any = None,
    pca_key: str | None = "Unintegrated",
) -> list[str]:
    """Make ``adata`` ready for :func:`benchmarker_scores`; returns the obsm keys to score.

    Without ``pca``, ``X`` is log-normalised in place (float32, ``normalize_total`` 1e4,
    ``log1p``) and ``obsm["X_pca"]`` computed with the call ``Benchmarker.prepare`` makes
    without a pre-integrated key (arpack, 50 components); with ``pca`` that array (computed
    the same way earlier) becomes ``obsm["X_pca"]``. The PCA is stored under ``pca_key`` as
    well, so that the reference gets its own row, and every latent (a ``.npy`` path or an
    array) under its name.
    """
    import numpy as np

    if pca is None:
        import scanpy as sc

        adata.X = adata.X.astype(np.float32)
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.tl.pca(adata, svd_solver="arpack", mask_var=None)
    else:
        adata.obsm["X_pca"] = np.asarray(pca)
    keys = []
    if pca_key:
        adata.obsm[pca_key] = adata.obsm["X_pca"]
        keys.append(pca_key)
    for name, value in latents.items():
        adata.obsm[name] = np.load(value) if isinstance(value, str | Path) else np.asarray(value)
        keys.append(name)
    return keys


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


#: scib-metrics' Bio metrics (clean names) whose mean is "Bio conservation"
BENCHMARKER_BIO = ("Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI")


def add_stable_totals(
    scores: dict[str, dict[str, float]],
    latents: Mapping[str, Any],
    labels: Any,
    starts: int | None = None,
) -> None:
    """Add the KMeans-start averages to Benchmarker rows, in place.

    For each embedding in both ``scores`` and ``latents`` (name → array): ``KMeans NMI
    (mean)`` / ``KMeans ARI (mean)`` over scib-metrics' KMeans started with seeds
    0..``starts``-1 (default ``evaluation.scib.KMEANS_STARTS``; seed 0 is the Benchmarker's
    own, already in the row), and ``Bio conservation (stable)`` / ``Total (stable)``: the
    row's Bio and Total with those means in place of the single start's values
    (``evaluation.scib``'s ``scib_total_stable``).
    """
    import numpy as np

    from evaluation.scib import BATCH_WEIGHT, BIO_WEIGHT, KMEANS_STARTS, start_averaged

    starts = KMEANS_STARTS if starts is None else starts
    for emb, row in scores.items():
        if emb not in latents or "KMeans NMI" not in row:
            continue
        first = (row["KMeans NMI"], row["KMeans ARI"])
        nmi, ari = start_averaged(np.asarray(latents[emb]), labels, first, starts)
        means = {"KMeans NMI": nmi, "KMeans ARI": ari}
        bio = float(np.nanmean([means.get(m, row[m]) for m in BENCHMARKER_BIO]))
        row.update(
            {
                "KMeans NMI (mean)": nmi,
                "KMeans ARI (mean)": ari,
                "KMeans starts": float(starts),
                "Bio conservation (stable)": bio,
                "Total (stable)": BIO_WEIGHT * bio + BATCH_WEIGHT * row["Batch correction"],
            }
        )


def score_latents(
    h5ad: Path,
    latents: Mapping[str, Any],
    batch_key: str,
    label_key: str,
    n_jobs: int,
) -> dict[str, dict[str, float]]:
    """Read raw counts from ``h5ad`` and score ``latents`` plus the "Unintegrated" PCA."""
    import anndata as ad

    adata = ad.read_h5ad(h5ad)
    keys = prepare_for_scib(adata, latents)
    return benchmarker_scores(adata, batch_key, label_key, keys, n_jobs)


def scib_row(scores: Mapping[str, float]) -> dict[str, float | None]:
    """``bio`` / ``batch`` / ``total`` of one embedding's scib scores (``None`` if missing)."""
    return {
        "bio": scores.get("Bio conservation"),
        "batch": scores.get("Batch correction"),
        "total": scores.get("Total"),
    }


# --------------------------------------------------------------------------- tables


def fmt(v: Any, spec: str) -> str:
    """Format ``v`` with ``spec``, or a right-aligned ``-`` of the same width when missing."""
    if v is None:
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
        return "-".rjust(width)
    return format(v, spec)


#: a table column: header, format spec (its width sets the header's), and the row key or a
#: function of the row
Column = tuple[str, str, "str | Callable[[Mapping[str, Any]], Any]"]


#: the scib columns of the result tables (rows with ``bio`` / ``batch`` / ``total``)
SCIB_COLUMNS: list[Column] = [
    ("Bio", "6.3f", "bio"),
    ("Batch", "6.3f", "batch"),
    ("Total", "6.3f", "total"),
]


def parse_columns(spec: str) -> list[Column]:
    """Columns written as a text table, one per line: title, format and row key, separated
    by two or more spaces (``"regvi s/ep   10.2f  regvi_s_per_epoch"``)."""
    out = []
    for line in spec.strip().splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if len(parts) != 3:
            raise ValueError(f"column {line.strip()!r}: expected 'title  format  key'")
        out.append((parts[0], parts[1], parts[2]))
    return out


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a fixed-width text table: a header line, a rule and one line per row.

    Missing values (``None``, or a key the row lacks) print as ``-``.
    """
    cells = []
    for title, spec, _ in columns:
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0)
        cells.append(title.ljust(width) if spec.startswith("<") else title.rjust(width))
    header = " ".join(cells)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = (get(row) if callable(get) else row.get(get) for _, _, get in columns)
        lines.append(
            " ".join(fmt(v, spec) for v, (_, spec, _) in zip(values, columns, strict=True))
        )
    return "\n".join(lines)
