"""Routing, step by step, against values computed by hand and by DeepSpeed's own gating functions."""
import math

import pytest
import torch
from deepspeed.moe.sharded_moe import top1gating, top2gating

from trainer.model.routing import (RoutingStats, assign_slots, choose_experts, chosen_probs, gate_values, route,
                                   router_probs, train_capacity)


def logits(S=40, E=4, seed=0) -> torch.Tensor:
    return torch.randn(S, E, generator=torch.Generator().manual_seed(seed)) * 2


def test_assign_slots_by_hand():
    # Six frames, two experts; frame 5 is padding. Priority decides the order inside each expert.
    indices = torch.tensor([[0, 0, 1, 0, 1, 0]])
    priority = torch.tensor([[0.6, 0.9, 0.7, 0.8, 0.95, 0.99]])
    real = torch.tensor([True, True, True, True, True, False])
    assert assign_slots(indices, priority, real, 2).tolist() == [[2, 0, 1, 1, 0, -1]]


def test_assign_slots_places_every_first_choice_before_any_second_choice():
    x = logits(S=30)
    probs = router_probs(x)
    idx = choose_experts(x, 2, sample=False)
    slots = assign_slots(idx, chosen_probs(probs, idx), torch.ones(30, dtype=torch.bool), 4)
    for e in range(4):
        first, second = slots[0][idx[0] == e], slots[1][idx[1] == e]
        assert sorted(torch.cat([first, second]).tolist()) == list(range(len(first) + len(second)))
        assert len(second) == 0 or len(first) == 0 or first.max() < second.min()


def test_capacity_drops_the_least_confident_routes_not_the_last_frames():
    x = logits(S=64, seed=3)
    real = torch.ones(64, dtype=torch.bool)
    cap = train_capacity(64, 4, 1, 0.5, 1)
    assert cap == 8  # ceil(64 / 4 * 0.5)
    (_, capacity, _, indices, _, _, kept), stats = route(x, real, 1, cap, sample=False)
    probs = torch.softmax(x, -1)
    first = probs.argmax(-1)
    p1 = probs.max(-1).values
    for e in range(4):
        mine = (first == e).nonzero().flatten()
        expect = mine[p1[mine].argsort(descending=True)[:cap]]  # the `cap` most confident frames of expert e
        assert sorted((indices[0] == e).nonzero().flatten().tolist()) == sorted(expect.tolist())
        assert int(kept[e]) == min(len(mine), cap)
    assert int(stats.dropped) == 64 - int(kept.sum()) > 0


@pytest.mark.parametrize("k", [1, 2])
def test_route_agrees_with_deepspeed_when_nothing_is_dropped(k):
    """Load-balancing loss, choices, gate values and counts against DeepSpeed 0.19.8's top1/top2gating."""
    x = logits(S=48, seed=k)
    real = torch.ones(48, dtype=torch.bool)
    (l_aux, capacity, E, indices, locations, gates, counts), stats = route(x, real, k, None, sample=False)
    if k == 1:
        ref = top1gating(x.clone(), 100.0, 0, drop_tokens=True, use_rts=False, sparse_routes=True)
        ref_counts = ref[6]
    else:
        ref = top2gating(x.clone(), 100.0, 0, drop_tokens=True, top2_2nd_expert_sampling=False, sparse_routes=True)
        ref_counts = ref[6]
    torch.testing.assert_close(l_aux, ref[0])
    torch.testing.assert_close(stats.lb_loss(), ref[0])
    assert torch.equal(indices, ref[3]) and torch.equal(counts, ref_counts)
    torch.testing.assert_close(gates, ref[5])
    assert capacity == int(counts.max())  # no drop: the busiest expert sets the buffer
    z = torch.logsumexp(x, -1).square().sum()
    torch.testing.assert_close(stats.z_sum, z)


def test_training_capacity_formula_matches_deepspeed():
    # DeepSpeed: ceil(S / E * capacity_factor), times 2 for top-2 (it passes capacity_factor * 2).
    for S, E, cf, k in ((100, 4, 1.25, 1), (37, 8, 1.0, 2), (10, 4, 2.0, 1)):
        assert train_capacity(S, E, k, cf, 0) == math.ceil(S / E * cf * k)


def test_rsample_samples_the_one_top1_choice_and_top2_keeps_the_argmax_first():
    torch.manual_seed(0)
    x = logits(S=2000, E=4, seed=9) * 0.3
    top1 = choose_experts(x, 1, sample=True)[0]
    assert (top1 != x.argmax(-1)).float().mean() > 0.2  # sampled
    top2 = choose_experts(x, 2, sample=True)
    assert torch.equal(top2[0], x.argmax(-1))  # the first choice is never sampled
    assert (top2[1] != x.topk(2, -1).indices[:, 1]).float().mean() > 0.2 and (top2[0] != top2[1]).all()


def test_gate_values_top1_is_the_probability_top2_normalises():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    assert gate_values(chosen_probs(probs, torch.tensor([[0]]))).tolist() == [[0.5]]
    torch.testing.assert_close(gate_values(chosen_probs(probs, torch.tensor([[0], [1]]))),
                               torch.tensor([[0.625], [0.375]]))


def test_routing_stats_lb_loss_is_balanced_at_one():
    stats = RoutingStats(prob_sum_E=torch.full((4,), 10.0), z_sum=torch.zeros(()),
                         choice_counts_E=torch.full((4,), 10.0), kept_E=torch.zeros(4), entropy_sum=torch.zeros(()),
                         first_choice_S=torch.zeros(40), frames=torch.tensor(40.0), routes=torch.tensor(40),
                         dropped=torch.tensor(0), capacity=10)
    assert float(stats.lb_loss()) == pytest.approx(1.0)
