#!/usr/bin/env bash
# Runs one training job as N processes on this machine (the multi-host code path of TPU pods and GPU
# clusters, on CPU: gloo collectives, DEVICES_PER_PROCESS simulated devices each).
#   launch/local_multiprocess.sh 2 --config=configs/qwen_moe.py --config.workdir=/tmp/mp
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES=${1:?usage: $0 NUM_PROCESSES [train flags...]}
shift
PORT=${PORT:-$((20000 + RANDOM % 20000))}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}" \
    python -m gspo_jax.train "$@" \
      --config.distributed.coordinator_address="127.0.0.1:${PORT}" \
      --config.distributed.num_processes="${NUM_PROCESSES}" \
      --config.distributed.process_id="${i}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
