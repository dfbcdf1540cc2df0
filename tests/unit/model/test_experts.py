"""Expert compute: the stacked experts and grouped GEMM equal DeepSpeed's per-expert loop; dropless equals
capacity mode when nothing drops."""
import pytest
import torch
from deepspeed.moe.experts import Experts

from tests.support.builders import VOCAB, batch, fill_weights, tiny_project
from trainer.model.ctc import CTCModel, feed_forward
from trainer.model.experts import GroupedExperts, dropless_moe, expert_ffn


def experts_and_modules(n: int, d: int = 16, f: int = 24, seed: int = 0):
    """(GroupedExperts, DeepSpeed's Experts) holding the same n different Linear-ReLU-Linear experts."""
    torch.manual_seed(seed)
    reference = Experts(feed_forward(d, f), n, "ep_size_1")
    grouped = GroupedExperts(d, f, n, "ep_size_1")
    for j, module in enumerate(reference.deepspeed_experts):
        for p in module.parameters():  # DeepSpeed copies one module: make them differ
            torch.nn.init.normal_(p)
        grouped.init_expert(j, module)
    return grouped, reference


def grads_per_expert(grouped: GroupedExperts) -> list:
    """The stacked gradients, as DeepSpeed's loop lays them out: expert by expert, weight then bias."""
    return [g[j] for j in range(grouped.num_local_experts) for g in (grouped.w1.grad, grouped.b1.grad,
                                                                     grouped.w2.grad, grouped.b2.grad)]


def backward_of(y: torch.Tensor):
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()


def assert_same_compute(grouped: GroupedExperts, reference: Experts, x: torch.Tensor, ours, theirs):
    """ours(x) against theirs(x): output, the input's gradient and every expert weight's gradient."""
    y = ours(x)
    backward_of(y)
    gx, x.grad = x.grad.clone(), None
    want = theirs(x)
    backward_of(want)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(gx, x.grad)
    for a, b in zip(grads_per_expert(grouped), reference.parameters()):
        torch.testing.assert_close(a, b.grad)


@pytest.mark.parametrize("grouped_mm", [False, True])
def test_stacked_experts_equal_deepspeeds_loop_for_uneven_and_empty_experts(grouped_mm):
    """Both paths of expert_ffn (grouped_mm, which runs on CPU in fp32, and one matmul per expert) against
    DeepSpeed's modules on the same rows: forward, the input's gradient and every weight's."""
    grouped, reference = experts_and_modules(3)
    sizes = [5, 0, 7]  # uneven, and one expert without a route
    x = torch.randn(sum(sizes), 16, requires_grad=True)
    assert_same_compute(grouped, reference, x,
                        lambda x: expert_ffn(x, torch.tensor(sizes), sizes, grouped, grouped=grouped_mm),
                        lambda x: torch.cat([e(p) for e, p in zip(reference.deepspeed_experts, torch.split(x, sizes))]))


def test_capacity_buffer_through_stacked_experts_equals_deepspeeds_experts():
    grouped, reference = experts_and_modules(4)
    x = torch.randn(2, 4, 5, 16, requires_grad=True)  # [ep ranks, local experts, capacity, width]
    assert_same_compute(grouped, reference, x, grouped, reference)


def test_stacked_experts_keep_deepspeeds_marking_and_per_expert_state_names():
    model = CTCModel(*(lambda p: (p.model, p.moe))(tiny_project("switch")), VOCAB)
    marked = [n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False]
    assert marked and all(n.split(".")[-1] in ("w1", "b1", "w2", "b2") and ".deepspeed_moe.experts." in n
                          for n in marked)
    assert all(getattr(p, "group_name", None) == "ep_size_1" for n, p in model.named_parameters() if n in marked)
    state = model.state_dict()
    names = [k for k in state if ".deepspeed_experts." in k]
    assert len(names) == 3 * 4 * 4 and "blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.2.bias" in names
    fresh = CTCModel(*(lambda p: (p.model, p.moe))(tiny_project("switch")), VOCAB)
    fill_weights(fresh)
    fresh.load_state_dict(state, strict=True)  # per-expert entries back into the stacked tensors
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


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
    grouped, reference = experts_and_modules(3, 8, 12, seed=1)
    x = torch.randn(7, 8)
    indices = torch.tensor([[0, 2, 2, -1, 1, 0, 2], [1, 0, -1, -1, 2, 2, 0]])
    gates = torch.rand(2, 7)
    y = dropless_moe(x, indices, gates, grouped, 3, None, 1)
    experts = reference.deepspeed_experts
    want = torch.stack([sum((gates[k, s] * experts[int(indices[k, s])](x[s]) for k in range(2)
                             if indices[k, s] >= 0), torch.zeros(8)) for s in range(7)])
    torch.testing.assert_close(y, want)


def _bias_gradient_errors(grouped_mm: bool) -> list[float]:
    """Relative error of b1's and b2's gradients in bf16 against fp32, 4 experts, 6,000 uneven rows."""
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        grouped, _ = experts_and_modules(4, 64, 128, seed=3)
        grouped.to(dtype)
        sizes = [2500, 1800, 1200, 500]
        x = torch.randn(sum(sizes), 64, generator=torch.Generator().manual_seed(4)).to(dtype)
        y = expert_ffn(x, torch.tensor(sizes), sizes, grouped, grouped=grouped_mm)
        backward_of(y.float())
        grads[dtype] = (grouped.b1.grad.float(), grouped.b2.grad.float())
    return [float((b - a).norm() / a.norm()) for a, b in zip(grads[torch.float32], grads[torch.bfloat16])]


def test_bias_gradients_of_the_grouped_path_accumulate_in_fp32_within_the_bound_the_loop_meets():
    """b[expert_R]'s backward added an expert's rows one by one in bf16 (b2: 6.1% off fp32 here, the loop
    0.23%); the grouped path's one-hot matmul sums them in a GEMM, accumulated in fp32."""
    bound = 1e-2
    assert max(_bias_gradient_errors(grouped_mm=False)) < bound
    assert max(_bias_gradient_errors(grouped_mm=True)) < bound


@pytest.mark.parametrize("grouped_mm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_expert_with_no_rows_gets_zero_gradients_on_every_path(grouped_mm, dtype):
    grouped, _ = experts_and_modules(3)
    grouped.to(dtype)
    sizes = [5, 0, 7]
    y = expert_ffn(torch.randn(12, 16).to(dtype), torch.tensor(sizes), sizes, grouped, grouped=grouped_mm)
    backward_of(y.float())
    for g in (grouped.w1.grad, grouped.b1.grad, grouped.w2.grad, grouped.b2.grad):
        assert not g[1].any() and g[0].any() and g[2].any()


def test_the_gradient_of_an_empty_experts_weights_is_zeroed_whatever_the_kernel_wrote():
    """SM100's grouped GEMM writes non-zero weight gradients for empty groups (pytorch issue 172439): the
    grouped path passes its weights through a mask whose backward zeroes them."""
    from trainer.model.experts import _zero_grad_where_empty
    w = torch.randn(3, 4, 5, requires_grad=True)
    _zero_grad_where_empty(w, torch.tensor([True, False, True])).backward(torch.full((3, 4, 5), 7.0))
    assert torch.equal(w.grad[1], torch.zeros(4, 5)) and torch.equal(w.grad[[0, 2]], torch.full((2, 4, 5), 7.0))


def test_grouped_mm_is_chosen_only_where_torch_has_its_fast_kernel():
    """torch 2.11's grouped GEMM kernel is for SM 9.x and 10.x; on SM 8.x it loops with a host sync per call."""
    from trainer.model.experts import grouped_mm_fast
    bf16 = torch.bfloat16
    assert grouped_mm_fast((9, 0), bf16, 768, 3072) and grouped_mm_fast((10, 0), bf16, 768, 3072)
    for capability in ((8, 0), (8, 6), (8, 9), (12, 0), None):
        assert not grouped_mm_fast(capability, bf16, 768, 3072), capability
    assert not grouped_mm_fast((9, 0), torch.float32, 768, 3072) and not grouped_mm_fast((9, 0), bf16, 144, 3076)
