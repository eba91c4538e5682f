#!/usr/bin/env bash
# N processes on this machine forming one mesh over loopback (CPU devices, gloo collectives).
# This is how multi-host code is exercised without a cluster; tests/test_multiprocess.py does the same.
#   launch/local_multiprocess.sh 2 --config=configs/siglip.py:scale=tiny --workdir=/tmp/mp
# DEVICES_PER_PROCESS (default 2) fake CPU devices per process.
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES [vljax.main flags...]}; shift
port=${PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
export JAX_PLATFORMS=cpu
pids=()
for ((i = 0; i < n; i++)); do
  python -m vljax.main --coordinator_address="127.0.0.1:${port}" --num_processes="$n" \
    --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
