"""tools/preflight.py: its FLOP count against torch's, and the whole tool on two CPU ranks through the launcher."""
import re

import pytest
import torch

from tests.support.builders import ds_dict, tiny_plan, tiny_project
from tests.support.ranks import run_ranks
from tools.harness import launch, tiny_config

pytestmark = pytest.mark.slow


def _counted_and_computed(mode: str) -> tuple[float, float]:
    """(FLOPs torch counts in one forward+backward of a tiny model, ``model_flops`` less its attention scores,
    which torch's counter does not see in the CPU's fused attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    from tools.preflight import model_flops
    from trainer.engine import build_engine, build_model
    project = tiny_project(mode, **({} if mode == "dense" else {"dropless": True}))
    plan = tiny_plan(project, ds_dict())
    engine = build_engine(plan, build_model(plan, 20))
    B, T, cfg = 3, 50, project.model
    with FlopCounterMode(display=False) as counter:
        engine(torch.randn(B, T, cfg.n_mels), torch.full((B,), T)).log_probs.sum().backward()
    scores = 3 * cfg.num_layers * 4 * B * (-(-T // cfg.frame_stacking)) ** 2 * cfg.d_model
    return counter.get_total_flops(), model_flops(cfg, project.moe, B, T, 20) - scores


def _both_modes() -> dict:
    return {mode: _counted_and_computed(mode) for mode in ("dense", "omni")}


def test_model_flops_are_the_matrix_products_torch_counts():
    """Dense exactly; MoE (dropless, top-1) within 0.1%: the routing statistics' small products are not counted."""
    [counts] = run_ranks(_both_modes, 1)
    counted, computed = counts["dense"]
    assert counted == computed
    counted, computed = counts["omni"]
    assert abs(counted - computed) / counted < 1e-3


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m[1])


def test_preflight_on_two_cpu_ranks_prints_every_section_with_figures(tmp_path, corpus):
    out = tmp_path / "run"
    proc = launch(tiny_config(tmp_path), corpus, out, 2, ["--set", "data.num_workers=2", "--steps", "3",
                                                          "--loader_seconds", "2"], timeout=180,
                  script="tools/preflight.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    sections = [line for line in text.splitlines() if line.startswith("== ")]
    assert sections == ["== devices", "== collectives", "== step", "== loader", "== verdicts"], text
    assert re.search(r"^ranks 0-1 on .+: cpu, backend gloo, \d+ CPU cores each$", text, re.M), text
    assert number(r"all-reduce of the dense gradient, [\d.]+ MB float32 over 2 ranks: [\d.]+ ms, bus ([\d.e-]+) "
                  r"GB/s", text) > 0
    assert number(r"all-to-all of one MoE layer, .* \(uneven splits, dropless\): [\d.]+ ms, bus ([\d.e-]+) GB/s; "
                  r"8 per step", text) > 0  # 4 per MoE layer (2 forward, 2 backward) x 2 layers
    assert number(r"([\d.]+) ms per step", text) > 0
    assert number(r"GFLOP per step per rank: ([\d.e-]+) TFLOP/s per rank, peak unknown for cpu", text) > 0
    assert number(r"peak memory ([\d.]+) GB \(max RSS", text) > 0
    # dropless, 2 MoE layers: the step's outcome and each layer's split sizes (tests/scenarios/test_host_syncs.py)
    assert number(r"host syncs in one forward\+backward: (\d+)", text) == 3
    assert number(r"delivers ([\d.]+) s of audio per s", text) > 0
    assert number(r"the step consumes ([\d.]+) s/s per rank", text) > 0
    verdicts = text.split("== verdicts\n")[1].splitlines()
    for pattern in (r"gradient all-reduce takes \d+% of the step", r"all-to-all takes \d+% of the step",
                    r"MFU unknown", r"host syncs per step: 3 \(dropless budget 3\)$",
                    r"needs \d+ loader process(es|\(es\)) per rank, has 2"):
        assert any(re.search(pattern, v) for v in verdicts), (pattern, verdicts)
    assert (out / "tokenizer.model").exists() and not (out / ".lock").exists()  # the run's start-up, no claim


@pytest.mark.parametrize("script", ["tools/preflight.py", "trainer/main.py"])
def test_without_a_dev_set_every_rank_exits_2_naming_it_and_none_with_a_traceback(tmp_path, corpus, script):
    """The preflight starts as the run does (``trainer.start``): the same error, exit status and clean end."""
    proc = launch(tiny_config(tmp_path), corpus, tmp_path / "run", 2,
                  ["--train_manifest", str(corpus / "train.jsonl")], timeout=180, script=script)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("data error: no dev set: pass --dev_manifest") == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
