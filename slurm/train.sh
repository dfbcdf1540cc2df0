#!/bin/bash
# Omni-Router training on N nodes x G GPUs, one task per GPU started by srun (no ssh, no pdsh).
#
#   sbatch slurm/train.sh                                       # ds_configs/omni.json on the embedded corpus
#   CONFIG=ds_configs/paper/omni_8x84m.json OUTPUT_DIR=runs/omni-8x84m \
#     sbatch --nodes=4 --partition=gpu slurm/train.sh --train_manifest train.jsonl --dev_manifest dev.jsonl
#
# Arguments after the script go to trainer/main.py. sbatch flags on the command line override the #SBATCH
# lines below. The log of every attempt is appended to one file per job: <job name>-<job id>.out.
#
# Stops and restarts (README, "On a SLURM cluster"). A rank that gets SIGUSR1 or SIGTERM makes all of them agree
# on a step, save a checkpoint and exit 75; this script then requeues the job, which resumes from it:
#  - time limit: --signal=USR1@300 sends SIGUSR1 to the ranks five minutes before it;
#  - preemption with a grace time (the partition's GraceTime > 0): SLURM sends SIGTERM to the ranks at once;
#  - a signal to this script alone (scancel --batch, --signal=B:USR1@300): forwarded to the ranks.
# Preemption without a grace time and node failure: SLURM ends the job at once; it is requeued (by SLURM under
# PreemptMode=REQUEUE and on node failure, by this script under PreemptMode=CANCEL) and resumes from its newest
# complete checkpoint. scancel and a time limit reached end the job for good.
#SBATCH --job-name=omni-router
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-ds_configs/omni.json}               # DeepSpeed config with the omni_router section
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-omni-router}}  # checkpoints, metrics, tokenizer
PYTHON=${PYTHON:-.venv/bin/python}                   # the interpreter with the pinned packages
MAX_REQUEUES=${MAX_REQUEUES:-50}                     # give up after this many signal-requested restarts
EXIT_GRACE=${EXIT_GRACE:-120}                        # seconds the other ranks get once one has exited
REQUEUE_STATUS=75                                    # trainer/main.py's exit status after a save on signal

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address Slurm itself uses to reach the first node (the node name need not resolve).
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" -o | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# NCCL reads its settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ...) from the environment, which srun
# passes on whole (--export=ALL below). A collective that times out aborts the communicators and raises in the
# rank (2, CleanUpOnly), which names its phase and the collective; torch's default (3) ends the process from
# its watchdog thread (SIGABRT, exit 134) before the trainer can say where. The flight recorder's per-rank dump
# of the last collectives goes to the output folder.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-2}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$OUTPUT_DIR/nccl_trace_rank_}
echo "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST: $SLURM_NNODES nodes," \
     "$SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, output $OUTPUT_DIR ($(date -Is))"
echo "NCCL environment: $(env | grep -E '^(TORCH_)?NCCL_' | sort | tr '\n' ' ')"

job() {  # a field of this job as slurmctld sees it (JobState: RUNNING, or COMPLETING once SLURM ends the job)
  local record try
  for try in 1 2 3; do
    record=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) && break
    sleep 1
  done
  grep -o "$1=[^ ]*" <<< "$record" | cut -d= -f2
}

# A signal to this script alone (scancel --batch, --signal=B:...) goes on to the ranks, through slurmctld to
# the job's steps: never to srun itself, which turns SIGTERM into SIGKILL of the ranks. When SLURM is ending
# the job (scancel, time limit, preemption, node failure) the ranks have had the signal already.
interrupted=0
forward() {
  interrupted=1
  local now
  now=$(job JobState)
  if [ "$now" = RUNNING ]; then
    echo "this script got SIG$1: forwarding it to the ranks ($(date -Is))"
    scancel --signal="$1" "$SLURM_JOB_ID"
  else
    echo "this script got SIG$1 while SLURM ends job $SLURM_JOB_ID (state $now) ($(date -Is))"
  fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1

# One task per GPU, in blocks of consecutive ranks per node (an expert-parallel group stays on one node), each
# with the job's CPUs per task (srun does not inherit --cpus-per-task on SLURM 22.05-23.02). --wait, not
# --kill-on-bad-exit: ranks that all exit 75 keep that status (an early kill would turn it into 143), while the
# peers of a crashed rank are still killed after EXIT_GRACE seconds instead of hanging in a collective.
step=(--export=ALL --distribution=block:block --kill-on-bad-exit=0 --wait="$EXIT_GRACE")
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && step+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun "${step[@]}" bash slurm/task.sh \
  "$PYTHON" trainer/main.py --deepspeed_config "$CONFIG" --output_dir "$OUTPUT_DIR" "$@" &
srun_pid=$!
# bash's wait returns when a trapped signal arrives: wait again until one returns srun's own status.
while :; do
  interrupted=0
  wait "$srun_pid"
  status=$?
  [ "$interrupted" = 1 ] && [ "$status" -gt 128 ] || break
done

# Requeue when the ranks saved on a signal while the job still runs, or when SLURM preempted it without a grace
# time and will not requeue it itself (PreemptMode=CANCEL: PreemptTime set, its restart count unchanged).
# Otherwise SLURM is ending the job (scancel, time limit), or has requeued it already (PreemptMode=REQUEUE,
# node failure).
now=$(job JobState) preempted=$(job PreemptTime) restarts=$(job Restarts) why=""
if [ "$now" = RUNNING ] && [ "$status" = "$REQUEUE_STATUS" ]; then
  why="checkpoint saved on signal"
elif [ -n "$preempted" ] && [ "$preempted" != None ] && [ "$restarts" = "${SLURM_RESTART_COUNT:-0}" ]; then
  why="preempted without a grace time (exit status $status), not requeued by SLURM"
elif [ "$status" = "$REQUEUE_STATUS" ] && [ "$restarts" != "${SLURM_RESTART_COUNT:-0}" ]; then
  echo "checkpoint saved on signal; SLURM has requeued job $SLURM_JOB_ID itself"
elif [ "$status" = "$REQUEUE_STATUS" ]; then
  echo "checkpoint saved on signal, but SLURM is ending job $SLURM_JOB_ID (state $now): not requeueing"
fi
if [ -n "${why:-}" ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "$why: requeueing job $SLURM_JOB_ID ($(date -Is))"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "$why, but MAX_REQUEUES=$MAX_REQUEUES restarts are used up: not requeueing"
  fi
fi
exit "$status"
