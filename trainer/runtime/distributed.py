"""Every collective of the package, on one device rule, entered by every rank.

Two rules keep multi-rank runs from crashing or hanging:

* one device for every collective, object or tensor: the accelerator device of this rank, set from
  ``LOCAL_RANK`` when the process group is joined and before anything else talks to it (under NCCL an object
  collective stages its tensors on ``torch.cuda.current_device()``, which is cuda:0 on every local rank until
  the device is set, while DeepSpeed binds the NCCL communicator to cuda:LOCAL_RANK);
* every rank calls every collective, in the same order, whether or not it has anything to contribute (a rank
  that returns early leaves the others waiting until the timeout).

Nothing else in the package calls ``torch.distributed`` directly; DeepSpeed's engine makes its own calls.
"""
import os
import re
import sys
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import deepspeed
import torch
import torch.distributed as dist

from trainer.runtime.deepspeed_contract import skip_shm_comm_build
from trainer.runtime.placement import allocated_gpus, device_index


# The oldest Linux driver each CUDA major version of a torch build runs on (CUDA's minor version compatibility).
MIN_DRIVER = {13: "580.65", 12: "525.60", 11: "450.80"}


def missing_gpus(under_deepspeed_launcher: bool) -> str:
    """Why this process would train on the CPU although GPUs were allocated to it ('' when it would not):
    a torch built for a newer CUDA than the driver supports finds no device, and DeepSpeed then quietly picks
    its CPU accelerator and gloo."""
    allocated = allocated_gpus(under_deepspeed_launcher)
    if not allocated:
        return ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return ""
    cuda = torch.version.cuda
    major = int(cuda.split(".")[0]) if cuda else 0
    needs = f"an NVIDIA driver >= {MIN_DRIVER[major]}" if major in MIN_DRIVER else "a matching NVIDIA driver"
    driver = Path("/proc/driver/nvidia/version")
    found = driver.read_text().splitlines()[0].strip() if driver.exists() else "no NVIDIA kernel driver loaded"
    said = "; ".join(str(w.message).strip() for w in caught)
    version = torch.__version__
    build = f"torch {version} built for CUDA {cuda}" if cuda else f"torch {version}, a CPU-only build"
    return (f"GPUs were allocated ({', '.join(f'{k}={v}' for k, v in allocated.items())}) but {build} sees no "
            f"usable CUDA device{f' ({said})' if said else ''}. This build needs {needs}; this node: {found}. "
            "Install the torch build for your driver's CUDA version (https://pytorch.org/get-started/locally), "
            "or set omni_router.run.allow_cpu true to train on the CPU on purpose.")


def init(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group the launcher describes (deepspeed, torchrun or srun env); return (rank, world).
    A collective that does not complete within ``timeout_s`` raises on the ranks waiting in it."""
    # The accelerator device first: any collective, DeepSpeed's own included, must find it set.
    deepspeed.get_accelerator().set_device(device_index(int(os.environ.get("LOCAL_RANK", "0")),
                                                        os.environ.get("CUDA_VISIBLE_DEVICES", "")))
    # The shared-memory op serves only inference all-reduce; skipping it saves a minute of g++ per fresh node.
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                               timeout=timedelta(seconds=timeout_s))
    _timeout_s[0] = timeout_s
    # Every rank has joined before any may leave: rank 0 ending at once (a data error found by all) would
    # otherwise take the rendezvous store away from a peer still joining, which then dies with a traceback.
    dist.barrier()
    return dist.get_rank(), dist.get_world_size()


_timeout_s = [300.0]  # the run's collective timeout, given at init


def end_process(code: int):
    """End this rank's process with ``code`` without interpreter finalization (``os._exit``, after flushing).

    ``destroy_process_group`` leaves gloo's transport threads and the TCPStore thread running: DeepSpeed's group
    registry still holds the groups (8 ``pt_gloo_runloop`` threads per rank after it, on two ranks). They were
    torn down in interpreter finalization, where a C++ thread that needs the GIL aborts the process (SIGABRT,
    "terminate called without an active exception"; pytorch#179291): rarely, after a run that had ended well.
    Nothing is left to finalize: checkpoints and metrics are written and closed by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def apply_timeout(seconds: Optional[float] = None):
    """Give every process group of this process the timeout (default: the run's). Groups made after init
    (DeepSpeed's expert and data-parallel groups) otherwise get the backend's default, 30 min for gloo."""
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds or _timeout_s[0]), group)


@contextmanager
def timeout(seconds: float):
    """Another collective timeout for every group while the block runs (checkpoint I/O), then the run's."""
    if not dist.is_initialized():
        yield
        return
    apply_timeout(seconds)
    try:
        yield
    finally:
        apply_timeout()


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo and NCCL word it so; NCCL raises DistError)."""
    return isinstance(error, dist.DistError) or bool(re.search(
        r"Timed out|Connection closed|Connection reset|gloo|NCCL|Broken pipe", str(error)))


def device() -> torch.device:
    """The device of every collective's tensors: this rank's accelerator (the CPU under gloo), or the device a
    dry run stands in for it (``collectives_on``)."""
    return _stand_in[0] or torch.device(deepspeed.get_accelerator().current_device_name())


_stand_in = [None]


@contextmanager
def collectives_on(stand_in: torch.device):
    """Collectives on ``stand_in`` while the block runs: the ``meta`` tensors of ``tools/dry_run.py``, under a
    process group that moves nothing, in place of the accelerator this machine lacks."""
    _stand_in[0] = stand_in
    try:
        yield
    finally:
        _stand_in[0] = None


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def log0(*args):
    """Print on rank 0 only (or when there is no process group)."""
    if rank() == 0:
        print(*args, flush=True)


def barrier():
    """Wait for every rank."""
    dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (an object collective)."""
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device())
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable, raises: type, errors=(OSError, ValueError, RuntimeError)):
    """Run ``fn`` on rank 0 while the others wait; its error, if any, is raised on every rank as ``raises`` (with
    the error's type and message), so no rank is left waiting for one that failed."""
    message = ""
    if rank() == 0:
        try:
            fn()
        except errors as e:
            message = f"{type(e).__name__}: {e}"
    message = broadcast_from_rank0(message)
    if message:
        raise raises(message)


def group_max(value: torch.Tensor, group) -> int:
    """The largest of a one-element integer tensor over a process group, read on the host: with one rank in
    the group the value itself (no copy, and no sync where it is on the host); else one all-reduce on the
    collective device and one host read (a sync)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return int(value)
    t = value.reshape(1).to(device(), torch.int64, non_blocking=True)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def sum_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyed all-reduce: every tensor summed over the ranks in one collective, returned in float64 on the
    collective device (``device()``), in the same shapes. No host sync: a caller that needs a value on the host
    reads it. Every rank must pass the same keys and shapes."""
    keys = sorted(values)
    flat = torch.cat([values[k].detach().reshape(-1).to(device(), torch.float64, non_blocking=True) for k in keys])
    if world() > 1:
        dist.all_reduce(flat)
    out, at = {}, 0
    for k in keys:
        n = values[k].numel()
        out[k] = flat[at:at + n].view(values[k].shape)
        at += n
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with split sizes; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list, in_splits: list, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group) -> torch.Tensor:
    """Rows ``x`` split by ``in_splits`` to the group's ranks in order; receive ``out_splits`` rows from each
    (differentiable)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(counts_GX: torch.Tensor, group) -> torch.Tensor:
    """Row g of ``counts_GX`` goes to rank g of the group; returns the rows received, one per source rank."""
    received = torch.empty_like(counts_GX, device=device())
    dist.all_to_all_single(received, counts_GX.to(device(), non_blocking=True).contiguous(), group=group)
    return received.to(counts_GX.device)
