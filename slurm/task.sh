#!/bin/bash
# One task of a job step: maps Slurm's ids to the variables torch.distributed and DeepSpeed read, then becomes the
# command (exec, so the signals Slurm sends the task reach the trainer itself).
#
#   srun [flags] bash slurm/task.sh .venv/bin/python trainer/main.py ...      # what slurm/train.sh runs
#
# The trainer picks its GPU from LOCAL_RANK and CUDA_VISIBLE_DEVICES (trainer/runtime/placement.py, device_index):
# device LOCAL_RANK when the task sees all of the node's GPUs, device 0 when it sees one of its own
# (srun --gpus-per-task=1, or a site's --gpu-bind).

# The tasks on this node: entry SLURM_NODEID of Slurm's compressed count ("8(x2),4" is 8, 8, 4).
tasks_on_node() {
  local entry count reps first=0
  for entry in ${SLURM_STEP_TASKS_PER_NODE//,/ }; do
    count=${entry%%(*} reps=1
    if [[ $entry == *"(x"* ]]; then reps=${entry#*(x}; reps=${reps%)}; fi
    if [ "$SLURM_NODEID" -lt $((first + reps)) ]; then echo "$count"; return; fi
    first=$((first + reps))
  done
  echo "${SLURM_NTASKS_PER_NODE:-1}"
}

local_size=$(tasks_on_node)
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
       LOCAL_SIZE=$local_size LOCAL_WORLD_SIZE=$local_size
exec "$@"
