"""Run the fault-injection tests and print the fault table: fault, survived, runs lost, time.

Each fault test (real Ray, real MLflow, small simulated data) injects its fault for real,
finishes with an audit and, when ``REGVI_FAULT_REPORT`` names a file, appends its row there:

* a trial that produces NaN/inf;
* a Ray Train worker SIGKILLed mid-trial (retried from its checkpoint, Adam state included);
* the sweep driver SIGKILLed mid-sweep, then ``--resume``;
* one node of a 2-node local Ray cluster SIGKILLed mid-sweep;
* the MLflow tracking server (``mlflow server`` on 127.0.0.1) stopped 20 s and restarted;
* an unwritable output folder (refused before any work; nothing written);
* a full disk under ``storage.path`` (a size-limited tmpfs; refused before any work);
* the disk filling up mid-sweep (the sweep stops with a clear error, no FINISHED run is
  incomplete, ``--resume`` after freeing space finishes every trial).

A fault whose test failed is reported as not survived, one whose test was skipped (the disk
tests mount a tmpfs and need root) as skipped. Usage::

    .venv/bin/python benchmarks/fault_table.py            # ~15 min on 2 cores

Writes ``benchmarks/results/fault_table.json``. Never run it next to another Ray job: the
cluster test stops every Ray process on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = {
    "trial produces NaN/inf (marked failed, sweep goes on)": (
        "tests/test_sweep.py::test_diverging_trial_is_marked_failed_and_sweep_continues"
    ),
    "Ray Train worker SIGKILLed mid-trial": (
        "tests/test_sweep.py::test_killed_train_worker_is_retried_from_checkpoint"
    ),
    "sweep driver SIGKILLed, then --resume": (
        "tests/test_sweep.py::test_killed_sweep_resumes_without_duplicates"
    ),
    "node of a 2-node cluster SIGKILLed mid-sweep": (
        "tests/test_cluster.py::test_node_stopped_mid_sweep_loses_nothing"
    ),
    "MLflow server stopped 20 s, restarted": (
        "tests/test_sweep.py::test_mlflow_server_restart_mid_sweep_loses_nothing"
    ),
    "unwritable output folder (refused, nothing written)": (
        "tests/test_bad_inputs.py::test_bad_input_is_refused_and_nothing_is_written"
        "[unwritable output folder]"
    ),
    "disk already full (refused, nothing written)": (
        "tests/test_disk_full.py::test_full_disk_is_refused_before_any_work"
    ),
    "disk full mid-sweep (stops, then --resume)": (
        "tests/test_disk_full.py::test_disk_full_mid_sweep_stops_cleanly_and_resumes"
    ),
}


def _verdict(survived: bool | None) -> str:
    return {True: "survived", False: "FAILED", None: "skipped"}[survived]


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        for fault, node in TESTS.items():
            t0 = time.time()
            env = {**os.environ, "REGVI_FAULT_REPORT": str(report)}
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", node],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            recorded = {}
            if report.is_file():
                for line in report.read_text().splitlines():
                    r = json.loads(line)
                    if r["fault"] == fault:
                        recorded = r
            skipped = (
                out.returncode == 0 and " skipped" in out.stdout and " passed" not in out.stdout
            )
            row = {
                "fault": fault,
                "survived": None if skipped else out.returncode == 0,
                "runs_lost": recorded.get("runs_lost", 0 if out.returncode == 0 else None),
                "finish_after_fault_s": recorded.get("finish_after_fault_s"),
                "test_wall_s": round(time.time() - t0, 1),
                "test": node,
            }
            if out.returncode != 0 or skipped:
                row["output_tail"] = (out.stdout + out.stderr)[-2000:]
            rows.append(row)
            print(f"[faults] {fault}: {_verdict(row['survived'])}", flush=True)
    header = f"{'fault':<56} {'survived':>8} {'runs lost':>9} {'finish after fault s':>20}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        fin = "-" if r["finish_after_fault_s"] is None else f"{r['finish_after_fault_s']:.1f}"
        lost = "-" if r["runs_lost"] is None else str(r["runs_lost"])
        verdict = {True: "yes", False: "NO", None: "skipped"}[r["survived"]]
        print(f"{r['fault']:<56} {verdict:>8} {lost:>9} {fin:>20}")
    out_path = REPO / "benchmarks" / "results" / "fault_table.json"
    out_path.write_text(
        json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2)
    )
    print(f"\nwrote {out_path}")
    return 0 if all(r["survived"] and r["runs_lost"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
