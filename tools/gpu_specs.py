"""The GPUs the tools know, keyed by the exact name ``torch.cuda.get_device_name()`` reports.

Dense (not sparse) peak TFLOP/s in bf16 (fp16 for the V100, which has no bf16) and in plain fp32 (no TF32,
PyTorch's matmul default), the nominal memory in GiB (the driver and ECC keep a little of it), and the CUDA
capability (which kernels torch has for it: ``trainer.model.experts.grouped_mm_fast``). Figures are
NVIDIA's data-sheet numbers for each form factor: an SXM board and its PCIe or NVL sibling share a chip name
but not clocks or power, so they are separate rows.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPU:
    name: str  # as torch reports it
    bf16_tflops: float
    fp32_tflops: float
    memory_gib: float
    capability: tuple[int, int]


GPUS = {g.name: g for g in (
    GPU("NVIDIA H100 80GB HBM3", 989, 67, 80, (9, 0)),  # SXM5
    GPU("NVIDIA H100 PCIe", 756, 51, 80, (9, 0)),
    GPU("NVIDIA H100 NVL", 835, 60, 94, (9, 0)),
    GPU("NVIDIA H800", 989, 67, 80, (9, 0)),  # SXM5; its NVLink is narrower, not its compute
    GPU("NVIDIA H800 PCIe", 756, 51, 80, (9, 0)),
    GPU("NVIDIA H200", 989, 67, 141, (9, 0)),  # SXM
    GPU("NVIDIA H200 NVL", 835, 60, 141, (9, 0)),
    GPU("NVIDIA A100-SXM4-80GB", 312, 19.5, 80, (8, 0)),
    GPU("NVIDIA A100-SXM4-40GB", 312, 19.5, 40, (8, 0)),
    GPU("NVIDIA A100 80GB PCIe", 312, 19.5, 80, (8, 0)),
    GPU("NVIDIA A100-PCIE-40GB", 312, 19.5, 40, (8, 0)),
    GPU("NVIDIA L40S", 362, 91.6, 48, (8, 9)),
    GPU("Tesla V100-SXM2-32GB", 125, 15.7, 32, (7, 0)),
    GPU("Tesla V100-SXM2-16GB", 125, 15.7, 16, (7, 0)),
)}

# Short names for --gpu: the SXM board of each chip.
ALIASES = {"H100": "NVIDIA H100 80GB HBM3", "H800": "NVIDIA H800", "H200": "NVIDIA H200",
           "A100": "NVIDIA A100-SXM4-80GB", "A100-40GB": "NVIDIA A100-SXM4-40GB", "L40S": "NVIDIA L40S",
           "V100": "Tesla V100-SXM2-32GB"}


def lookup(name: str) -> Optional[GPU]:
    """The GPU of an exact device name or a short alias (case-insensitive); None if unknown."""
    name = ALIASES.get(name.upper(), name)
    return next((g for n, g in GPUS.items() if n.lower() == name.lower()), None)


def peak_tflops(name: str, half: bool) -> Optional[float]:
    """The dense peak for the engine's precision, or None for a device not in the table."""
    gpu = lookup(name)
    return None if gpu is None else (gpu.bf16_tflops if half else gpu.fp32_tflops)
