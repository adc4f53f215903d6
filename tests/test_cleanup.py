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
