"""tools/gpu_specs.py: GPUs by the exact names torch reports."""
from tools.gpu_specs import GPUS, lookup
from tools.preflight import peak_tflops


def test_each_board_has_its_own_peak_by_the_exact_name_torch_reports():
    """A name that contains another (an H200 NVL is not an H200) gets its own row, not the first match."""
    assert peak_tflops("NVIDIA H200 NVL", True, None) == 835 and peak_tflops("NVIDIA H200", True, None) == 989
    assert peak_tflops("NVIDIA H100 PCIe", True, None) == 756
    assert peak_tflops("NVIDIA H100 80GB HBM3", True, None) == 989
    assert peak_tflops("NVIDIA H800", True, None) == 989 and peak_tflops("NVIDIA H800", False, None) == 67
    assert peak_tflops("NVIDIA H200 NVL (a board we do not know)", True, None) is None
    assert peak_tflops("NVIDIA H200", True, 500.0) == 500.0  # --peak_tflops wins


def test_short_names_mean_the_sxm_boards_and_every_row_is_complete():
    assert lookup("h100").name == "NVIDIA H100 80GB HBM3" and lookup("H200").memory_gib == 141
    assert lookup("A100").capability == (8, 0) and lookup("nvidia h100 pcie").name == "NVIDIA H100 PCIe"
    for name, gpu in GPUS.items():
        assert gpu.name == name and gpu.bf16_tflops > gpu.fp32_tflops > 0 and gpu.memory_gib >= 16
