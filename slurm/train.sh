#!/bin/bash
# Omni-Router training on N nodes x G GPUs, one task per GPU started by srun (no ssh, no pdsh).
#
#   sbatch slurm/train.sh                                       # ds_configs/omni.json on the embedded corpus
#   CONFIG=ds_configs/paper/omni_8x84m.json OUTPUT_DIR=runs/omni-8x84m \
#     sbatch --nodes=4 --partition=gpu slurm/train.sh --train_manifest train.jsonl --dev_manifest dev.jsonl
#
# Arguments after the script go to trainer/main.py. sbatch flags on the command line override the #SBATCH
# lines below. Five minutes before the time limit (and on preemption) every rank gets SIGUSR1: the ranks agree
# on a step, save a checkpoint and exit 75, and this script requeues the job, which resumes from that
# checkpoint. The log of every attempt is appended to one file per job: <job name>-<job id>.out.
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
echo "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST: $SLURM_NNODES nodes," \
     "$SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG, output $OUTPUT_DIR ($(date -Is))"

# Each task maps Slurm's ids to the variables torch.distributed and DeepSpeed read, then becomes the trainer.
# --wait, not --kill-on-bad-exit: ranks that all exit 75 keep that status (an early kill would turn it into 143),
# while the peers of a crashed rank are still killed after EXIT_GRACE seconds instead of hanging in a collective.
srun --kill-on-bad-exit=0 --wait="$EXIT_GRACE" bash -c \
  'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID LOCAL_SIZE=$SLURM_NTASKS_PER_NODE \
          LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"' rank \
  "$PYTHON" trainer/main.py --deepspeed_config "$CONFIG" --output_dir "$OUTPUT_DIR" "$@"
status=$?

if [ "$status" = "$REQUEUE_STATUS" ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "checkpoint saved on signal: requeueing job $SLURM_JOB_ID ($(date -Is))"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "checkpoint saved on signal, but MAX_REQUEUES=$MAX_REQUEUES restarts are used up: not requeueing"
  fi
fi
exit "$status"
