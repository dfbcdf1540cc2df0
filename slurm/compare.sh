#!/bin/bash
# One run of the routing comparison per array task: task i is line i+1 of RUNS/tasks.txt ("config output_dir"),
# written by `python -m tools.compare_routing plan --out RUNS ...`. Each task is a slurm/train.sh job of its
# own (srun ranks, SIGUSR1 before the time limit, save, requeue of this array task); a finished run exits 0 at
# once. When the array is done: `python -m tools.compare_routing report --out RUNS`.
#
#   sbatch --array=0-8 slurm/compare.sh runs/compare [trainer flags...]
#SBATCH --job-name=omni-router-compare
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
RUNS=${1:?usage: sbatch --array=0-N slurm/compare.sh RUNS_FOLDER [trainer flags...]}
shift
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$RUNS/tasks.txt")
if [ -z "$line" ]; then
  echo "array task $SLURM_ARRAY_TASK_ID: $RUNS/tasks.txt has no line $((SLURM_ARRAY_TASK_ID + 1))"
  exit 2
fi
read -r CONFIG OUTPUT_DIR <<< "$line"
if [ -e "$OUTPUT_DIR/results.json" ]; then
  echo "array task $SLURM_ARRAY_TASK_ID: $OUTPUT_DIR is finished"
  exit 0
fi
CONFIG=$CONFIG OUTPUT_DIR=$OUTPUT_DIR exec bash slurm/train.sh "$@"
