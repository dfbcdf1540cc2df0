"""The dry run (``tools/preflight.py --dry_run``, ``tools/dry_run.py``): the configured step on meta tensors in a
fake N-rank world. Each dry run is a fresh process: the fake world's size is fixed once per process."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from tests.support.builders import run_tool

PAPER = [f"ds_configs/paper/{name}.json" for name in ("omni_8x84m", "switch_8x84m", "dense_84m")]
SHIPPED = [("ds_configs/omni.json", 1), ("ds_configs/switch.json", 2), ("ds_configs/dense.json", 1)]


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result(timeout=300)


def _dry_run(config: str, gpus: int, overrides: dict = None, gpu: str = "H100") -> dict:
    import io
    from tools.dry_run import dry_run, verdict
    from trainer.config import load_config, with_overrides
    ds, project = load_config(config)
    f = dry_run(gpus, gpu, ds, with_overrides(project, overrides or {}), out=io.StringIO())
    return {"fits": f.fits, "verdict": verdict(f), "need": f.need, "syncs": f.log.events, "copies": f.log.copies,
            "budget": f.budget, "memory": f.memory, "flops": f.flops, "kernel": f.kernel}


@pytest.mark.slow
@pytest.mark.parametrize("config,gpus", [(c, n) for c in PAPER for n in (8, 1)] + SHIPPED)
def test_the_step_mixes_no_device_keeps_the_sync_budget_copies_without_blocking_and_fits(config, gpus):
    """Meta raises on a CPU tensor in a device op, so a dry run that ends is a step without one. Per micro-batch:
    the outcome; capacity mode on several expert ranks the group's frame count; dropless one read per MoE
    layer; every host-to-device copy non-blocking (a blocking one waits for the GPU's queue). The paper configs
    fit an 80 GB GPU (an H100) at their micro-batch, with the grouped expert kernel (SM 9.0)."""
    r = in_fresh_process(_dry_run, config, gpus)
    assert len(r["syncs"]) <= r["budget"], r["syncs"]
    assert not [e for e in r["syncs"] if "copy" in e[0]], r["syncs"]
    assert r["copies"], "the batch reaches the device by non-blocking copies"
    if config in PAPER:
        assert r["fits"], r["memory"]
        assert r["kernel"] == ("none (dense)" if "dense" in config else "grouped_mm")


@pytest.mark.slow
def test_a_step_that_does_not_fit_names_the_micro_batch_that_would_and_that_one_fits():
    """The paper's omni model on one 16 GB V100 (its optimizer states alone take 7 GiB)."""
    r = in_fresh_process(_dry_run, "ds_configs/paper/omni_8x84m.json", 1, None, "Tesla V100-SXM2-16GB")
    assert not r["fits"] and "lower data.max_frames_per_rank to " in r["verdict"], r["verdict"]
    frames = int(r["verdict"].split(" to ")[1].split(";")[0].replace(",", ""))
    assert 0 < frames < 64000 and frames % 3000 == 0, r["verdict"]
    r = in_fresh_process(_dry_run, "ds_configs/paper/omni_8x84m.json", 1, {"data.max_frames_per_rank": frames},
                         "Tesla V100-SXM2-16GB")
    assert r["fits"], r["verdict"]


def _cpu_tensor_in_the_step(config: str):
    import io
    from tools.dry_run import DryRunError, dry_run
    from trainer.config import load_config

    def leak(module, args, output):
        if isinstance(module, torch.nn.LayerNorm) and output.is_meta:
            return output + torch.ones(output.shape[-1])  # a CPU tensor into a device op: this line is named
    torch.nn.modules.module.register_module_forward_hook(leak)
    ds, project = load_config(config)
    try:
        dry_run(1, "H100", ds, project, out=io.StringIO())
    except DryRunError as e:
        return str(e)
    return ""


@pytest.mark.slow
def test_a_cpu_tensor_in_the_step_is_an_error_naming_its_line():
    message = in_fresh_process(_cpu_tensor_in_the_step, "ds_configs/omni.json")
    assert "tests/scenarios/test_dry_run.py:" in message and "(leak)" in message, message
    assert "cpu" in message.lower(), message


def _memory_of_a_step(config: str) -> tuple[float, float]:
    """(MemTracker's peak over the dry run's meta step, the same tracker's peak over the same step run for
    real on the CPU), both with SDPA's math path, the one the CPU runs."""
    from contextlib import nullcontext
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from tools import dry_run as dr
    from trainer.config import load_config
    from trainer.engine import build_model
    from trainer.plan import plan_run
    ds, project = load_config(config)
    dr.fake_world(1)
    meta = plan_run(ds, project, 0, 1, dr.META)
    dataset, host_batch, B, T = dr.longest_batch(project, meta.batch.micro_frames)
    frames = B * -(-T // project.model.frame_stacking)
    balanced = dr.Balanced(frames, 1, project.moe.top_k, project.moe.num_experts, 1)
    step = dr.run_step(dr.meta_model(meta, project.data.vocab_size, None), meta, dataset, host_batch, balanced,
                       attention=nullcontext)
    cpu = plan_run(ds, project, 0, 1, torch.device("cpu"))
    model = build_model(cpu, project.data.vocab_size)
    dr.join_expert_groups(model)
    with sdpa_kernel(SDPBackend.MATH):
        dr.micro_batch(model, cpu, dataset, host_batch)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            dr.micro_batch(model, cpu, dataset, host_batch)
    real = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return step.memory["Total"], max(v for k, v in real.items() if str(k) == "Total")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ds_configs/omni.json", "ds_configs/switch.json"])
def test_the_dry_runs_memory_is_within_ten_percent_of_a_real_cpu_step(config):
    dry, real = in_fresh_process(_memory_of_a_step, config)
    assert abs(dry - real) <= 0.1 * real, (dry, real)


@pytest.mark.slow
def test_the_command_runs_and_says_whether_it_fits():
    proc = run_tool("tools/preflight.py", "--dry_run", "--gpus", "8", "--gpu", "H200", "--deepspeed_config",
                    "ds_configs/paper/omni_8x84m.json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 of 8 x NVIDIA H200" in proc.stdout and "fits: " in proc.stdout, proc.stdout
    proc = run_tool("tools/preflight.py", "--dry_run", "--gpu", "H300", "--deepspeed_config", "ds_configs/omni.json")
    assert proc.returncode == 1 and "--gpu H300: unknown" in proc.stderr, proc.stderr[-2000:]
