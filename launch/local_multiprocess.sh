#!/usr/bin/env bash
# Runs heptapod_jax.main as N local CPU processes with gloo collectives: the
# multi-host code path on one machine.
#   launch/local_multiprocess.sh 2 4 --config=configs/fashion_mnist.py --workdir=DIR
# (2 processes x 4 fake CPU devices each; extra arguments go to main.)
set -euo pipefail
cd "$(dirname "$0")/.."
num_processes=$1; devices_per_process=$2; shift 2
port=$(( 20000 + RANDOM % 20000 ))
pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices_per_process}" \
  HEPTAPOD_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
  HEPTAPOD_NUM_PROCESSES="${num_processes}" HEPTAPOD_PROCESS_ID="${i}" \
    .venv/bin/python -m heptapod_jax.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
