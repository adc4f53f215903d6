"""Placement groups left behind by stopped trials (a race in Ray Train V2) are removed.

When ASHA stops a trial, Tune kills the trial's actor and, with it, the trial's Train
controller. If the controller was restarting its worker group at that moment (its worker
died first), the new placement group reaches the GCS just after the controller died: the GCS
keeps it (its creator-died clean-up already ran), Train's placement-group cleaner died with the
controller, and the group holds its CPUs for ever. Every later trial then waits for CPUs and
fails with ``WorkerGroupStartupTimeoutError``. Seen in ``benchmarks/bench_sweep.py`` (ASHA, 2
CPUs): one leaked 2-CPU group stopped the sweep.

:class:`LeakedPlacementGroupReaper` (a Tune callback of every sweep) removes, every few
seconds, the placement groups of this job whose creator actor is dead; such a group has no
owner left to use or remove it. Groups of other jobs, detached groups and groups created by a
driver are never touched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds between two scans of the GCS placement-group table.
SCAN_INTERVAL_S = 5.0


def leaked_placement_groups(table: list[Any], job_id: bytes) -> list[bytes]:
    """Ids of the placement groups in ``table`` that no live owner can use or remove.

    ``table``: ``PlacementGroupTableData`` messages (the GCS table). A group is leaked when it
    belongs to job ``job_id``, is not detached, was created by an actor, that actor is dead, and
    the group still holds (or waits for) resources."""
    from ray.core.generated import gcs_pb2

    live_states = {
        gcs_pb2.PlacementGroupTableData.PENDING,
        gcs_pb2.PlacementGroupTableData.PREPARED,
        gcs_pb2.PlacementGroupTableData.CREATED,
        gcs_pb2.PlacementGroupTableData.RESCHEDULING,
    }
    return [
        pg.placement_group_id
        for pg in table
        if pg.creator_job_id == job_id
        and not pg.is_detached
        and _is_actor(pg.creator_actor_id)  # created by an actor, not by a driver
        and pg.creator_actor_dead
        and pg.state in live_states
    ]


def _is_actor(actor_id: bytes) -> bool:
    """A real actor id (Ray writes the nil id of a driver-created group as all 0xff)."""
    return bool(actor_id.strip(b"\xff")) and bool(actor_id.strip(b"\x00"))


def _placement_group_table() -> list[Any]:
    import ray._private.state as state
    from ray.core.generated import gcs_pb2

    accessor = state.state._connect_and_get_accessor()
    return [
        gcs_pb2.PlacementGroupTableData.FromString(b) for b in accessor.get_placement_group_table()
    ]


def remove_leaked_placement_groups() -> list[str]:
    """Remove this job's leaked placement groups (see module docstring); returns their ids."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    job_id = ray.get_runtime_context().get_job_id()
    removed = []
    for pg_id in leaked_placement_groups(_placement_group_table(), bytes.fromhex(job_id)):
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(pg_id)))
        removed.append(pg_id.hex())
        logger.warning(
            "removed placement group %s: its creator (a stopped trial's Train controller) is "
            "dead, and it held resources later trials need",
            pg_id.hex(),
        )
    return removed


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover - ray is a dependency
    _TuneCallback = object


class LeakedPlacementGroupReaper(_TuneCallback):
    """Tune callback: :func:`remove_leaked_placement_groups` every :data:`SCAN_INTERVAL_S`."""

    def __init__(self, interval_s: float = SCAN_INTERVAL_S):
        self.interval_s = interval_s
        self._last = 0.0
        self.removed: list[str] = []
        self._broken = False

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if self._broken or now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.removed += remove_leaked_placement_groups()
        except Exception as err:  # a changed private Ray API must not stop the sweep
            self._broken = True
            logger.warning("placement-group clean-up disabled: %s: %s", type(err).__name__, err)

    def __getstate__(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "_last": 0.0, "removed": [], "_broken": False}
