"""The run plan (trainer.plan): what the world size decides: the expert-parallel size, the batch split into
ranks and micro-batches, and the DeepSpeed keys derived for the run."""
import pytest

from trainer.config import ConfigError, load_config, with_overrides
from trainer.plan import batch_plan, plan_run, resolve_ep_size


def test_ep_size_auto_and_explicit():
    _, project = load_config("ds_configs/omni.json")
    assert [resolve_ep_size(project.moe, w) for w in (1, 2, 3, 8)] == [1, 2, 1, 4]
    with pytest.raises(ConfigError, match="ep_size: 4 does not divide the world size 2; with 2 rank.s. and 4 "
                                          'experts use one of 1, 2, or "auto" .2.'):
        resolve_ep_size(project.moe.model_copy(update={"ep_size": 4}), 2)


def test_the_global_batch_stays_fixed_when_the_number_of_ranks_changes():
    _, project = load_config("ds_configs/paper/omni_8x84m.json")
    plans = {w: batch_plan(project.data, w) for w in (8, 16, 32)}
    assert {w: (p.accumulation, p.micro_frames) for w, p in plans.items()} == {8: (2, 64000), 16: (1, 64000),
                                                                               32: (1, 32000)}
    assert all(p.world * p.accumulation * p.micro_frames == 1024000 for p in plans.values())
    assert plans[16].describe().startswith("batch 1,024,000 frames (2.8 h of padded audio) per step = 16 rank(s)")
    with pytest.raises(ConfigError, match="under 1 s"):
        batch_plan(project.data.model_copy(update={"batch_frames": 1000}), 16)


def zero(ds: dict, project, world: int) -> dict:
    return plan_run(ds, project, 0, world).deepspeed["zero_optimization"]


def test_contiguous_gradients_are_off_on_one_rank_and_refused_off_with_expert_parallelism():
    ds, project = load_config("ds_configs/omni.json")
    assert zero(ds, project, 1) == {"stage": 1, "contiguous_gradients": False}
    assert zero(ds, project, 2) == {"stage": 1}  # DeepSpeed's default (true) on several ranks
    off = {**ds, "zero_optimization": {"stage": 1, "contiguous_gradients": False}}
    with pytest.raises(ConfigError, match=r"zero_optimization.contiguous_gradients: false .* \(ep_size 2\)"):
        zero(off, project, 2)
    dense = with_overrides(project, {"moe.mode": "dense"})
    assert zero(off, dense, 2) == off["zero_optimization"]  # no experts: DeepSpeed reduces it right
    stage2 = {**ds, "zero_optimization": {"stage": 2}}
    assert zero(stage2, project, 1) == {"stage": 2}  # DeepSpeed requires it on with MoE under ZeRO 2


def test_the_plan_holds_what_the_world_size_decides():
    ds, project = load_config("ds_configs/paper/omni_8x84m.json")
    plan = plan_run(ds, project, rank=13, world=16)
    assert (plan.ep_size, plan.ep_rank, plan.batch.accumulation, plan.batch.micro_frames) == (8, 5, 1, 64000)
    assert str(plan.output_dir) == project.run.output_dir and plan.project is project
    cfg = plan.deepspeed
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (1, 1, 16)
    assert cfg["scheduler"]["params"]["total_num_steps"] == project.run.max_steps
    assert "total_num_steps" not in ds["scheduler"]["params"]  # the config's dict is left as it was
    with pytest.raises(ConfigError, match="moe.ep_size: 8 does not divide the world size 12"):
        plan_run(ds, with_overrides(project, {"moe.ep_size": 8}), 0, 12)
