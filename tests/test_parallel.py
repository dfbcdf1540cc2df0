"""Real DeepSpeed engines on real gloo ranks: expert parallelism, ZeRO, the shared router across ranks."""
import pytest
import torch
import torch.distributed as dist

from tests.common import VOCAB, batch, ds_dict, fill_weights, global_name, tiny_project
from tests.distributed import run_ranks
from trainer.engine import build_engine, build_model, forward_loss


def _losses_and_grads(mode, k, gas, seeds):
    """Backward over this rank's micro-batches (one optimizer step's worth); grads by global name."""
    rank, world = dist.get_rank(), dist.get_world_size()
    project = tiny_project(mode, k, drop_tokens=False)
    model = build_model(project, VOCAB)
    n_local = 4 // world
    fill_weights(model, ep_rank=rank, n_local=n_local)
    engine = build_engine(ds_dict(stage=0, gas=gas), project, model)
    losses = []
    for seed in seeds[rank::world]:
        loss, _, _, _ = forward_loss(engine, batch(seed))
        engine.backward(loss)
        losses.append(loss.item())
    grads = {global_name(n, rank, n_local): p.grad.clone() for n, p in engine.module.named_parameters()}
    return losses, grads


@pytest.mark.parametrize("mode,k", [("omni", 1), ("omni", 2), ("switch", 1), ("switch", 2)])
def test_two_ranks_ep2_match_one_rank_ep1(mode, k):
    seeds = [10, 11]
    [(ref_losses, ref_grads)] = run_ranks(_losses_and_grads, 1, mode, k, 2, seeds)
    ranks = run_ranks(_losses_and_grads, 2, mode, k, 1, seeds)
    assert [r[0][0] for r in ranks] == pytest.approx(ref_losses, rel=1e-5)
    seen = set()
    for losses, grads in ranks:
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
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
        loss, _, _, out = forward_loss(engine, batch(100 * rank + step, lengths=lengths_by_rank[rank]))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
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


def _grad_norm(stage, gas, seeds):
    """Global gradient norm DeepSpeed computes (and clips with) for one optimizer step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    project = tiny_project("omni", 1, drop_tokens=False)
    model = build_model(project, VOCAB)
    fill_weights(model, ep_rank=rank, n_local=4 // world)
    engine = build_engine({**ds_dict(stage=stage, gas=gas), "gradient_clipping": 1.0}, project, model)
    for seed in seeds[rank::world]:
        loss, _, _, _ = forward_loss(engine, batch(seed))
        engine.backward(loss)
        engine.step()
    return float(engine.get_global_grad_norm())


@pytest.mark.parametrize("stage", [1, 2])  # at stage 0 DeepSpeed reports no global norm
def test_global_grad_norm_with_ep2_equals_ep1(stage):
    [ref] = run_ranks(_grad_norm, 1, stage, 2, [20, 21])
    norms = run_ranks(_grad_norm, 2, stage, 1, [20, 21])
    assert ref > 1.0  # clipping is active at this norm
    assert norms[0] == pytest.approx(ref, rel=1e-5) and norms[1] == pytest.approx(ref, rel=1e-5)
