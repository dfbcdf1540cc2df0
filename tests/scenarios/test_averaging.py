"""Checkpoint averaging at consolidation: on the fp32 masters of real ZeRO optimizers (two ranks, ep_size 2),
and through tools/consolidate_checkpoint.py on the runs of the ``trained`` fixture."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import load_file

from tests.support.builders import VOCAB, batch, ds_dict, per_expert, run_tool as tool, tiny_plan, tiny_project
from tests.support.ranks import run_ranks
from trainer import checkpoint
from trainer.averaging import average, read_weights
from trainer.engine import build_engine, build_model, step_loss
from trainer.export import read_deepspeed, to_deepspeed

pytestmark = pytest.mark.slow

LAYOUTS = {  # DeepSpeed keys: the optimizer that holds the masters
    "fp32, ZeRO 1": ds_dict(stage=1, lr=1e-2),
    "bf16, ZeRO 2": {**ds_dict(stage=2, lr=1e-2), "bf16": {"enabled": True}},
    "bf16, ZeRO 1, fp32 accumulation (BF16_Optimizer, the paper configs)": {
        **ds_dict(stage=1, lr=1e-2), "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32"},
}


def _train_and_save(ds: dict, ckpt_dir: str) -> dict:
    """Three steps on this rank's batch, a checkpoint; {global name: fp32 master} as DeepSpeed gives it."""
    import trainer.runtime.distributed as distributed
    plan = tiny_plan(tiny_project("omni", layers=2), ds)
    engine = build_engine(plan, build_model(plan, VOCAB))
    for step in range(3):
        loss, _, _ = step_loss(engine, plan, batch(10 * distributed.rank() + step))
        engine.backward(loss.total)
        engine.step()
    record = checkpoint.Record(project_config=plan.project.model_dump(), step=engine.global_steps,
                               world_size=plan.world, ep_size=plan.ep_size)
    checkpoint.save(engine, Path(ckpt_dir), record, checkpoint.Keep(0, 1, set()), [])
    named = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    return per_expert(named, plan.ep_rank, 4 // plan.ep_size)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_masters_read_from_the_optimizer_files_are_those_deepspeed_holds(tmp_path, layout):
    ranks = run_ranks(_train_and_save, 2, LAYOUTS[layout], str(tmp_path))
    tag_dir = tmp_path / "step3"
    masters, _ = read_weights(tag_dir)
    for rank_masters in ranks:  # each rank's experts by global id, the dense weights on both
        for name, t in rank_masters.items():
            assert torch.equal(masters[name], t), name
    assert {n for r in ranks for n in r} <= set(masters)
    weights, _, dtypes = read_deepspeed(tag_dir)
    bf16 = layout.startswith("bf16")
    assert {dtypes[n] for n in weights} == {torch.bfloat16 if bf16 else torch.float32}
    # bf16: the module weights are the masters rounded, so averaging reads the optimizer; fp32: they are equal.
    assert any(not torch.equal(masters[n], weights[n]) for n in weights) == bf16
    mean, _ = average([tag_dir] * 3)  # three copies of one checkpoint average to it
    assert all(torch.equal(mean[n], masters[n]) for n in masters)


def consolidated(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_two_checkpoints_average_to_their_midpoint_and_the_best_are_chosen_by_their_records(trained, tmp_path):
    run = trained["omni"]  # fp32, ep_size 2 on 2 ranks: checkpoints at steps 8 and 16, each after an evaluation
    proc = tool("tools/consolidate_checkpoint.py", str(run), "--average", "2", "--out", str(tmp_path / "avg2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    w8, _ = read_weights(run / "checkpoints" / "step8")
    w16, _ = read_weights(run / "checkpoints" / "step16")
    mean = consolidated(tmp_path / "avg2")
    assert not any(torch.equal(w8[n], w16[n]) for n in mean)
    for name, t in mean.items():
        torch.testing.assert_close(t, (w8[name] + w16[name]) / 2, rtol=0, atol=1e-7)
    meta = json.loads((tmp_path / "avg2" / "config.json").read_text())
    assert meta["averaged"] == {"by": "newest", "checkpoints": ["step16", "step8"]} and meta["step"] == 16
    # One fp32 checkpoint "averaged" is its plain consolidation, byte for byte.
    for flags, out in ((["--average", "1"], "avg1"), ([], "plain")):
        assert tool("tools/consolidate_checkpoint.py", str(run), *flags, "--out", str(tmp_path / out)).returncode == 0
    assert (tmp_path / "avg1" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors"
                                                                      ).read_bytes()

    wers = {t: checkpoint.read_record(run / "checkpoints", t).dev_wer for t in ("step8", "step16")}
    assert all(w is not None for w in wers.values()), wers
    proc = tool("tools/consolidate_checkpoint.py", str(run), "--average_best", "1", "--out", str(tmp_path / "best1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    chosen = json.loads((tmp_path / "best1" / "config.json").read_text())["averaged"]["checkpoints"]
    assert chosen == [min(sorted(wers, key=checkpoint.step_of, reverse=True), key=wers.get)]
    few = tool("tools/consolidate_checkpoint.py", str(run), "--average_best", "3", "--out", str(tmp_path / "best3"))
    assert few.returncode == 2 and "3 best-scored checkpoints asked, 2 usable (" in few.stderr, few.stderr[-2000:]
    assert "run.keep_best" in few.stderr and not (tmp_path / "best3").exists()


def test_an_ep2_run_and_its_resharded_ep1_copies_average_to_the_same_model(trained, tmp_path):
    ckpts = trained["omni"] / "checkpoints"
    copies = [to_deepspeed(str(ckpts / t), 1, str(tmp_path / t)) for t in ("step8", "step16")]
    resharded, _ = average(copies)  # weights only: no optimizer files
    original, _ = average([ckpts / "step8", ckpts / "step16"])
    assert resharded.keys() == original.keys()
    assert all(torch.equal(resharded[n], original[n]) for n in original)


def test_a_bf16_run_averages_its_fp32_masters_and_checkpoints_of_another_model_are_refused(trained, tmp_path):
    run = trained["switch"]  # bf16, ZeRO 2
    for flags, out in ((["--average", "1"], "avg1"), ([], "plain")):
        proc = tool("tools/consolidate_checkpoint.py", str(run), *flags, "--out", str(tmp_path / out))
        assert proc.returncode == 0, proc.stderr[-3000:]
    masters, plain = consolidated(tmp_path / "avg1"), consolidated(tmp_path / "plain")
    assert any(not torch.equal(masters[n], plain[n]) for n in plain)
    assert all(torch.equal(masters[n].bfloat16().float(), plain[n]) for n in plain)

    mixed = tmp_path / "mixed"
    shutil.copytree(trained["omni"], mixed, ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(run / "checkpoints" / "step16", mixed / "checkpoints" / "step17")  # a switch checkpoint
    proc = tool("tools/consolidate_checkpoint.py", str(mixed), "--average", "2", "--out", str(tmp_path / "no"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hold different models: moe.mode: \"switch\" -> \"omni\"" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "no").exists()
