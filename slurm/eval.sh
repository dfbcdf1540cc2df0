#!/bin/bash
# Evaluate a run's newest verified checkpoint (or CHECKPOINT) on test sets: consolidate it, then WER per set and
# their unweighted average as a Markdown and a CSV table.
#
#   RUN_DIR=runs/omni TESTS="clean=test_clean.jsonl other=test_other.jsonl" sbatch slurm/eval.sh
#SBATCH --job-name=omni-router-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=2:00:00
#SBATCH --output=%x-%j.out

RUN_DIR=${RUN_DIR:-runs/omni}                        # the trainer's --output_dir
CHECKPOINT=${CHECKPOINT:-$RUN_DIR}                   # or one checkpoints/stepN folder
TESTS=${TESTS:?set TESTS to "name=manifest ..."}     # test sets, space-separated
MODEL_DIR=${MODEL_DIR:-$RUN_DIR/consolidated}         # where the consolidated model goes
RESULTS=${RESULTS:-$RUN_DIR/results/wer}             # writes RESULTS.md and RESULTS.csv
DEVICE=${DEVICE:-$([ -n "${CUDA_VISIBLE_DEVICES:-}" ] && echo cuda || echo cpu)}
PYTHON=${PYTHON:-.venv/bin/python}

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
"$PYTHON" tools/consolidate_checkpoint.py "$CHECKPOINT" --out "$MODEL_DIR"
tests=()
for t in $TESTS; do tests+=(--test "$t"); done
"$PYTHON" tools/evaluate.py --model "$(basename "$RUN_DIR")=$MODEL_DIR" "${tests[@]}" --out "$RESULTS" --device "$DEVICE"
