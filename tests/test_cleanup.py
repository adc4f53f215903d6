"""Leaked placement groups (Ray Train V2 race on trial stop) are found and removed; live
groups, other jobs' groups, detached and driver-created groups are never touched."""

from __future__ import annotations

import pytest
from ray.core.generated import gcs_pb2

from regvi.sweep.cleanup import leaked_placement_groups

JOB = bytes.fromhex("01000000")
ACTOR = bytes.fromhex("aa" * 16)
PG = gcs_pb2.PlacementGroupTableData


def _pg(i: int, **over) -> PG:
    fields = {
        "placement_group_id": bytes([i]) * 18,
        "creator_job_id": JOB,
        "creator_actor_id": ACTOR,
        "creator_actor_dead": True,
        "state": PG.CREATED,
    }
    fields.update(over)
    return PG(**fields)


def test_only_groups_whose_creator_actor_died_are_leaked():
    table = [
        _pg(1),  # leaked: a dead Train controller's worker group
        _pg(2, state=PG.PENDING),  # leaked while still waiting for resources
        _pg(3, creator_actor_dead=False),  # its controller is alive
        _pg(4, creator_job_id=bytes.fromhex("02000000")),  # another job's
        _pg(5, is_detached=True),
        _pg(6, creator_actor_id=b"\xff" * 16),  # created by a driver (nil actor id)
        _pg(8, creator_actor_id=b""),
        _pg(7, state=PG.REMOVED),
    ]
    assert leaked_placement_groups(table, JOB) == [bytes([1]) * 18, bytes([2]) * 18]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_live_groups_on_a_real_cluster_are_kept(ray_local):
    from ray.util.placement_group import placement_group, placement_group_table

    from regvi.sweep.cleanup import LeakedPlacementGroupReaper, remove_leaked_placement_groups

    ray = ray_local

    @ray.remote(num_cpus=0)
    class Owner:
        def make(self):
            self.pg = placement_group([{"CPU": 1}])
            ray.get(self.pg.ready())
            return self.pg.id.hex()

    owner = Owner.remote()
    owned = ray.get(owner.make.remote())
    driver_pg = placement_group([{"CPU": 1}])
    ray.get(driver_pg.ready())
    assert remove_leaked_placement_groups() == []
    reaper = LeakedPlacementGroupReaper(interval_s=0)
    reaper.on_step_begin(0, [])
    assert reaper.removed == [] and not reaper._broken
    table = placement_group_table()
    assert table[owned]["state"] == "CREATED"
    assert table[driver_pg.id.hex()]["state"] == "CREATED"
    ray.kill(owner)  # the GCS removes a dead actor's groups itself (the normal path)
    ray.util.remove_placement_group(driver_pg)


def test_a_trial_returns_only_after_tune_took_trains_last_report(ray_local, monkeypatch):
    """regvi.sweep.trial._drain_tune_reports: the trial function returns only once Tune's main
    thread has taken Train's last report from the real hand-over queue (plus the grace), else
    Ray 2.60's trial actor deadlocks; a stopped trial or a vanished queue does not wait."""
    import threading
    import time
    import types

    import ray.train._internal.session as train_session
    from ray.util.queue import Queue

    from regvi.sweep import trial

    queue = Queue(1)
    queue.put({"epoch": 9})  # Train's last report, not yet taken
    fake = types.SimpleNamespace(_inter_actor_queue=queue, stop_event=threading.Event())
    monkeypatch.setattr(train_session, "get_session", lambda: fake)
    monkeypatch.setattr(trial, "REPORT_DRAIN_GRACE_S", 0.3)
    taken: list[float] = []

    def tune_main_thread() -> None:
        time.sleep(1.0)
        assert queue.get() == {"epoch": 9}
        taken.append(time.monotonic())

    reader = threading.Thread(target=tune_main_thread)
    reader.start()
    trial._drain_tune_reports()
    returned = time.monotonic()
    reader.join()
    assert taken and returned >= taken[0] + 0.3

    def drained_in_thread() -> bool:
        t = threading.Thread(target=trial._drain_tune_reports, daemon=True)
        t.start()
        t.join(timeout=60)
        return not t.is_alive()

    queue.put({"epoch": 10})  # never taken: Tune stopped the trial
    fake.stop_event.set()
    assert drained_in_thread() and queue.qsize() == 1
    fake.stop_event.clear()
    ray_local.kill(queue.actor)  # the queue's actor is gone
    assert drained_in_thread()
