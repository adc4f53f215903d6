"""Roofline and profile of regvi training on this CPU (run by ``bench_scvi.py`` or standalone).

Three measurements, each in its own child process with 2 torch threads:

1. **Peak** — dense float32 ``torch.mm`` GFLOP/s at exactly the matrix shapes the models
   multiply (every ``nn.Linear`` seen in a training forward pass: forward ``X @ W^T``, weight
   gradient ``dY^T @ X`` and, where the input needs a gradient, input gradient ``dY @ W``),
   plus square matrices for the machine's best case; best of several repeats each.
2. **Achieved** — analytic matmul FLOPs per epoch / measured seconds per epoch. FLOPs come from
   forward hooks on every ``nn.Linear`` during one training forward pass (encoder, library
   encoder, decoder; whatever the model really calls): ``2 · rows · in · out`` per call.
   *Nominal* epoch FLOPs = 3 × forward × N_train (forward + backward) + forward × N_val (the
   per-epoch validation pass); *exact* counts the backward as it runs (no input gradient for
   layers fed by data, i.e. the encoders' first layers). The *matmul floor* is the time the
   epoch's matmuls alone take at the measured per-shape speeds; floor / measured epoch time is
   the fraction of the attainable roofline reached.
3. **Profile** — ``torch.profiler`` over whole epochs of ``regvi.RegVI(...).train(...)`` (as
   users call it, Lightning), after one warm-up epoch and one equally long unprofiled window
   (its epoch times give the profiler's own overhead; the profile is taken and analysed epoch
   by epoch to bound memory), then the same number of steps of a bare loop (``module.loss`` → ``backward`` → Adam, same loader) to separate Lightning's share.
   Self CPU time is split into categories (matmul, elementwise, reduction, RNG, indexing,
   copy/alloc/view, autograd engine, data loading = everything under the DataLoader's
   ``__next__`` incl. CSR slicing/densify, optimizer = everything under ``Adam.step``), and
   Python/Lightning overhead = wall − all profiled op time.

Usage
-----
::

    # standalone (needs a preprocessed Kang .h5ad, e.g. from bench_scvi.py --workdir)
    .venv/bin/python benchmarks/bench_roofline.py --prep /tmp/bench/kang/prep.h5ad

At module level only the standard library is imported, so ``count_linear_flops`` can be used
by the scvi-tools child as well.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # stdlib-only at module level
from _common import N_THREADS, SEED, TRAIN_SIZE, fmt

DEFAULT_OUT = _common.RESULTS / "bench_roofline.json"
SQUARE_SIZES = (256, 512, 1024, 2048)
PROFILE_WARMUP_EPOCHS = 1
BARE_WARMUP_STEPS = 10
BARE_CHUNK_STEPS = 100
VALIDATION_MARKER = "bench::validation"
#: wraps only the Adam update (Lightning runs forward + backward inside ``Optimizer.step``)
ADAM_MARKER = "bench::adam_update"

# --------------------------------------------------------------------------- FLOP accounting


def count_linear_flops(root: Any, run: Callable[[], Any]) -> dict[str, Any]:
    """Matmul FLOPs of every ``nn.Linear`` call made while ``run()`` executes.

    Parameters
    ----------
    root
        Module whose ``nn.Linear`` submodules are hooked.
    run
        One training-mode forward pass (e.g. the loss of one minibatch).

    Returns
    -------
    dict
        ``layers`` (name, in, out, rows, whether input / weight need gradients, forward and
        backward FLOPs), ``rows`` (the minibatch size), ``fwd_flops_per_cell`` and
        ``bwd_flops_per_cell`` (backward as executed: weight gradient always, input gradient
        only where the input requires a gradient).
    """
    import torch

    names = {m: n for n, m in root.named_modules()}
    layers: list[dict[str, Any]] = []

    def hook(mod: Any, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        rows = x.numel() // x.shape[-1]
        f = 2 * rows * mod.in_features * mod.out_features
        need_x = bool(x.requires_grad)
        need_w = bool(mod.weight.requires_grad)
        layers.append(
            {
                "name": names.get(mod, "?"),
                "in": int(mod.in_features),
                "out": int(mod.out_features),
                "rows": int(rows),
                "input_requires_grad": need_x,
                "weight_requires_grad": need_w,
                "fwd_flops": int(f),
                "bwd_flops": int(f * (int(need_x) + int(need_w))),
            }
        )

    handles = [
        m.register_forward_hook(hook) for m in root.modules() if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.enable_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    rows = max((lay["rows"] for lay in layers), default=1)
    return {
        "layers": layers,
        "rows": rows,
        "fwd_flops_per_cell": sum(lay["fwd_flops"] for lay in layers) / rows,
        "bwd_flops_per_cell": sum(lay["bwd_flops"] for lay in layers) / rows,
    }


def layer_shapes(layer: dict[str, Any], rows: int, train: bool) -> list[dict[str, Any]]:
    """The ``torch.mm`` problems of one Linear call: ``(m, k, n, layout, role)``.

    Layouts: ``nt`` = A(m,k) @ B(n,k)ᵀ (forward X @ Wᵀ), ``nn`` = A(m,k) @ B(k,n) (input
    gradient dY @ W), ``tn`` = A(k,m)ᵀ @ B(k,n) (weight gradient dYᵀ @ X).
    """
    i, o = layer["in"], layer["out"]
    shapes = [{"m": rows, "k": i, "n": o, "layout": "nt", "role": "fwd"}]
    if train and layer["weight_requires_grad"]:
        shapes.append({"m": o, "k": rows, "n": i, "layout": "tn", "role": "dW"})
    if train and layer["input_requires_grad"]:
        shapes.append({"m": rows, "k": o, "n": i, "layout": "nn", "role": "dX"})
    return shapes


def shape_key(s: dict[str, Any]) -> str:
    """Stable key of a matmul problem, e.g. ``128x4000x128:nt``."""
    return f"{s['m']}x{s['k']}x{s['n']}:{s['layout']}"


def run_shapes(flops: dict[str, Any], batch_size: int, val_batch_size: int) -> list[dict]:
    """All matmul problems of one run: training at ``batch_size``, validation forward at
    ``val_batch_size``."""
    out = []
    for lay in flops["layers"]:
        out += layer_shapes(lay, batch_size, train=True)
        out += layer_shapes(lay, val_batch_size, train=False)
    return out


def epoch_accounting(
    flops: dict[str, Any],
    n_train: int,
    n_val: int,
    batch_size: int,
    val_batch_size: int,
    s_per_epoch: float | None,
    rates: dict[str, float] | None,
    peak_square: float | None,
) -> dict[str, Any]:
    """Nominal/exact matmul FLOPs per epoch, achieved GFLOP/s and the matmul floor.

    Parameters
    ----------
    flops
        Output of :func:`count_linear_flops`.
    n_train, n_val
        Training and validation cells per epoch.
    batch_size, val_batch_size
        Minibatch sizes of the training and validation loops.
    s_per_epoch
        Measured seconds per epoch (train + validation).
    rates
        Measured GFLOP/s per :func:`shape_key` (``None``: no floor).
    peak_square
        Best square-matrix GFLOP/s of this machine.
    """
    f, b = flops["fwd_flops_per_cell"], flops["bwd_flops_per_cell"]
    nominal = 3.0 * f * n_train + f * n_val
    exact = (f + b) * n_train + f * n_val
    rec: dict[str, Any] = {
        "fwd_mflop_per_cell": f / 1e6,
        "bwd_mflop_per_cell_exact": b / 1e6,
        "gflop_per_epoch_nominal": nominal / 1e9,
        "gflop_per_epoch_exact": exact / 1e9,
        "n_train": n_train,
        "n_val": n_val,
        "batch_size": batch_size,
        "val_batch_size": val_batch_size,
        "s_per_epoch": s_per_epoch,
    }
    if s_per_epoch:
        rec["achieved_gflops_nominal"] = nominal / s_per_epoch / 1e9
        rec["achieved_gflops_exact"] = exact / s_per_epoch / 1e9
    if rates:
        t_train = t_val = 0.0
        shape_rates = []
        for lay in flops["layers"]:
            for s in layer_shapes(lay, batch_size, train=True):
                r = rates.get(shape_key(s))
                if r:
                    t_train += 2.0 * s["m"] * s["k"] * s["n"] / (r * 1e9)
                    shape_rates.append(r)
            for s in layer_shapes(lay, val_batch_size, train=False):
                r = rates.get(shape_key(s))
                if r:
                    t_val += 2.0 * s["m"] * s["k"] * s["n"] / (r * 1e9)
        floor = t_train * n_train / batch_size + t_val * n_val / val_batch_size
        best_shape = max(shape_rates) if shape_rates else None
        rec.update(
            {
                "peak_gflops_model_shapes": best_shape,
                "peak_gflops_square": peak_square,
                "matmul_floor_s_per_epoch": floor,
                "attainable_gflops": exact / floor / 1e9 if floor else None,
            }
        )
        if s_per_epoch:
            ach = rec["achieved_gflops_nominal"]
            rec["achieved_over_peak_model_shapes"] = ach / best_shape if best_shape else None
            rec["achieved_over_peak_square"] = ach / peak_square if peak_square else None
            rec["matmul_floor_over_epoch"] = floor / s_per_epoch
    return rec


# --------------------------------------------------------------------------- peak child


def child_peak(shapes: list[dict[str, Any]], repeats: int, min_time_s: float) -> dict[str, Any]:
    """Time ``torch.mm`` (float32, ``out=``) for each shape; best of ``repeats``.

    Returns
    -------
    dict
        ``rates`` (:func:`shape_key` → GFLOP/s), ``square`` (size → GFLOP/s) and settings.
    """
    import torch

    _common.set_threads(N_THREADS)
    torch.manual_seed(0)

    def bench(m: int, k: int, n: int, layout: str) -> float:
        if layout == "nt":
            a, b = torch.randn(m, k), torch.randn(n, k).t()
        elif layout == "tn":
            a, b = torch.randn(k, m).t(), torch.randn(k, n)
        else:
            a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        one = max(time.perf_counter() - t0, 1e-7)
        iters = max(1, int(min_time_s / one))
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / iters)
        return 2.0 * m * k * n / best / 1e9

    rates: dict[str, float] = {}
    for s in shapes:
        key = shape_key(s)
        if key not in rates:
            rates[key] = bench(s["m"], s["k"], s["n"], s["layout"])
    square = {str(n): bench(n, n, n, "nn") for n in SQUARE_SIZES}
    return {
        "rates": rates,
        "square": square,
        "peak_gflops_square": max(square.values()),
        "peak_gflops_model_shapes": max(rates.values()) if rates else None,
        "repeats": repeats,
        "min_time_s": min_time_s,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
    }


# --------------------------------------------------------------------------- profile child

MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::addmv",
    "aten::mv",
    "aten::dot",
    "aten::_addmm_activation",
}
INDEXING_OPS = {
    "aten::index",
    "aten::index_put",
    "aten::index_put_",
    "aten::_index_put_impl_",
    "aten::index_add",
    "aten::index_add_",
    "aten::index_select",
    "aten::index_select_backward",
    "aten::one_hot",
    "aten::nonzero",
    "aten::gather",
    "aten::scatter",
    "aten::scatter_",
    "aten::scatter_add",
    "aten::scatter_add_",
    "aten::masked_select",
    "aten::masked_fill_",
    "aten::take",
    "aten::embedding",
    "aten::embedding_backward",
    "aten::embedding_dense_backward",
    "aten::_unsafe_index",
    "aten::unique",
    "aten::_unique2",
}
REDUCTION_OPS = {
    "aten::sum",
    "aten::mean",
    "aten::prod",
    "aten::max",
    "aten::min",
    "aten::amax",
    "aten::logsumexp",
    "aten::norm",
    "aten::linalg_vector_norm",
    "aten::cumsum",
}
RNG_OPS = {
    "aten::normal_",
    "aten::randn",
    "aten::randn_like",
    "aten::rand",
    "aten::rand_like",
    "aten::uniform_",
    "aten::bernoulli_",
    "aten::bernoulli",
    "aten::random_",
    "aten::randperm",
    "aten::native_dropout",
    "aten::dropout",
    "aten::native_dropout_backward",
}
MEMORY_OPS = {
    "aten::copy_",
    "aten::cat",
    "aten::stack",
    "aten::zeros",
    "aten::zeros_like",
    "aten::ones",
    "aten::ones_like",
    "aten::full",
    "aten::full_like",
    "aten::new_zeros",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::fill_",
    "aten::zero_",
    "aten::clone",
    "aten::contiguous",
    "aten::to",
    "aten::_to_copy",
    "aten::t",
    "aten::transpose",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::expand",
    "aten::expand_as",
    "aten::as_strided",
    "aten::select",
    "aten::slice",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::permute",
    "aten::narrow",
    "aten::split",
    "aten::split_with_sizes",
    "aten::unbind",
    "aten::detach",
    "aten::detach_",
    "aten::alias",
    "aten::resize_",
    "aten::lift_fresh",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::result_type",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::numpy_T",
    "aten::flatten",
    "aten::set_",
    "aten::scalar_tensor",
    "aten::select_backward",
    "aten::slice_backward",
    "aten::_unsafe_view",
    "detach",
    "detach_",
}
CATEGORY_ORDER = (
    "matmul",
    "elementwise",
    "reduction",
    "rng",
    "indexing",
    "copy/alloc/view",
    "autograd engine",
    "data loading",
    "optimizer",
    "other ops",
    "python/lightning overhead",
)


def classify_op(name: str) -> str:
    """Category of one profiler event by name (context-free)."""
    if name in MATMUL_OPS:
        return "matmul"
    if name in INDEXING_OPS:
        return "indexing"
    if name in REDUCTION_OPS:
        return "reduction"
    if name in RNG_OPS:
        return "rng"
    if name in MEMORY_OPS:
        return "copy/alloc/view"
    if (
        name.startswith("autograd::")
        or name.startswith("torch::autograd::")
        or name.endswith("Backward0")
        or name.endswith("Backward1")
    ):
        return "autograd engine"
    if name.startswith("enumerate(DataLoader)"):
        return "data loading"
    if name == ADAM_MARKER or name.startswith("Optimizer.zero_grad"):
        return "optimizer"
    if name.startswith("aten::"):
        return "elementwise"
    return "other ops"


class ProfileAccumulator:
    """Self CPU time by category and phase, summed over several profiled chunks.

    Profiling a few hundred steps in one go holds millions of events (GBs of memory); the
    profile is therefore taken in chunks (one epoch, or up to 100 bare-loop steps) that are
    analysed and freed one by one. Categories use the event's context: everything under the
    DataLoader's ``__next__`` is *data loading* (its own self time is the CSR slicing and
    densifying), everything under :data:`ADAM_MARKER` / ``zero_grad`` is *optimizer*; other
    events are classified by name (:func:`classify_op`). The self time of the validation marker
    and of ``Optimizer.step`` (Lightning runs forward and backward inside it) is Python between
    ops and stays in the overhead = wall − all attributed op time.
    """

    PHASE_ORDER = (
        "data loading",
        "forward (train)",
        "backward",
        "optimizer",
        "validation",
        "python/lightning overhead",
    )

    def __init__(self) -> None:
        self.cats: dict[str, float] = defaultdict(float)
        self.phases: dict[str, float] = defaultdict(float)
        self.threads: dict[str, float] = defaultdict(float)
        self.ops: dict[str, list[float]] = {}
        self.wall_s = 0.0
        self.n_events = 0
        self.n_chunks = 0

    def add(self, prof: Any, wall_s: float) -> None:
        """Add one stopped ``torch.profiler.profile`` covering ``wall_s`` seconds."""
        events = prof.events()
        context: dict[int, str | None] = {}
        phase_of: dict[int, str] = {}

        def ctx(ev: Any) -> tuple[str | None, str]:
            chain = []
            p = ev
            while p is not None and id(p) not in context:
                chain.append(p)
                p = p.cpu_parent
            c = context[id(p)] if p is not None else None
            ph = phase_of[id(p)] if p is not None else "forward (train)"
            for q in reversed(chain):
                n = q.name
                if c is None:
                    if n.startswith("enumerate(DataLoader)"):
                        c = "data loading"
                    elif n == ADAM_MARKER or n.startswith("Optimizer.zero_grad"):
                        c = "optimizer"
                if ph == "forward (train)":
                    if n == VALIDATION_MARKER:
                        ph = "validation"
                    elif n.startswith("autograd::engine"):
                        ph = "backward"
                context[id(q)] = c
                phase_of[id(q)] = ph
            return context[id(ev)], phase_of[id(ev)]

        for ev in events:
            self_s = ev.self_cpu_time_total / 1e6
            self.threads[str(ev.thread)] += self_s
            if ev.name == VALIDATION_MARKER or ev.name.startswith("Optimizer.step"):
                continue  # Python between ops: left in the overhead
            c, ph = ctx(ev)
            self.cats[c or classify_op(ev.name)] += self_s
            self.phases["data loading" if c == "data loading" else "optimizer" if c else ph] += (
                self_s
            )
        for a in prof.key_averages():
            acc = self.ops.setdefault(a.key, [0, 0.0, 0.0])
            acc[0] += a.count
            acc[1] += a.self_cpu_time_total / 1e6
            acc[2] += a.cpu_time_total / 1e6
        self.wall_s += wall_s
        self.n_events += len(events)
        self.n_chunks += 1

    def result(self) -> dict[str, Any]:
        """``categories`` and ``phases`` (seconds, share of wall), top-20 ops, totals."""
        wall = self.wall_s
        profiled = sum(self.cats.values())
        overhead = max(wall - profiled, 0.0)
        cats = {**self.cats, "python/lightning overhead": overhead}
        phases = {**self.phases, "python/lightning overhead": overhead}

        def table(d: dict[str, float], order: Iterable[str]) -> dict[str, dict[str, float]]:
            keys = [k for k in order if k in d] + sorted(k for k in d if k not in order)
            return {k: {"s": d[k], "share": d[k] / wall if wall else None} for k in keys}

        ranked = sorted(self.ops.items(), key=lambda kv: kv[1][1], reverse=True)
        top_ops = [
            {
                "op": key,
                "category": classify_op(key),
                "calls": int(n),
                "self_s": self_s,
                "self_share": self_s / wall if wall else None,
                "total_s": total_s,
                "self_us_per_call": self_s * 1e6 / max(n, 1),
            }
            for key, (n, self_s, total_s) in ranked
            if key != VALIDATION_MARKER and not key.startswith("Optimizer.step")
        ][:20]
        return {
            "wall_s": wall,
            "profiled_op_s": profiled,
            "n_events": self.n_events,
            "n_chunks": self.n_chunks,
            "categories": table(cats, CATEGORY_ORDER),
            "phases": table(phases, self.PHASE_ORDER),
            "self_s_by_thread": dict(self.threads),
            "top_ops": top_ops,
        }


def breakdown(prof: Any, wall_s: float) -> dict[str, Any]:
    """:class:`ProfileAccumulator` result of a single profile."""
    acc = ProfileAccumulator()
    acc.add(prof, wall_s)
    return acc.result()


def child_profile(
    prep: Path, batch_key: str, arch: Any, batch_size: int, lr: float, steps: int
) -> dict[str, Any]:
    """Profile ``RegVI.train`` (Lightning) and a bare loop at one batch size / architecture.

    Runs in a child process of its own (fresh torch threads and allocator); the optimiser
    steps are timed through a patched ``torch.optim.Adam`` (:func:`_timed_adam_class`).

    Parameters
    ----------
    prep
        Preprocessed ``.h5ad`` (raw counts).
    batch_key
        ``library_key`` for regvi.
    arch
        :class:`_common.Arch`.
    batch_size, lr
        Minibatch size and learning rate.
    steps
        At least this many training steps per window (rounded up to whole epochs for the
        Lightning windows).
    """
    import anndata as ad
    import numpy as np
    import torch

    import regvi

    timed_adam = _timed_adam_class()
    # regvi.training.TrainingPlan looks up torch.optim.Adam when it builds the optimiser
    torch.optim.Adam = timed_adam  # type: ignore[misc]
    _common.set_threads(N_THREADS)
    torch.manual_seed(SEED)
    adata = ad.read_h5ad(prep)
    model = regvi.RegVI(adata, library_key=batch_key, **arch.sizes())
    n_val = round((1 - TRAIN_SIZE) * adata.n_obs)
    n_train = adata.n_obs - n_val
    steps_per_epoch = math.ceil(n_train / batch_size)
    n_win = max(1, math.ceil(steps / steps_per_epoch))
    lightning = _profile_lightning(model, batch_size, lr, n_win, steps_per_epoch)
    val_bs = model._validation_batch_size(batch_size)
    bare = _profile_bare_loop(model, timed_adam, batch_size, lr, n_win * steps_per_epoch, n_train)

    module, data = model.module, model._dataset()
    batch = data[np.arange(min(batch_size, len(data)))]
    flops = count_linear_flops(module, lambda: module.loss(batch, n_train))
    return {
        "batch_size": batch_size,
        "val_batch_size": val_bs,
        "lr": lr,
        "arch": arch.name,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_train": len(model.train_indices),
        "n_val": len(model.validation_indices),
        "lightning": lightning,
        "bare": bare,
        "lightning_overhead_ms_per_step": lightning["timed_train_ms_per_step"]
        - bare["timed_ms_per_step"],
        "flops": flops,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": _common.peak_rss_mib(),
    }


def _timed_adam_class() -> type:
    """``torch.optim.Adam`` whose update (not the closure) runs under :data:`ADAM_MARKER`."""
    import torch
    from torch.profiler import record_function

    class TimedAdam(torch.optim.Adam):
        """Adam whose update (not the closure) runs under :data:`ADAM_MARKER`."""

        def step(self, closure: Any = None) -> Any:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with record_function(ADAM_MARKER):
                super().step()
            return loss

    return TimedAdam


def _window_callback(warm: int, first_prof: int) -> Any:
    """A Lightning callback that times epochs ``warm`` to ``first_prof - 1`` (unprofiled),
    profiles every later epoch one by one and marks validation."""
    import lightning.pytorch as pl
    from torch.profiler import ProfilerActivity, profile, record_function

    class Window(pl.Callback):
        """Times the unprofiled window, profiles the next one epoch by epoch, marks validation."""

        def __init__(self) -> None:
            self.t: dict[str, float] = {}
            self.val_s: dict[str, float] = defaultdict(float)
            self.steps: dict[str, int] = defaultdict(int)
            self.acc = ProfileAccumulator()
            self.analyse_s = 0.0
            self.prof: Any = None
            self._rf: Any = None
            self._v0 = 0.0
            self._p0 = 0.0

        def phase(self, epoch: int) -> str:
            return "warmup" if epoch < warm else "timed" if epoch < first_prof else "profiled"

        def on_train_epoch_start(self, trainer: Any, plan: Any) -> None:
            e = trainer.current_epoch
            if e == warm:
                self.t["timed_start"] = time.perf_counter()
            if e == first_prof:
                self.t["timed_end"] = time.perf_counter()
            if e >= first_prof:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.start()
                self._p0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.steps[self.phase(trainer.current_epoch)] += 1

        def on_validation_epoch_start(self, trainer: Any, plan: Any) -> None:
            self._v0 = time.perf_counter()
            if self.prof is not None:
                self._rf = record_function(VALIDATION_MARKER)
                self._rf.__enter__()

        def on_validation_epoch_end(self, trainer: Any, plan: Any) -> None:
            if self._rf is not None:
                self._rf.__exit__(None, None, None)
                self._rf = None
            self.val_s[self.phase(trainer.current_epoch)] += time.perf_counter() - self._v0

        def on_train_epoch_end(self, trainer: Any, plan: Any) -> None:
            if self.prof is None:
                return
            wall = time.perf_counter() - self._p0
            self.prof.stop()
            t0 = time.perf_counter()
            self.acc.add(self.prof, wall)
            self.prof = None
            gc.collect()
            self.analyse_s += time.perf_counter() - t0

    return Window()


def _profile_lightning(
    model: Any, batch_size: int, lr: float, n_win: int, steps_per_epoch: int
) -> dict[str, Any]:
    """``model.train`` over warm-up epochs, ``n_win`` timed and ``n_win`` profiled epochs:
    per-epoch and per-step times, the profiler overhead and the profile (``lightning``)."""
    warm = PROFILE_WARMUP_EPOCHS
    first_prof = warm + n_win
    last = warm + 2 * n_win - 1
    win = _window_callback(warm, first_prof)
    t0 = time.perf_counter()
    hist = model.train(
        max_epochs=last + 1,
        batch_size=batch_size,
        lr=lr,
        early_stopping=False,
        progress_bar=False,
        callbacks=[win],
    )
    lightning_total_s = time.perf_counter() - t0
    epoch_s = [float(x) for x in hist["epoch_time_s"]]
    timed_wall = win.t["timed_end"] - win.t["timed_start"]
    prof_wall = win.acc.wall_s
    return {
        "epochs_per_window": n_win,
        "steps_per_epoch": steps_per_epoch,
        "train_steps": {k: int(v) for k, v in win.steps.items()},
        "timed_s_per_epoch": timed_wall / n_win,
        "timed_epoch_times_s": epoch_s[warm:first_prof],
        "timed_validation_s_per_epoch": win.val_s["timed"] / n_win,
        "timed_train_ms_per_step": (timed_wall - win.val_s["timed"])
        / max(win.steps["timed"], 1)
        * 1e3,
        "profiled_s_per_epoch": prof_wall / n_win,
        "profiler_overhead": prof_wall / timed_wall - 1.0,
        "profile": win.acc.result(),
        "analyse_s": win.analyse_s,
        "total_s": lightning_total_s,
    }


def _profile_bare_loop(
    model: Any, adam_class: type, batch_size: int, lr: float, n_bare: int, n_train: int
) -> dict[str, Any]:
    """``module.loss`` → backward → Adam with the same loader and optimiser settings as
    ``train``: ``n_bare`` timed steps, then ``n_bare`` profiled steps in chunks (``bare``)."""
    from torch.profiler import ProfilerActivity, profile

    from regvi.data import make_loader

    module = model.module
    module.train()
    data = model._dataset()
    loader = make_loader(data, model.train_indices, batch_size, True, SEED + 1)
    opt = adam_class(module.parameters(), lr=lr, weight_decay=1e-6, eps=0.01)

    def batches() -> Any:
        while True:
            yield from loader

    it = batches()

    def step() -> None:
        batch = next(it)
        out = module.loss(batch, n_train, kl_weight=1.0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    steps_per_epoch = math.ceil(n_train / batch_size)
    chunk = min(steps_per_epoch, BARE_CHUNK_STEPS)
    for _ in range(BARE_WARMUP_STEPS):
        step()
    t0 = time.perf_counter()
    for _ in range(n_bare):
        step()
    bare_timed = time.perf_counter() - t0
    acc = ProfileAccumulator()
    done = 0
    while done < n_bare:
        k = min(chunk, n_bare - done)
        prof = profile(activities=[ProfilerActivity.CPU])
        prof.start()
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        wall = time.perf_counter() - t0
        prof.stop()
        acc.add(prof, wall)
        del prof
        gc.collect()
        done += k
    return {
        "steps": n_bare,
        "timed_ms_per_step": bare_timed / n_bare * 1e3,
        "profiled_ms_per_step": acc.wall_s / n_bare * 1e3,
        "profiler_overhead": acc.wall_s / bare_timed - 1.0,
        "profile": acc.result(),
    }


# --------------------------------------------------------------------------- parent helpers


def launch(child_args: list[str], log: Path, record: Path, python: str | None = None) -> dict:
    """Run a child of this script (see :func:`_common.launch`), with ``contention``."""
    return _common.launch_cpu_timed(
        __file__, python or sys.executable, child_args, log, record, tag="roofline"
    )


def run_profiles(
    prep: Path,
    batch_key: str,
    archs: list[Any],
    batch_sizes: list[int],
    lr_for: Callable[[int], float],
    steps: int,
    workdir: Path,
) -> list[dict[str, Any]]:
    """One profile child per (batch size, architecture)."""
    out = []
    for b in batch_sizes:
        for arch in archs:
            name = f"profile_b{b}_{arch.name}"
            print(f"[roofline] profiling {name} ({steps}+ steps per window) ...", flush=True)
            rec = launch(
                [
                    "--child", "profile", "--prep", str(prep), "--batch-key", batch_key,
                    "--batch-size", str(b), "--lr", repr(lr_for(b)), "--steps", str(steps),
                    "--n-hidden", str(arch.n_hidden), "--n-latent", str(arch.n_latent),
                    "--n-layers", str(arch.n_layers),
                ],
                workdir / f"{name}.log",
                workdir / f"{name}.json",
            )  # fmt: skip
            rec.update({"name": name, "batch_size": b, "arch": arch.name})
            if "error" in rec:
                print(f"[roofline] {name} FAILED: {rec['log_tail']}", file=sys.stderr, flush=True)
            else:
                print(format_profile(rec), flush=True)
            out.append(rec)
    return out


def run_peak(shapes: list[dict[str, Any]], workdir: Path, repeats: int = 10) -> dict[str, Any]:
    """Measure ``torch.mm`` GFLOP/s at ``shapes`` (deduplicated) in a child."""
    uniq = {shape_key(s): s for s in shapes}
    spec = workdir / "peak_shapes.json"
    spec.write_text(json.dumps(list(uniq.values())))
    print(f"[roofline] timing torch.mm at {len(uniq)} shapes + squares ...", flush=True)
    rec = launch(
        ["--child", "peak", "--shapes", str(spec), "--repeats", str(repeats)],
        workdir / "peak.log",
        workdir / "peak.json",
    )
    if "error" in rec:
        print(f"[roofline] peak FAILED: {rec['log_tail']}", file=sys.stderr, flush=True)
    else:
        sq = ", ".join(f"{n}: {v:.0f}" for n, v in rec["square"].items())
        print(
            f"[roofline] torch.mm peak (2 threads): square {sq} GFLOP/s; best model shape "
            f"{rec['peak_gflops_model_shapes']:.0f} GFLOP/s",
            flush=True,
        )
    return rec


def profile_shapes(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Matmul problems of every successful profile run."""
    shapes = []
    for p in profiles:
        if "flops" in p:
            shapes += run_shapes(p["flops"], p["batch_size"], p["val_batch_size"])
    return shapes


def profile_accounting(p: dict[str, Any], peak: dict[str, Any]) -> dict[str, Any]:
    """Roofline numbers of one profile run from its unprofiled Lightning window."""
    return epoch_accounting(
        p["flops"],
        p["n_train"],
        p["n_val"],
        p["batch_size"],
        p["val_batch_size"],
        p["lightning"]["timed_s_per_epoch"],
        peak.get("rates"),
        peak.get("peak_gflops_square"),
    )


def format_profile(p: dict[str, Any]) -> str:
    """One profile run as text: timing, category and phase shares, top ops."""
    lt, br = p["lightning"], p["bare"]
    lines = [
        f"== profile {p['arch']} batch {p['batch_size']} ({p['n_cells']} cells x {p['n_genes']} "
        f"genes): Lightning {lt['timed_s_per_epoch']:.2f} s/epoch "
        f"({lt['timed_train_ms_per_step']:.1f} ms/train step, validation "
        f"{lt['timed_validation_s_per_epoch']:.2f} s/epoch), bare loop "
        f"{br['timed_ms_per_step']:.1f} ms/step, profiler overhead "
        f"{100 * lt['profiler_overhead']:.0f}% / {100 * br['profiler_overhead']:.0f}%",
        f"{'category':<26} {'Lightning':>9} {'bare':>6}",
    ]
    lc, bc = lt["profile"]["categories"], br["profile"]["categories"]
    for k in CATEGORY_ORDER:
        if k in lc or k in bc:
            a = lc.get(k, {}).get("share")
            b = bc.get(k, {}).get("share")
            lines.append(
                f"{k:<26} {fmt(None if a is None else 100 * a, '8.1f')}% "
                f"{fmt(None if b is None else 100 * b, '5.1f')}%"
            )
    ph = lt["profile"]["phases"]
    lines.append(
        "phases (Lightning): " + ", ".join(f"{k} {100 * v['share']:.1f}%" for k, v in ph.items())
    )
    lines.append(
        f"{'top ops (Lightning)':<40} {'calls':>7} {'self s':>7} {'share':>6} {'us/call':>8}"
    )
    for op in lt["profile"]["top_ops"]:
        lines.append(
            f"{op['op'][:40]:<40} {op['calls']:>7} {op['self_s']:>7.2f} "
            f"{100 * op['self_share']:>5.1f}% {op['self_us_per_call']:>8.1f}"
        )
    return "\n".join(lines)


def format_roofline(rows: list[dict[str, Any]]) -> str:
    """Roofline rows (one per run) as a table."""
    return _common.render_table(
        rows,
        _common.parse_columns(
            """
                run         <34    name
                GFLOP/ep    8.1f   gflop_per_epoch_nominal
                s/epoch     7.2f   s_per_epoch
                ach GF/s    8.1f   achieved_gflops_nominal
                peak GF/s   9.1f   peak_gflops_model_shapes
                ach/peak    8.3f   achieved_over_peak_model_shapes
                sq peak     7.1f   peak_gflops_square
                ach/sq      6.3f   achieved_over_peak_square
                mm floor s  10.3f  matmul_floor_s_per_epoch
                floor/ep    8.3f   matmul_floor_over_epoch
                """
        ),
    )


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """Standalone CLI plus the hidden child options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prep", help="preprocessed Kang .h5ad (raw counts, 4000 HVGs)")
    p.add_argument("--batch-key", default="condition")
    p.add_argument("--batch-sizes", default="128,1024")
    p.add_argument(
        "--archs", type=_common.parse_archs, default=_common.parse_archs("128x10,512x128")
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per profile window")
    p.add_argument("--lr", type=float, default=1e-3, help="base lr at batch 128")
    p.add_argument("--lr-scaling", choices=("linear", "none"), default="linear")
    p.add_argument("--repeats", type=int, default=10, help="torch.mm repeats (best of)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--workdir", default=None)
    # child-only
    p.add_argument("--child", choices=("peak", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--shapes", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-latent", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-layers", type=int, default=1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Child dispatch, or the standalone roofline + profile run."""
    args = build_parser().parse_args(argv)
    if args.child == "peak":
        shapes = json.loads(Path(args.shapes).read_text())
        rec = child_peak(shapes, args.repeats, 0.02)
    elif args.child == "profile":
        arch = _common.Arch(args.n_hidden, args.n_latent, args.n_layers)
        rec = child_profile(
            Path(args.prep), args.batch_key, arch, args.batch_size, args.lr, args.steps
        )
    else:
        return run_standalone(args)
    return _common.write_record(args, rec)


def run_standalone(args: argparse.Namespace) -> int:
    """Profile + peak + roofline from the profile runs' own epoch times."""
    if not args.prep or not Path(args.prep).exists():
        sys.exit("--prep: a preprocessed .h5ad is needed (bench_scvi.py --workdir DIR keeps one)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_roofline_"))
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]

    def lr_for(b: int) -> float:
        return _common.lr_for(b, args.lr, args.lr_scaling)

    profiles = run_profiles(
        Path(args.prep), args.batch_key, args.archs, sizes, lr_for, args.steps, workdir
    )
    peak = run_peak(profile_shapes(profiles), workdir, args.repeats)
    rows = []
    for p in profiles:
        if "flops" in p and "error" not in peak:
            rows.append({"name": p["name"], **profile_accounting(p, peak)})
    table = format_roofline(rows)
    print(table)
    result = {
        "benchmark": "regvi roofline and profile",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "prep": str(args.prep),
        "peak": peak,
        "roofline_profile_runs": rows,
        "profiles": profiles,
        "roofline_table": table,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"[roofline] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
