"""Warm evaluator processes shared by a sweep's trials.

Evaluating a trial in its own fresh Train worker pays, every trial, for importing
scib-metrics (which imports UMAP and pynndescent: their numba code is compiled at import),
numba-compiling UMAP's fuzzy simplicial set, and tracing and compiling scib-metrics' JAX
kernels: ~45 s of a ~50 s evaluation on the bundled data, against ~6 s of computing. A sweep
therefore starts ``concurrency`` evaluator actors once; the first evaluation in each compiles,
the rest reuse it (``benchmarks/bench_sweep.py``).

Data flow::

    trial's rank-0 Train worker                 evaluator actor (warm, 0 CPUs reserved)
    ───────────────────────────                 ───────────────────────────────────────
    latent of the evaluation subsample
    lease ← EvaluatorLease.acquire() ─────────▶ (a free evaluator, or wait for one)
    evaluator.run(subsample AnnData, options) ─▶ evaluate(): scib + neighbourhood metrics
                                                 write_outputs(): tables + PNGs in a temp dir
    metrics, files, UMAP coordinates ◀────────── returned as bytes (the nodes may differ)
    files written into the trial's checkpoint
    EvaluatorLease.release(lease)

The evaluators reserve no CPU: while one evaluates, the trial that asked waits, so the trial's
own CPU is what it computes with. Actors are owned by the sweep driver (they end with it) and
found by name. The lease actor is pinned to the driver's node (it lives and dies with the
sweep); the evaluators may run anywhere and are restarted elsewhere when their node dies. When
the pool is unreachable for any reason (a trial run outside ``python -m regvi.sweep``,
``evaluation.pool: false``, an evaluator or the lease lost with its node), the trial evaluates
in its own worker, as before; the metrics are the same. A pool failure never fails a trial.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LEASE_NAME = "regvi-evaluator-lease-{sweep}"
#: How long a trial waits for a free evaluator before evaluating in its own worker.
ACQUIRE_TIMEOUT_S = 600.0


def evaluate_to_files(
    sub, options: dict[str, Any], keys: list[str], umap: bool, coords: bool
) -> dict[str, Any]:
    """Evaluate ``sub.obsm[options['embedding_key']]`` and write its outputs to a temp dir.

    Returns ``{"metrics", "info", "files": {relative path: bytes}, "coords"}`` (``coords``: the
    UMAP of the embedding when ``coords`` or ``umap``, else ``None``). Runs in an evaluator
    actor or, as the fallback, in the trial's worker."""
    from evaluation.evaluate import evaluate, write_outputs
    from evaluation.plots import umap_coords

    ev = evaluate(sub, **options)
    xy = umap_coords(ev.embedding) if (umap or coords) and ev.embedding is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(ev, sub.obs, tmp, keys, umap=umap, coords=xy)
        files = {
            str(p.relative_to(tmp)): p.read_bytes()
            for p in sorted(Path(tmp).rglob("*"))
            if p.is_file()
        }
    return {"metrics": ev.metrics, "info": ev.info, "files": files, "coords": xy}


class Evaluator:
    """A warm evaluation process (a Ray actor): imports once, compiles once, evaluates many."""

    def __init__(self) -> None:
        # the imports that cost most (numba code compiled at import), done while trials train
        import scib_metrics  # noqa: F401

        import evaluation.evaluate
        import evaluation.scib  # noqa: F401

        self.n_done = 0

    def run(self, sub, options: dict[str, Any], keys: list[str], umap: bool, coords: bool):
        out = evaluate_to_files(sub, options, keys, umap, coords)
        self.n_done += 1
        out["evaluator_warm"] = float(self.n_done > 1)
        return out


class EvaluatorLease:
    """Hands out free evaluators one trial at a time (an async Ray actor)."""

    def __init__(self, evaluators: list) -> None:
        import asyncio

        self.evaluators = list(evaluators)
        self.free = list(range(len(self.evaluators)))
        self.cond = asyncio.Condition()

    async def acquire(self, timeout_s: float = ACQUIRE_TIMEOUT_S):
        import asyncio

        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: bool(self.free)), timeout_s)
            except TimeoutError:
                return None
            i = self.free.pop(0)
            return i, self.evaluators[i]

    async def release(self, i: int) -> None:
        async with self.cond:
            if i not in self.free:
                self.free.append(i)
            self.cond.notify()

    def size(self) -> int:
        return len(self.evaluators)

    def node_id(self) -> str:
        """The Ray node this lease runs on (the driver's, see :func:`start_pool`)."""
        import ray

        return ray.get_runtime_context().get_node_id()


def start_pool(sweep: str, size: int) -> Any:
    """Start ``size`` evaluators and their lease actor for sweep ``sweep`` (from the driver).

    Returns the lease actor's handle; keep it (and so the actors) alive for the sweep."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    evaluator = ray.remote(num_cpus=0, max_restarts=1, max_task_retries=0)(Evaluator)
    # the lease on the driver's node: losing another node must not take the pool with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    lease = ray.remote(num_cpus=0, max_restarts=0)(EvaluatorLease)
    actors = [evaluator.remote() for _ in range(max(1, size))]
    return lease.options(
        name=LEASE_NAME.format(sweep=sweep), get_if_exists=True, scheduling_strategy=here
    ).remote(actors)


def evaluate_in_pool(
    sweep: str | None, sub, options: dict[str, Any], keys: list[str], umap: bool, coords: bool
) -> dict[str, Any] | None:
    """Evaluate on a free evaluator of sweep ``sweep``; ``None`` when there is none (the caller
    then evaluates itself)."""
    if not sweep:
        return None
    import ray

    try:
        lease = ray.get_actor(LEASE_NAME.format(sweep=sweep))
    except ValueError:
        return None
    try:
        got = ray.get(lease.acquire.remote())
    except ray.exceptions.RayError as err:  # the lease is gone (its node died)
        logger.warning("evaluator pool unreachable (%s): evaluating in the trial", err)
        return None
    if got is None:
        logger.warning("no free evaluator after %.0f s: evaluating in the trial", ACQUIRE_TIMEOUT_S)
        return None
    i, actor = got
    try:
        return ray.get(actor.run.remote(sub, options, keys, umap, coords))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
        # the evaluator died (OOM, node lost); an error raised by the evaluation itself is
        # the trial's error and propagates
        logger.warning("evaluator %d failed (%s): evaluating in the trial", i, err)
        return None
    finally:
        try:
            lease.release.remote(i)
        except ray.exceptions.RayError:
            pass
