# Body of the msa-train sbatch scripts (sourced by launch/slurm/*.sbatch after they set the
# recipe: MSA_RECIPE_EXPERIMENT, MSA_RECIPE_NAME, MSA_RECIPE_CLUSTER, MSA_RECIPE_NEEDS_INIT_FROM).
#
# One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous at the first node of the job.
# Graceful stop: the sbatch scripts ask Slurm for SIGUSR1 to the batch shell before the limit
# (--signal=B:USR1@...); this shell forwards it to the job step, torchrun relays it to the workers,
# the trainer saves, writes <save>/requeue_request.json and exits. The trainer also stops on its
# own when MSA_JOB_END_TIME - exit_grace_s is near. Then this shell requeues the job, unless the
# chain is capped: at most MSA_MAX_REQUEUES restarts, and at most MSA_MAX_STALLED_REQUEUES
# consecutive jobs that saved no new checkpoint iteration.
#
# Environment knobs (all optional):
#   MSA_RUN_NAME  MSA_SAVE_DIR  MSA_RUN_DIR  MSA_LOG_DIR     where things go (default under the repo)
#   MSA_CLUSTER           preset in configs/cluster (default: the recipe's)
#   MSA_INIT_FROM         CPT: the dense checkpoint to convert (required, also on restarts)
#   MSA_RDZV_PORT         c10d port on the first node (default 29500)
#   MSA_MAX_REQUEUES (default 100)  MSA_MAX_STALLED_REQUEUES (default 1)
#   MSA_LAUNCH_DRY_RUN=1  print the srun/torchrun command and exit (no GPUs needed)

# Seconds left in a Slurm time string ([days-]hh:mm:ss | mm:ss | ss); empty for UNLIMITED/NOT_SET.
msa_slurm_seconds() {
  local s=$1 days=0 h=0 m=0 sec=0 p
  [[ $s =~ ^[0-9] ]] || return 0
  if [[ $s == *-* ]]; then days=${s%%-*}; s=${s#*-}; fi
  IFS=: read -r -a p <<<"$s"
  case ${#p[@]} in
    3) h=${p[0]}; m=${p[1]}; sec=${p[2]} ;;
    2) m=${p[0]}; sec=${p[1]} ;;
    1) sec=${p[0]} ;;
  esac
  echo $(( 10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$sec ))
}

# Absolute UNIX time at which Slurm kills this job (empty if unknown / unlimited).
msa_slurm_job_end_time() {
  if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then echo "$SLURM_JOB_END_TIME"; return; fi
  local left
  left=$(msa_slurm_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || true)")
  [[ -n $left ]] && echo $(( $(date +%s) + left ))
  return 0
}

msa_slurm_forward_signal() {
  msa_log "batch shell caught SIG$1: asking the trainer to save and stop (SIGUSR1 to the job steps)"
  # Without --batch/--full, scancel signals the job steps (torchrun on every node), not this shell.
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$MSA_SRUN_PID" 2>/dev/null || true
}

# Requeue this job after a requested stop, unless the chain is capped.
msa_slurm_requeue_or_stop() {
  local save=$1 before=$2 after=$3
  local restart=${SLURM_RESTART_COUNT:-0} max=${MSA_MAX_REQUEUES:-100}
  local max_stalls=${MSA_MAX_STALLED_REQUEUES:-1} stall_file=$save/.msa_stalled_jobs stalls=0
  # A fresh submission (not a requeue) starts a new chain.
  if [[ $restart -gt 0 && -f $stall_file ]]; then stalls=$(tr -dc '0-9' <"$stall_file"); fi
  if (( after > before )); then stalls=0; else stalls=$(( ${stalls:-0} + 1 )); fi
  echo "$stalls" >"$stall_file"
  if (( stalls > max_stalls )); then
    msa_log "not requeueing: $stalls consecutive job(s) saved no new checkpoint (iteration still $after); MSA_MAX_STALLED_REQUEUES=$max_stalls"
    return 1
  fi
  if (( restart >= max )); then
    msa_log "not requeueing: restart $restart reached MSA_MAX_REQUEUES=$max"
    return 1
  fi
  msa_log "requeueing job $SLURM_JOB_ID (restart $((restart + 1)), checkpoint iteration $before -> $after)"
  scontrol requeue "$SLURM_JOB_ID"
}

msa_slurm_main() {
  [[ -n ${SLURM_JOB_ID:-} ]] || msa_die "not inside a Slurm job (submit with sbatch)"
  : "${MSA_RECIPE_EXPERIMENT:?recipe must set MSA_RECIPE_EXPERIMENT}"
  local repo=$MSA_REPO
  local name=${MSA_RUN_NAME:-$MSA_RECIPE_NAME}
  local save=${MSA_SAVE_DIR:-$repo/checkpoints/$name}
  local run_dir=${MSA_RUN_DIR:-$repo/runs/$name}
  local log_dir=${MSA_LOG_DIR:-$repo/logs}
  local restart=${SLURM_RESTART_COUNT:-0}
  local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
  [[ $nnodes =~ ^[1-9][0-9]*$ ]] || msa_die "SLURM_JOB_NUM_NODES is not set or not a number ('$nnodes')"

  msa_load_cluster_env "$repo" "${MSA_CLUSTER:-$MSA_RECIPE_CLUSTER}"
  msa_export_torchrun_signal_env
  local hosts head
  mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}")
  head=${hosts[0]:-}
  [[ -n $head ]] || msa_die "cannot resolve the first node of SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
  local end
  end=$(msa_slurm_job_end_time)
  if [[ -n $end ]]; then export MSA_JOB_END_TIME=$end; fi

  local overrides=("experiment=$MSA_RECIPE_EXPERIMENT" "name=$name" "run_dir=$run_dir"
                   "checkpoint.save=$save")
  if [[ ${MSA_RECIPE_NEEDS_INIT_FROM:-0} == 1 && -z $(msa_override_value checkpoint.init_from "$@") ]]; then
    # Needed on every restart too (the experiment declares it mandatory); the trainer ignores it
    # once checkpoint.save holds a checkpoint to resume from.
    [[ -n ${MSA_INIT_FROM:-} ]] ||
      msa_die "this recipe converts a dense checkpoint: set MSA_INIT_FROM=<dense checkpoint dir> (or pass checkpoint.init_from=...)"
    overrides+=("checkpoint.init_from=$MSA_INIT_FROM")
  fi

  local torchrun_cmd=(torchrun
    --nnodes="$nnodes" --nproc-per-node="$MSA_GPUS_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$head:${MSA_RDZV_PORT:-29500}"
    --rdzv-id="$SLURM_JOB_ID-$restart" --max-restarts=0
    --log-dir="$log_dir/$name-$SLURM_JOB_ID/restart$restart" --tee=3
    -m msa_train.train "${overrides[@]}" "$@")
  local cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --ntasks="$nnodes" --kill-on-bad-exit=1
             --label "${torchrun_cmd[@]}")
  if [[ ${MSA_LAUNCH_DRY_RUN:-0} == 1 ]]; then
    msa_print_cmd "${cmd[@]}"
    return 0
  fi

  mkdir -p "$save" "$run_dir" "$log_dir"
  msa_clear_requeue_request "$save"
  local before after rc=0
  before=$(msa_latest_iteration "$save")
  msa_log "job $SLURM_JOB_ID restart $restart: $nnodes nodes x $MSA_GPUS_PER_NODE GPUs, rendezvous $head, checkpoint iteration $before, ends at ${MSA_JOB_END_TIME:-unknown}"
  msa_log "$(msa_print_cmd "${cmd[@]}")"

  "${cmd[@]}" &
  MSA_SRUN_PID=$!
  trap 'msa_slurm_forward_signal USR1' USR1
  trap 'msa_slurm_forward_signal TERM' TERM
  while :; do
    wait "$MSA_SRUN_PID" && rc=0 || rc=$?
    kill -0 "$MSA_SRUN_PID" 2>/dev/null || break   # a trapped signal interrupted wait
  done
  trap - USR1 TERM

  after=$(msa_latest_iteration "$save")
  if msa_requeue_requested "$save"; then
    msa_slurm_requeue_or_stop "$save" "$before" "$after" && return 0
    return 1
  fi
  if (( rc == 0 )); then
    msa_log "training finished (checkpoint iteration $after)"
  else
    msa_log "trainer failed with exit code $rc and did not ask for a requeue: not requeueing"
  fi
  return "$rc"
}
