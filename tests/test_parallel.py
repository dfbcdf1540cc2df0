"""Real DeepSpeed engines on real gloo ranks: expert parallelism, ZeRO, the shared router across ranks."""
import pytest
import torch
import torch.distributed as dist

from tests.common import VOCAB, batch, ds_dict, fill_weights, global_name, tiny_project, union
from tests.distributed import run_ranks
from trainer.config import load_config
from trainer.engine import build_engine, build_model, step_loss


# Uneven shards: 3 utterances on rank 0, 17 on rank 1; one rank alone holds the union of the two.
SHARDS = [dict(seed=10, lengths=(13, 10, 7)), dict(seed=11, lengths=tuple(range(4, 21)))]

pytestmark = pytest.mark.slow


def _losses_and_grads(mode, k, stage):
    """One forward/backward over this rank's shard (the union on one rank); full gradients by global name."""
    from deepspeed.utils import safe_get_full_grad
    rank, world = dist.get_rank(), dist.get_world_size()
    project = tiny_project(mode, k, drop_tokens=False)
    model = build_model(project, VOCAB)
    n_local = 4 // world
    fill_weights(model, ep_rank=rank, n_local=n_local)
    engine = build_engine(ds_dict(stage=stage), project, model)
    b = union(*[batch(**s) for s in SHARDS]) if world == 1 else batch(**SHARDS[rank])
    loss, _, totals = step_loss(engine, project, b)
    engine.backward(loss.total)
    grads = {global_name(n, rank, n_local): safe_get_full_grad(p).detach().clone()
             for n, p in engine.module.named_parameters()}
    return float(totals.frames), grads


@pytest.mark.parametrize("mode,k", [("omni", 1), ("omni", 2), ("switch", 1), ("switch", 2)])
def test_uneven_shards_on_two_ranks_give_the_gradient_of_one_rank_with_the_union_batch(mode, k):
    [(ref_frames, ref_grads)] = run_ranks(_losses_and_grads, 1, mode, k, 1)
    ranks = run_ranks(_losses_and_grads, 2, mode, k, 1)
    assert ranks[0][0] == ranks[1][0] == ref_frames  # the global frame count, on every rank
    seen = set()
    for _, grads in ranks:
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
            seen.add(name)
    assert seen == set(ref_grads)  # every expert of the one-rank model lives on exactly one of the two ranks


def _train_zero(stage, lengths_by_rank):
    rank = dist.get_rank()
    project = tiny_project("omni", 1, drop_tokens=True, capacity_factor=1.0)
    model = build_model(project, VOCAB)
    before = model.routers()[0].wg.weight.detach().clone()
    engine = build_engine(ds_dict(stage=stage, lr=1e-2), project, model)
    losses = []
    for step in range(4):
        loss, out, _ = step_loss(engine, project, batch(100 * rank + step, lengths=lengths_by_rank[rank]))
        engine.backward(loss.total)
        engine.step()
        losses.append(loss.total.item())
    capacities = [s.capacity for s in out.routing]
    return before, engine.module.routers()[0].wg.weight.detach().clone(), losses, capacities


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_trains_omni_and_router_stays_identical_across_ranks(stage):
    # Uneven ranks: 30 real frames on rank 0, 17 on rank 1, so capacity must be agreed across the group.
    (b0, w0, l0, c0), (b1, w1, l1, c1) = run_ranks(_train_zero, 2, stage, [(13, 10, 7), (12, 5)])
    assert torch.equal(b0, b1) and torch.equal(w0, w1)
    assert not torch.equal(w0, b0)
    assert c0 == c1
    assert all(torch.isfinite(torch.tensor(l0 + l1)))


def shipped_cpu_deepspeed() -> dict:
    """The optimizer and ZeRO keys of the shipped CPU configs: fused AdamW, ZeRO 1 (``contiguous_gradients`` is
    then off on one rank and DeepSpeed's default on two, so this also compares the two gradient paths)."""
    ds, _ = load_config("ds_configs/omni.json")
    return {"optimizer": ds["optimizer"], "zero_optimization": ds["zero_optimization"], "steps_per_print": 10 ** 9}


DEEPSPEED = {"stage 2": lambda: ds_dict(stage=2), "shipped CPU, stage 1": shipped_cpu_deepspeed}


def _clipped_step(variant):
    """Global gradient norm DeepSpeed computes (and clips with) for one optimizer step, and the router after it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    project = tiny_project("omni", 1, drop_tokens=False)
    model = build_model(project, VOCAB)
    fill_weights(model, ep_rank=rank, n_local=4 // world)
    before = model.routers()[0].wg.weight.detach().clone()
    engine = build_engine({**DEEPSPEED[variant](), "gradient_clipping": 0.5}, project, model)
    b = union(*[batch(**s) for s in SHARDS]) if world == 1 else batch(**SHARDS[rank])
    loss, _, _ = step_loss(engine, project, b)
    engine.backward(loss.total)
    engine.step()
    return float(engine.get_global_grad_norm()), before, engine.module.routers()[0].wg.weight.detach().clone()


@pytest.mark.parametrize("variant", list(DEEPSPEED))
def test_global_grad_norm_and_update_with_ep2_equal_ep1(variant):
    [(ref, before, ref_router)] = run_ranks(_clipped_step, 1, variant)
    ranks = run_ranks(_clipped_step, 2, variant)
    assert ref > 0.5 and not torch.equal(ref_router, before)  # clipping is active, and the step moved the router
    for norm, _, router in ranks:
        assert norm == pytest.approx(ref, rel=1e-5)
        torch.testing.assert_close(router, ref_router, rtol=1e-5, atol=1e-7)


def _dropless_and_capacity(mode):
    """On this rank: loss and full gradients of capacity mode (nothing dropped) and of dropless mode."""
    from deepspeed.utils import safe_get_full_grad
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for dropless in (False, True):
        project = tiny_project(mode, 1, drop_tokens=False, dropless=dropless)
        model = build_model(project, VOCAB)
        fill_weights(model, ep_rank=rank, n_local=4 // world)
        engine = build_engine(ds_dict(stage=1), project, model)
        loss, out, _ = step_loss(engine, project, batch(**SHARDS[rank]))
        engine.backward(loss.total)
        results.append((float(loss.total), {n: safe_get_full_grad(p).detach().clone()
                                             for n, p in engine.module.named_parameters()}))
    return results


@pytest.mark.parametrize("mode", ["omni", "switch"])
def test_dropless_equals_capacity_mode_on_two_expert_parallel_ranks(mode):
    for (loss_cap, grads_cap), (loss_free, grads_free) in run_ranks(_dropless_and_capacity, 2, mode):
        assert loss_free == pytest.approx(loss_cap, rel=1e-5)
        for name, g in grads_cap.items():
            torch.testing.assert_close(grads_free[name], g, rtol=1e-4, atol=1e-6, msg=name)


def _prepare_once_the_tokenizer_exists(corpus: str, out: str) -> int:
    from pathlib import Path
    import time
    from trainer import distributed
    from trainer.config import DataConfig, ProjectConfig, RunConfig
    from trainer.run import prepare_data
    data = DataConfig(train_manifests=[f"{corpus}/train.jsonl"], dev_manifests=[f"{corpus}/dev.jsonl"], vocab_size=40)
    project = ProjectConfig(data=data, run=RunConfig(output_dir=out))
    if distributed.rank() == 1:  # rank 1 comes to the tokenizer only after rank 0 has written it
        deadline = time.time() + 120
        while not (Path(out) / "tokenizer.model").exists() and time.time() < deadline:
            time.sleep(0.05)
    return prepare_data(project)[2].vocab_size


def test_a_rank_that_finds_the_tokenizer_written_still_meets_rank_0(corpus, tmp_path):
    """Before: rank 1 saw rank 0's fresh tokenizer file and skipped the broadcast rank 0 waited in (a hang
    seen once in three two-rank runs from shards, whose reading is slower)."""
    assert run_ranks(_prepare_once_the_tokenizer_exists, 2, str(corpus), str(tmp_path), deadline_s=90) == [40, 40]
