#!/usr/bin/env bash
# Single-node training with torchrun; every argument is a Hydra override passed to msa-train.
#
#   launch/torchrun.sh experiment=tiny_msa_moe train.global_batch_size=64
#   NPROC=4 MSA_CLUSTER=local launch/torchrun.sh experiment=... checkpoint.save=/ckpt/run1
#
# Environment:
#   NPROC               processes (default: visible GPUs; 1 without GPUs -> CPU/gloo)
#   MSA_CLUSTER         preset in configs/cluster (default: local), exported before torchrun
#   MSA_ENTRY           Python script to run instead of `-m msa_train.train` (custom entry points)
#   MSA_LAUNCH_DRY_RUN  1 = print the torchrun command and exit
# Exit code: the trainer's, except 75 (= msa_train.lifecycle.REQUEUE_EXIT_CODE) when the trainer
# stopped early on SIGUSR1/SIGTERM/wall time and asked to be restarted (<checkpoint.save>/
# requeue_request.json). Signals sent to this script are forwarded to torchrun, which relays them
# to the workers.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

msa_load_cluster_env "$REPO" "${MSA_CLUSTER:-local}"
msa_export_torchrun_signal_env

nproc=${NPROC:-}
if [[ -z $nproc ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a _devs <<<"$CUDA_VISIBLE_DEVICES"
    nproc=${#_devs[@]}
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L | grep -c '^GPU')
  else
    nproc=1
  fi
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || msa_die "NPROC must be a positive integer, got '$nproc'"

entry=(-m msa_train.train)
[[ -n ${MSA_ENTRY:-} ]] && entry=("$MSA_ENTRY")
cmd=(torchrun --standalone --nnodes=1 --nproc-per-node="$nproc" --max-restarts=0 "${entry[@]}" "$@")
if [[ ${MSA_LAUNCH_DRY_RUN:-0} == 1 ]]; then
  msa_print_cmd "${cmd[@]}"
  exit 0
fi

save=$(msa_override_value checkpoint.save "$@")
msa_clear_requeue_request "$save"
msa_log "$(msa_print_cmd "${cmd[@]}")"

"${cmd[@]}" &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null || true' USR1
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
trap 'kill -INT "$pid" 2>/dev/null || true' INT
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break   # a trapped signal interrupted wait: keep waiting
done

if msa_requeue_requested "$save"; then
  msa_log "trainer saved and asked to be restarted ($save/$MSA_REQUEUE_REQUEST); exit $MSA_REQUEUE_EXIT_CODE"
  exit "$MSA_REQUEUE_EXIT_CODE"
fi
exit "$rc"
