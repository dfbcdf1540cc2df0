"""Counting the points where the host waits for the accelerator, on any device (the CPU included).

On a GPU the host queues kernels and runs ahead; an op whose result the host must read (a scalar, a
data-sized output, a copy to host memory) drains the queue first, so every such point stalls the GPU. On the
CPU nothing stalls, so the count is made from what the code asks for, not from time: the ops that force a
sync on a GPU by their nature are counted at dispatch, and the host reads of a tensor (``tolist``, ``numpy``,
``cpu``) where they are called. A step measured this way on CPU ranks makes the same
requests a GPU step makes, so its count is the GPU's. On CUDA, ``torch.cuda.set_sync_debug_mode`` reports the
syncs the driver sees (``tools/preflight.py``). The package reads device tensors on the host with ``tolist``,
``cpu`` or a scalar conversion, never with ``to("cpu")``, which cannot be told from a host-to-device copy here.
"""
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output the host must read: scalar reads and outputs whose size depends on the data.
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.bincount.default, aten.unique_consecutive.default, aten._unique2.default,
             aten.unique_dim.default, aten.is_nonzero.default, aten.equal.default}
# Host reads, counted where they are called (a CPU tensor's are no-ops, a GPU tensor's are copies to the host).
_HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


@dataclass
class SyncLog:
    """The syncs seen: (what, where in the package) per event, in order."""
    events: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def summary(self) -> str:
        counts = {}
        for what, where in self.events:
            counts[f"{what} at {where}"] = counts.get(f"{what} at {where}", 0) + 1
        return "\n".join(f"  {n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _where() -> str:
    """The innermost frame of this project's code (trainer/, tools/) or else of DeepSpeed."""
    frames = traceback.extract_stack()
    for marker in ("/trainer/", "/tools/", "/deepspeed/"):
        for f in reversed(frames):
            if marker in f.filename and not f.filename.endswith("host_syncs.py"):
                return f"{f.filename.split(marker)[-1]}:{f.lineno} ({f.name})"
    return "elsewhere"


def _forces_sync(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        return True
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func is aten.repeat_interleave.Tensor:  # its output size is read from the data unless given
        return kwargs.get("output_size") is None
    return False


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _forces_sync(func, args, kwargs):
            self.log.events.append((func.__name__, _where()))
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, log: SyncLog):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            self.log.events.append((func.__name__, _where()))
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs():
    """``with count_host_syncs() as log: ...``; ``log.count`` and ``log.summary()`` afterwards."""
    log = SyncLog()
    with _FunctionCounter(log), _DispatchCounter(log):
        yield log
