"""Environment regvi gives the Ray processes of a sweep (report polling, GCS bounds)."""

from __future__ import annotations

import os
import subprocess
import sys


def _worker_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    code = "import json; from regvi.sweep.runner import WORKER_ENV; print(json.dumps(WORKER_ENV))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_controller_polls_every_fifth_of_a_second_by_default():
    # Ray's 2 s default made every epoch shorter than 2 s last 2 s (report queue of one)
    from regvi.sweep.trial import TRAIN_POLL_ENV

    assert _worker_env({})[TRAIN_POLL_ENV] == "0.2"


def test_a_poll_interval_set_by_the_user_wins():
    from regvi.sweep.trial import TRAIN_POLL_ENV

    assert _worker_env({TRAIN_POLL_ENV: "1.5"})[TRAIN_POLL_ENV] == "1.5"


def test_embedded_ray_starts_its_gcs_with_the_bounds():
    # a real embedded Ray: the GCS server process must run with regvi's bounds
    code = """
import json, os, pathlib, types, ray
from regvi.sweep.runner import init_ray
init_ray(None, types.SimpleNamespace(workers=1, cpus_per_worker=1, gpus_per_worker=0))
parent = {}
for d in pathlib.Path("/proc").iterdir():
    if d.name.isdigit():
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), stat)
        except OSError:
            pass
def mine(pid):
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = parent.get(pid, (0, ""))[0]
    return False
gcs = [p for p, (_, stat) in parent.items() if "(gcs_server)" in stat and mine(p)]
raw = pathlib.Path(f"/proc/{gcs[0]}/environ").read_bytes().split(b"\\0")
print(json.dumps(dict(e.decode().split("=", 1) for e in raw if b"=" in e)))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_maximum_gcs_dead_worker_cached_count"] = "7"  # a user's own value wins
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    gcs_env = json.loads(out.stdout.strip().splitlines()[-1])
    from regvi.sweep.runner import GCS_ENV

    for key, value in GCS_ENV.items():
        expected = "7" if key == "RAY_maximum_gcs_dead_worker_cached_count" else value
        assert gcs_env.get(key) == expected, (key, gcs_env.get(key))
