#!/usr/bin/env bash
# N local processes, each with D CPU devices, joined with gloo collectives: the multi-host
# code path on one machine (the tests run it this way). Ctrl-C (or SIGTERM to this script)
# makes every process save the same step and stop; run the same command again to continue.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [lmjax train arguments...]
#   launch/local_multiprocess.sh 2 4 decoder_tiny --set mesh.fsdp=8 --set mesh.data=1 --set train.run_dir=runs/mp
set -euo pipefail
num_processes=${1:?number of processes}
devices=${2:?devices per process}
shift 2
port=${LMJAX_PORT:-$((20000 + RANDOM % 20000))}
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < num_processes; i++)); do
  lmjax train "$@" --coordinator "127.0.0.1:${port}" --num-processes "$num_processes" --process-id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trap interrupts `wait`
  wait "$pid" || status=$?  # the exit status, once it has exited
done
exit $status
