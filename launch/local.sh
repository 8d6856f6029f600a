#!/usr/bin/env bash
# Run N skymoe processes on this machine as one multi-process JAX job (CPU, gloo collectives).
# For testing multi-host code paths without a cluster.
#
#   launch/local.sh N [-d DEVICES_PER_PROCESS] -- skymoe train --config.parallel.mesh='(1,-1,1)' ...
#
# Process 0 prints to this terminal; process i > 0 writes to $SKYMOE_LOG_DIR/process_i.log
# (default: a temporary directory, printed at the start). The exit status is the first failure.
set -euo pipefail

usage() { echo "usage: $0 N [-d DEVICES_PER_PROCESS] -- command ..." >&2; exit 2; }
[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1; shift
devices=4
if [[ ${1:-} == -d ]]; then
  [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage
  devices=$2; shift 2
fi
[[ ${1:-} == -- ]] || usage
shift
[[ $# -ge 1 ]] || usage

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
logs=${SKYMOE_LOG_DIR:-$(mktemp -d -t skymoe-local-XXXXXX)}
mkdir -p "$logs"
echo "launch/local.sh: $n processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs of processes 1..$((n - 1)) in $logs" >&2

pids=()
for ((i = 0; i < n; i++)); do
  env SKYMOE_COORDINATOR="127.0.0.1:$port" SKYMOE_NUM_PROCESSES="$n" SKYMOE_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$@" > >(if ((i == 0)); then cat; else cat > "$logs/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done

# The first process to fail (in time) decides the exit status, and the others are stopped: a
# JAX process whose peer died would otherwise wait in a collective until the heartbeat times out.
# (`if ! wait "$pid"; then code=$?` would read the status of `!`, always 0.)
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  code=0
  wait -n -p done_pid "${running[@]}" || code=$?
  left=()
  for pid in "${running[@]}"; do ((pid == done_pid)) || left+=("$pid"); done
  running=("${left[@]}")
  if ((code != 0 && status == 0)); then
    status=$code
    echo "launch/local.sh: a process exited with status $code; stopping the others" >&2
    kill -TERM "${running[@]}" 2>/dev/null || true
  fi
done
exit $status
