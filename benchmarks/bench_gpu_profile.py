"""Where a GPU training step goes: regvi's Lightning loop, a bare torch loop, the GPU's own time.

``bench_gpu.py`` found GPU epochs bound by a fixed cost per step (~7–8 ms at batch 128 and
1024 alike, far below the matmul peak). This script splits that step on the same data
(simulated, 20,000 cells × 2,000 genes, counts on the device):

- ``lightning``: ``model.train`` (the product's loop), s per training step;
- ``bare``: the same module, batches and fused Adam in a plain loop (no Lightning, no per-epoch
  bookkeeping), s per step, and its parts: building the batch on the device, forward,
  forward + backward;
- ``gpu busy``: the sum of CUDA kernel times in ``torch.profiler`` over bare steps, against the
  wall time of those steps, and the number of kernel launches per step;
- ``compiled``: the bare step with ``torch.compile`` on the module's loss (if it compiles in
  its time cap), s per step after warm-up;
- ``--train-compile``: the product path instead, ``model.train(compile=False)`` against
  ``compile=True`` (s per step after the first epoch, which holds the compilation; the
  validation ELBO reached).

Usage (on a GPU machine; ``--device cpu`` for a smoke run)::

    python benchmarks/bench_gpu_profile.py --out bench_gpu_profile.json
    python benchmarks/bench_gpu_profile.py --train-compile --out bench_gpu_compile.json

Writes the JSON after every measurement and prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import regvi
from regvi.data.device import to_device

RESULTS: dict[str, Any] = {"runs": []}


def _save(path: Path) -> None:
    path.write_text(json.dumps(RESULTS, indent=1, default=float))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


def _train(adata, arch, batch: int, device: torch.device, epochs: int, compile: bool):
    """A model trained through ``model.train`` (counts on the device); returns it, its
    history and the median s per training step after the first epoch."""
    model = regvi.RegVI(adata, library_key="library", n_hidden=arch[0], n_latent=arch[1])
    hist = model.train(
        max_epochs=epochs,
        batch_size=batch,
        early_stopping=False,
        progress_bar=False,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        data_on_device=True,
        validation_fraction=0.05,
        compile=compile,
    )
    steps = int(np.ceil(len(model.train_indices) / batch))
    return model, hist, float(np.median(hist["epoch_time_s"].to_numpy()[1:])) / steps


def profile_case(adata, arch: tuple[int, int], batch: int, device: torch.device, n: int) -> dict:
    """Lightning vs bare step times, parts of the bare step, GPU busy share, compiled step."""
    hidden, latent = arch
    row: dict[str, Any] = {"batch": batch, "n_hidden": hidden, "n_latent": latent}
    model, _, row["lightning_s_per_step"] = _train(adata, arch, batch, device, 3, False)
    module = model.module.to(device).train()
    data = to_device(model._dataset(), device)
    n_obs = len(model.train_indices)
    rng = np.random.default_rng(0)
    idxs = [rng.choice(model.train_indices, batch, replace=False) for _ in range(8)]
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, eps=0.01, fused=device.type == "cuda")
    it = iter(range(10**9))

    def get():
        return data[idxs[next(it) % len(idxs)]]

    def fwd():
        with torch.no_grad():
            module.loss(get(), n_obs)["loss"]

    def fwd_bwd():
        module.loss(get(), n_obs)["loss"].backward()

    def step(loss_fn=module.loss):
        out = loss_fn(get(), n_obs)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    row["bare_s_per_step"] = _timed(step, n, device)
    row["batch_build_s"] = _timed(get, n, device)
    row["forward_s"] = _timed(fwd, n, device)
    row["forward_backward_s"] = _timed(fwd_bwd, n, device)
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _sync(device)
            t = time.perf_counter()
            for _ in range(20):
                step()
            _sync(device)
            wall = time.perf_counter() - t
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in events) / 1e6  # µs → s
        row["profile_wall_s_per_step"] = wall / 20
        row["gpu_busy_s_per_step"] = busy / 20
        row["gpu_busy_share"] = busy / wall
        row["kernels_per_step"] = len(events) / 20
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        row["top_cpu_ops"] = table
    try:
        compiled = torch.compile(module.loss, dynamic=True)
        t = time.perf_counter()
        step(compiled)
        _sync(device)
        row["compile_s"] = time.perf_counter() - t
        row["compiled_s_per_step"] = _timed(lambda: step(compiled), n, device)
    except Exception as err:  # a compile failure is a result, not a crash
        row["compiled_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def train_compile_case(adata, arch: tuple[int, int], batch: int, device: torch.device) -> dict:
    """The product path: ``model.train(compile=False)`` vs ``compile=True``, s per step after
    the first epoch (which holds the compilation), and the validation ELBO reached."""
    hidden, latent = arch
    row: dict[str, Any] = {"batch": batch, "n_hidden": hidden, "n_latent": latent}
    for flag in (False, True):
        torch.manual_seed(0)
        t = time.perf_counter()
        _, hist, per_step = _train(adata, arch, batch, device, 5, flag)
        key = "compiled" if flag else "eager"
        row[f"{key}_s_per_step"] = per_step
        row[f"{key}_first_epoch_s"] = float(hist["epoch_time_s"].iloc[0])
        row[f"{key}_wall_s"] = time.perf_counter() - t
        row[f"{key}_validation_elbo"] = float(hist["validation_elbo"].iloc[-1])
    row["speedup"] = row["eager_s_per_step"] / row["compiled_s_per_step"]
    return row


def _fmt(col: str, v: Any) -> str:
    if v is None:
        return "-"
    if col in ("gpu_busy_share", "kernels_per_step"):
        return f"{v:.2f}"
    return f"{v * 1e3:.2f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_gpu_profile.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cells", type=int, default=20_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--train-compile",
        action="store_true",
        help="only compare model.train(compile=False / True) (the product path)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    adata = regvi.simulate(n_cells=args.cells, n_genes=2000, n_libraries=4, seed=0)
    RESULTS["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    RESULTS["torch"] = torch.__version__
    RESULTS["cells"] = args.cells
    if args.train_compile:
        RESULTS["train_compile"] = []
        for arch, batch in (((128, 10), 1024), ((128, 10), 128), ((512, 128), 1024)):
            try:
                row = train_compile_case(adata, arch, batch, device)
            except Exception as err:
                row = {"batch": batch, "arch": arch, "error": f"{type(err).__name__}: {err}"[:500]}
            RESULTS["train_compile"].append(row)
            _save(args.out)
            print(row, flush=True)
        print(
            "\n| batch | arch | eager ms/step | compiled ms/step | speed-up | first epoch s "
            "eager / compiled | val ELBO eager / compiled |\n|---|---|---|---|---|---|---|"
        )
        for r in RESULTS["train_compile"]:
            if "error" in r:
                print(f"| {r['batch']} | {r['arch']} | error: {r['error'][:80]} |||||")
                continue
            print(
                f"| {r['batch']} | {r['n_hidden']}/{r['n_latent']} | "
                f"{r['eager_s_per_step'] * 1e3:.2f} | {r['compiled_s_per_step'] * 1e3:.2f} | "
                f"{r['speedup']:.2f} | {r['eager_first_epoch_s']:.1f} / "
                f"{r['compiled_first_epoch_s']:.1f} | {r['eager_validation_elbo']:.1f} / "
                f"{r['compiled_validation_elbo']:.1f} |"
            )
        return
    for arch, batch in (((128, 10), 1024), ((128, 10), 128), ((512, 128), 1024)):
        t = time.perf_counter()
        try:
            row = profile_case(adata, arch, batch, device, args.steps)
        except Exception as err:
            row = {"batch": batch, "arch": arch, "error": f"{type(err).__name__}: {err}"[:500]}
        row["wall_s"] = time.perf_counter() - t
        RESULTS["runs"].append(row)
        _save(args.out)
        print({k: v for k, v in row.items() if k != "top_cpu_ops"}, flush=True)
        if "top_cpu_ops" in row:
            print(row["top_cpu_ops"], flush=True)
    cols = [
        "lightning_s_per_step",
        "bare_s_per_step",
        "batch_build_s",
        "forward_s",
        "forward_backward_s",
        "gpu_busy_s_per_step",
        "gpu_busy_share",
        "kernels_per_step",
        "compiled_s_per_step",
    ]
    print("\n| batch | arch | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for r in RESULTS["runs"]:
        vals = [_fmt(c, r.get(c)) for c in cols]
        arch = f"{r.get('n_hidden', '?')}/{r.get('n_latent', '?')}"
        print(f"| {r['batch']} | {arch} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
