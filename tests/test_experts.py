"""Expert compute: the grouped matmul equals DeepSpeed's loop; dropless equals capacity mode when nothing drops."""
import pytest
import torch
from deepspeed.moe.experts import Experts

from tests.common import VOCAB, batch, fill_weights, tiny_project
from trainer.experts import GroupedExperts, dropless_moe
from trainer.model import CTCModel, feed_forward


def test_grouped_experts_equal_deepspeeds_loop_forward_and_backward():
    torch.manual_seed(0)
    experts = GroupedExperts(feed_forward(16, 24), 4, "ep_size_1")
    for e in experts.deepspeed_experts:  # DeepSpeed copies one module: make them differ
        for p in e.parameters():
            torch.nn.init.normal_(p)
    x = torch.randn(2, 4, 5, 16, requires_grad=True)  # [ep ranks, local experts, capacity, width]
    grads = []
    for forward in (GroupedExperts.forward, Experts.forward):  # ours, then DeepSpeed's loop, on the same modules
        experts.zero_grad()
        x.grad = None
        y = forward(experts, x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = grads
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(a, b)


def test_grouped_experts_keep_deepspeeds_parameter_marking_and_names():
    model = CTCModel(*(lambda p: (p.model, p.moe))(tiny_project("switch")), VOCAB)
    names = [n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False]
    assert names and all(".deepspeed_experts." in n for n in names)
    assert all(getattr(p, "group_name", None) == "ep_size_1" for n, p in model.named_parameters() if n in names)


@pytest.mark.parametrize("mode,k", [("omni", 1), ("omni", 2), ("switch", 1)])
def test_dropless_equals_capacity_mode_when_nothing_is_dropped(mode, k):
    results = []
    for dropless in (False, True):
        p = tiny_project(mode, k, drop_tokens=False, dropless=dropless)
        model = CTCModel(p.model, p.moe, VOCAB)
        fill_weights(model)
        b = batch(3, lengths=(21, 17, 9, 4))
        out = model(b["feats"], b["lengths"])
        out.log_probs.mul(torch.linspace(-1, 1, out.log_probs.numel()).view_as(out.log_probs)).sum().backward()
        results.append((out, {n: q.grad for n, q in model.named_parameters()}))
    (a, ga), (b_, gb) = results
    torch.testing.assert_close(a.log_probs, b_.log_probs, rtol=1e-5, atol=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-5, msg=name)
    for sa, sb in zip(a.routing, b_.routing):
        assert torch.equal(sa.kept_E, sb.kept_E) and int(sb.dropped) == 0


def test_dropless_computes_each_route_exactly_once_with_its_gate():
    torch.manual_seed(1)
    experts = GroupedExperts(feed_forward(8, 12), 3, "ep_size_1").deepspeed_experts
    for e in experts:
        for p in e.parameters():
            torch.nn.init.normal_(p)
    x = torch.randn(7, 8)
    indices = torch.tensor([[0, 2, 2, -1, 1, 0, 2], [1, 0, -1, -1, 2, 2, 0]])
    gates = torch.rand(2, 7)
    y = dropless_moe(x, indices, gates, experts, 3, None, 1)
    want = torch.stack([sum((gates[k, s] * experts[int(indices[k, s])](x[s]) for k in range(2)
                             if indices[k, s] >= 0), torch.zeros(8)) for s in range(7)])
    torch.testing.assert_close(y, want)
