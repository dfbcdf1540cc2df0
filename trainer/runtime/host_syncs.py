"""Counting the points where the host waits for the accelerator, on any device (the CPU included).

On a GPU the host queues kernels and runs ahead; an op whose result the host must read (a scalar, a
data-sized output, a copy to host memory) drains the queue first, so every such point stalls the GPU. On the
CPU nothing stalls, so the count is made from what the code asks for, not from time: the ops that force a
sync on a GPU by their nature are counted at dispatch, and the host reads of a tensor (``tolist``, ``numpy``,
``cpu``) where they are called. A step measured this way on CPU ranks makes the same
requests a GPU step makes, so its count is the GPU's. On CUDA, ``torch.cuda.set_sync_debug_mode`` reports the
syncs the driver sees (``tools/preflight.py``). The package reads device tensors on the host with ``tolist``,
``cpu`` or a scalar conversion, never with ``to("cpu")``, which cannot be told from a host-to-device copy here.

Given the step's ``device`` (a GPU, or ``meta`` in a dry run, ``tools/dry_run.py``), host and device tensors
differ, and the count is exact: reads of device tensors alone, and copies from the host to the device, where a
copy not asked to be non-blocking (``.to(device)``, ``torch.tensor(..., device=)``) waits for the device
queue on CUDA: a sync. Non-blocking copies are listed apart (``SyncLog.copies``).
"""
import traceback
import warnings
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
    """The syncs seen, and the non-blocking host-to-device copies: (what, where in the package) per event."""
    events: list = field(default_factory=list)
    copies: list = field(default_factory=list)

    @property
    def count(self) -> int:
        """Host syncs seen."""
        return len(self.events)

    def summary(self, events: list = None) -> str:
        """One line per kind and place, the most frequent first."""
        counts = {}
        for what, where in self.events if events is None else events:
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


def _on(t, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == device_type


def _host_to_device(func, args, kwargs, device_type: str):
    """None, or whether this op is a copy from the host to the device that was asked to be non-blocking."""
    if func is aten._to_copy.default and _on(args[0], "cpu") and getattr(kwargs.get("device"), "type", None) == \
            device_type:
        return bool(kwargs.get("non_blocking"))
    if func is aten.copy_.default and _on(args[0], device_type) and _on(args[1], "cpu"):
        return bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))
    return None


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, log: SyncLog, device_type: str):
        super().__init__()
        self.log, self.device_type = log, device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device_type == "cpu":
            if _forces_sync(func, args, kwargs):
                self.log.events.append((func.__name__, _where()))
        elif (non_blocking := _host_to_device(func, args, kwargs, self.device_type)) is not None:
            (self.log.copies if non_blocking else self.log.events).append(
                ("host-to-device copy" if non_blocking else "blocking host-to-device copy", _where()))
        elif _forces_sync(func, args, kwargs) and any(_on(a, self.device_type) for a in args):
            self.log.events.append((func.__name__, _where()))
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, log: SyncLog, device_type: str):
        super().__init__()
        self.log, self.device_type = log, device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS and (self.device_type == "cpu" or _on(args[0], self.device_type)):
            self.log.events.append((func.__name__, _where()))
        elif func in (torch.tensor, torch.as_tensor) and self.device_type != "cpu" and \
                torch.device(kwargs.get("device") or "cpu").type == self.device_type:
            self.log.events.append(("blocking host-to-device copy", _where()))  # made on the host, then copied
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs(device=None):
    """``with count_host_syncs() as log: ...``; ``log.count`` and ``log.summary()`` afterwards. ``device``: the
    step's device, where it is not the CPU (see the module's docstring)."""
    log = SyncLog()
    device_type = torch.device(device or "cpu").type
    with _FunctionCounter(log, device_type), _DispatchCounter(log, device_type):
        yield log


@contextmanager
def cuda_syncs():
    """Every sync the CUDA driver reports while the block runs (``torch.cuda.set_sync_debug_mode``: the
    package's, DeepSpeed's and the kernels' own), as a SyncLog of (message, where in the package)."""
    log = SyncLog()
    previous = torch.cuda.get_sync_debug_mode()

    def record(message, category, filename, lineno, file=None, line=None):
        log.events.append((str(message).split(".")[0], _where()))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield log
        finally:
            torch.cuda.set_sync_debug_mode(previous)
