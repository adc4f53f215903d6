#!/usr/bin/env bash
# Start a 2-node Ray cluster on this machine (head + one worker node, both on 127.0.0.1),
# for trying the cluster path without a cluster. Stop it with: ray stop --force
#
#   bash cluster/start_local_cluster.sh [PORT] [CPUS_PER_NODE]
#   python -m regvi.sweep sweeps/quickstart.yaml --address 127.0.0.1:${PORT:-6380}
set -euo pipefail
# Ray 2.5x+ enables token auth for clusters started with `ray start`; every command (and the
# sweep driver) must use the same mode and the token in ~/.ray/auth_token.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# Bound what the GCS keeps about finished actors, workers and tasks (a sweep starts ~8 actors
# per trial; Ray's defaults let the head's memory grow with every trial).
export RAY_maximum_gcs_destroyed_actor_cached_count=${RAY_maximum_gcs_destroyed_actor_cached_count:-50}
export RAY_maximum_gcs_dead_worker_cached_count=${RAY_maximum_gcs_dead_worker_cached_count:-50}
export RAY_task_events_max_num_task_in_gcs=${RAY_task_events_max_num_task_in_gcs:-2000}
# `ray start` refuses to start with token auth and no token: make one on first use (it is kept
# in ~/.ray/auth_token, mode 600, and never printed).
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] \
  && [ ! -s "$HOME/.ray/auth_token" ]; then
  ray get-auth-token --generate >/dev/null
fi
PORT=${1:-6380}
CPUS=${2:-1}
ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$CPUS" \
  --dashboard-host=127.0.0.1 --include-dashboard=true --disable-usage-stats
# A second raylet on the same host: its own temp dir is not needed, only its own ports.
ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$CPUS" \
  --min-worker-port=12000 --max-worker-port=12999 --disable-usage-stats
echo "Ray cluster up at 127.0.0.1:$PORT (2 nodes x $CPUS CPU)"
