#!/usr/bin/env bash
# MODE=HEAD: start the Ray head, then the sllm API server on it (port 8343).
# MODE=WORKER: join the head's Ray cluster as a node and stay in the foreground.
# Extra arguments go to `sllm start` (head) or `ray start` (worker).
set -euo pipefail

: "${STORAGE_PATH:=/models}"
RAY_PORT="${RAY_PORT:-6379}"

case "${MODE:-HEAD}" in
  HEAD)
    # The head holds the API server and the job database; by default it offers no CPUs to Ray,
    # so jobs and instances run on the workers (HEAD_NUM_CPUS=N lends it N cores).
    ray start --head --port="${RAY_PORT}" --num-cpus="${HEAD_NUM_CPUS:-0}" --num-gpus=0 \
      --include-dashboard=false --disable-usage-stats
    exec sllm start --host 0.0.0.0 --port 8343 --storage-path "${STORAGE_PATH}" \
      --ray-address auto "$@"
    ;;
  WORKER)
    head="${RAY_HEAD_ADDRESS:-sllm_head:${RAY_PORT}}"
    until (exec 3<>"/dev/tcp/${head%:*}/${head##*:}") 2>/dev/null; do
      echo "waiting for the Ray head at ${head}"
      sleep 2
    done
    args=(--address="${head}" --block --disable-usage-stats)
    [ -n "${WORKER_NUM_CPUS:-}" ] && args+=(--num-cpus="${WORKER_NUM_CPUS}")
    exec ray start "${args[@]}" "$@"
    ;;
  *)
    echo "MODE must be HEAD or WORKER, not '${MODE}'" >&2
    exit 2
    ;;
esac
