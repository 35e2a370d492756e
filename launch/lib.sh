# Shared helpers of launch/torchrun.sh and launch/slurm/*.sbatch (sourced, not executed).
#
# Requeue protocol (msa_train/lifecycle.py): on SIGUSR1/SIGTERM or near the wall-time limit the
# trainer saves a checkpoint, rank 0 writes <save>/requeue_request.json, and every rank exits with
# MSA_REQUEUE_EXIT_CODE. torchrun turns any worker failure into exit code 1, so the launchers
# trust the request file, not the exit code.

MSA_REQUEUE_EXIT_CODE=75   # = msa_train.lifecycle.REQUEUE_EXIT_CODE (EX_TEMPFAIL)
MSA_REQUEUE_REQUEST=requeue_request.json
MSA_PYTHON=${MSA_PYTHON:-python3}

msa_die() { echo "msa-launch: error: $*" >&2; exit 2; }
msa_log() { echo "msa-launch: $*" >&2; }

# Export a cluster preset's environment (configs/cluster/<name>.yaml).
msa_load_cluster_env() {
  local repo=$1 cluster=$2 out
  out=$("$MSA_PYTHON" "$repo/launch/cluster_env.py" "$cluster") || msa_die "cannot load cluster preset '$cluster'"
  eval "$out"
}

# torchrun relays only the signals listed here to its workers, and waits this long for them to
# finish saving before it SIGKILLs them (default 30 s: far too short for a checkpoint). PET_* are
# torchrun's environment spelling of --signals-to-handle / --shutdown-timeout (ignored by torch
# versions without those options, which then cannot relay SIGUSR1: use torch >= 2.9).
msa_export_torchrun_signal_env() {
  export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
  export PET_SHUTDOWN_TIMEOUT=${MSA_EXIT_GRACE_S:-600}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$PET_SHUTDOWN_TIMEOUT
}

# Value of the last `key=value` Hydra override in the arguments (empty if absent).
msa_override_value() {
  local key=$1 v="" a
  shift
  for a in "$@"; do
    case $a in
      "$key="*|"+$key="*|"++$key="*) v=${a#*=} ;;
    esac
  done
  printf '%s' "$v"
}

# Latest saved iteration of a Megatron-layout checkpoint dir (0 if none).
msa_latest_iteration() {
  local f=$1/latest_checkpointed_iteration.txt
  if [[ -f $f ]]; then tr -dc '0-9' <"$f"; else echo 0; fi
}

msa_requeue_requested() { [[ -n $1 && -f $1/$MSA_REQUEUE_REQUEST ]]; }

msa_clear_requeue_request() { [[ -n $1 ]] && rm -f "$1/$MSA_REQUEUE_REQUEST"; return 0; }

# Print a command with shell quoting, one line (for logs and dry runs).
msa_print_cmd() { printf '%q ' "$@"; printf '\n'; }
