"""Which GPUs this process was given and which one a rank takes, read from the environment alone.

No torch here: the launcher's probes and the preflight read the same rule without the import.
"""
import glob
import os

SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


def allocated_gpus(under_deepspeed_launcher: bool) -> dict:
    """The signs that this process was given GPUs: SLURM's GPU variables, NVIDIA device files, and
    CUDA_VISIBLE_DEVICES unless DeepSpeed's launcher set it (it does, even on its CPU accelerator)."""
    names = SLURM_GPU_VARIABLES + (() if under_deepspeed_launcher else ("CUDA_VISIBLE_DEVICES",))
    found = {k: os.environ[k].strip() for k in names if names_gpus(k, os.environ.get(k, "").strip())}
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return {**found, **({"devices": " ".join(devices)} if devices else {})}


def names_gpus(variable: str, value: str) -> bool:
    """Whether a GPU variable's value names devices ('', -1 and NoDevFiles name none)."""
    return value not in ("", "-1", "NoDevFiles") and not (variable == "SLURM_GPUS_ON_NODE" and value == "0")


def device_index(local_rank: int, visible: str) -> int:
    """This rank's accelerator index on its node, from ``LOCAL_RANK`` and ``CUDA_VISIBLE_DEVICES`` (``visible``,
    '' when unset). A task that sees exactly one device (``srun --gpus-per-task=1``, a site's ``--gpu-bind``) uses
    it, index 0, whatever its local rank; a task that sees all of the node's devices takes its local rank."""
    devices = [d for d in visible.split(",") if d.strip()] if names_gpus("CUDA_VISIBLE_DEVICES", visible.strip()) \
        else []
    if len(devices) == 1:
        return 0
    if devices and not 0 <= local_rank < len(devices):
        raise ValueError(f"LOCAL_RANK={local_rank} but CUDA_VISIBLE_DEVICES={visible} names {len(devices)} "
                         "device(s): start at most one task per visible GPU on a node, or give each task a GPU "
                         "of its own (srun --gpus-per-task=1)")
    return local_rank
