"""Durable sweep state (regvi.sweep.durable): atomic writes on a real full disk, Tune-state
generations, and a resume that never silently restarts from unreadable state."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.cloudpickle as cloudpickle

from regvi.sweep.durable import (
    SNAPSHOT_DIR,
    TuneStateSnapshot,
    atomic_filesystem,
    check_tune_state,
    prepare_resume,
    write_generation,
)
from tests.test_disk_full import Filler, small_disk  # noqa: F401 - fixture


def _tune_files(d: Path, n_trials: int, tag: str = "2026-01-01_00-00-00") -> None:
    d.mkdir(parents=True, exist_ok=True)
    state = {"trial_data": [[f"trial-{i}", {}] for i in range(n_trials)], "runner_data": {}}
    (d / f"experiment_state-{tag}.json").write_text(json.dumps(state))
    with open(d / f"basic-variant-state-{tag}.json", "wb") as f:
        cloudpickle.dump({"generated": n_trials}, f)


def test_atomic_filesystem_pickles_and_copies_trees(tmp_path):
    fs = pickle.loads(pickle.dumps(atomic_filesystem()))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(3 * 2**20))
    (src / "sub" / "x.json").write_text("{}")
    pafs.copy_files(
        str(src), str(tmp_path / "dst"), pafs.LocalFileSystem(), destination_filesystem=fs
    )
    assert (tmp_path / "dst" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (tmp_path / "dst" / "sub" / "x.json").read_text() == "{}"
    assert not list((tmp_path / "dst").rglob(".*.tmp-*"))  # no temporary left
    fs.copy_file(str(src / "sub" / "x.json"), str(tmp_path / "dst" / "copy.json"))
    assert (tmp_path / "dst" / "copy.json").read_text() == "{}"


def test_a_write_that_fills_the_disk_leaves_the_old_file_whole(small_disk):  # noqa: F811
    fs = atomic_filesystem()
    target = small_disk / "experiment_state.json"
    old = json.dumps({"trial_data": list(range(10_000))}).encode()
    with fs.open_output_stream(str(target)) as f:
        f.write(old)
    filler = Filler(small_disk)
    filler.fill_once()
    try:
        with pytest.raises(OSError, match="No space left"):
            with fs.open_output_stream(str(target)) as f:
                f.write(b"x" * 2**20)
        assert target.read_bytes() == old  # plain open() would have left it empty / cut short
        assert sorted(p.name for p in small_disk.iterdir()) == [
            "experiment_state.json",
            "filler.bin",
        ]
        # Tune's own snapshot copy fails too, and keeps the previous complete generation
        staging = small_disk.parent / "staging"
        _tune_files(staging, 3)
        with pytest.raises(OSError):
            write_generation(staging, small_disk / SNAPSHOT_DIR)
        assert not (small_disk / SNAPSHOT_DIR).exists() or not any(
            (small_disk / SNAPSHOT_DIR).iterdir()
        )
    finally:
        filler.free()


def test_generations_replace_cut_short_and_mixed_tune_state(tmp_path):
    staging, sweep = tmp_path / "staging", tmp_path / "sweep"
    _tune_files(staging, 2)
    g0 = write_generation(staging, sweep / SNAPSHOT_DIR)
    _tune_files(staging, 3)
    g1 = write_generation(staging, sweep / SNAPSHOT_DIR)
    assert (g0.name, g1.name) == ("gen-0", "gen-1")
    # on storage: the trials file cut short by a full disk, the searcher file from an older save
    _tune_files(sweep, 1)
    state = next(sweep.glob("experiment_state-*.json"))
    state.write_bytes(state.read_bytes()[:20])
    (sweep / "callback-states-2025.pkl").write_bytes(b"")  # stale, unreadable
    with pytest.raises(ValueError, match=f"Tune state file {state} is unreadable"):
        check_tune_state(sweep)
    assert prepare_resume(sweep) == g1
    assert len(json.loads(state.read_text())["trial_data"]) == 3
    with open(next(sweep.glob("basic-variant-state-*.json")), "rb") as f:
        assert cloudpickle.load(f) == {"generated": 3}
    assert not (sweep / "callback-states-2025.pkl").exists()
    for _ in range(3):
        write_generation(staging, sweep / SNAPSHOT_DIR)
    assert [p.name for p in sorted((sweep / SNAPSHOT_DIR).iterdir())] == ["gen-3", "gen-4"]


def test_resume_refuses_unreadable_state_without_a_snapshot(tmp_path):
    _tune_files(tmp_path, 2)
    searcher = next(tmp_path.glob("basic-variant-state-*.json"))
    searcher.write_bytes(searcher.read_bytes()[:5])
    with pytest.raises(ValueError, match=f"Tune state file {searcher} is unreadable"):
        prepare_resume(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no Tune experiment state"):
        prepare_resume(empty)


def test_snapshot_callback_copies_the_staging_folder(tmp_path):
    class _Storage:
        experiment_driver_staging_path = str(tmp_path / "staging")

    class _Trial:
        storage = _Storage()

    _tune_files(tmp_path / "staging", 2)
    cb = pickle.loads(pickle.dumps(TuneStateSnapshot(tmp_path / "sweep")))
    assert cb.get_state() is None  # no trial seen yet: nothing to copy
    cb.on_trial_add(0, [], _Trial())
    assert cb.get_state() is None  # Tune writes no callback-state file for it
    gen = tmp_path / "sweep" / SNAPSHOT_DIR / "gen-0"
    assert sorted(p.name for p in gen.iterdir()) == sorted(
        p.name for p in (tmp_path / "staging").iterdir()
    )
