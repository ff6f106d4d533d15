#!/usr/bin/env bash
# Usage: launch/local.sh [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-p PORT] COMMAND [ARGS...]
#   launch/local.sh sft --config configs/sft/tiny_arith.yaml
#   launch/local.sh -n 2 -d 4 sft --config configs/sft/tiny_arith.yaml num_steps=5 mesh.data=2 mesh.fsdp=4
# Runs `python -m jaxreason COMMAND ...` on this machine. With -n N > 1 it starts N processes that meet
# through JAXREASON_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID on 127.0.0.1: the multi-host code path
# (jax.distributed, cross-process collectives, a global mesh) on one laptop. -d D gives each process D fake
# CPU devices. Set PYTHON to pick the interpreter (default: python).
set -euo pipefail

# The default port sits below Linux's ephemeral range (32768+), where an outgoing connection could take it.
processes=1 devices="" port=$((20000 + RANDOM % 12000))
while getopts "n:d:p:h" opt; do
  case $opt in
    n) processes=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    *) sed -n 2,4p "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
(( $# > 0 )) || { sed -n 2,4p "$0"; exit 2; }
python=${PYTHON:-python}

if [[ -n $devices ]]; then
  # A collective waits for every fake device's thread; on a loaded machine one can lag past XLA's default
  # wait, which aborts the process, so the waits are raised.
  waits="--xla_cpu_collective_call_terminate_timeout_seconds=1800 --xla_cpu_collective_timeout_seconds=1800"
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices $waits"
fi
if (( processes == 1 )); then
  exec "$python" -m jaxreason "$@"
fi

export JAXREASON_COORDINATOR=127.0.0.1:$port JAXREASON_NUM_PROCESSES=$processes
pids=()
# A process that dies leaves the others waiting on it in a collective (until jax's timeouts), where they
# cannot act on SIGTERM: on exit, TERM whatever is left, then KILL it after a grace period.
cleanup() {
  local alive=() pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
  (( ${#alive[@]} )) || return 0
  kill "${alive[@]}" 2>/dev/null || true
  sleep "${GRACE_S:-10}"
  kill -KILL "${alive[@]}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((i = 0; i < processes; i++)); do
  JAXREASON_PROCESS_ID=$i "$python" -m jaxreason "$@" > >(sed "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  wait -n || { status=$?; echo "local.sh: a process exited with status $status; stopping the others" >&2; break; }
done
exit $status
