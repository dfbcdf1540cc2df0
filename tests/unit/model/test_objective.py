"""The objective (trainer.model.objective) in one process: each MoE layer adds its own routing terms, so the
shared router's gradient is the sum of the per-layer routers' gradients."""
import pytest
import torch

from tests.support.builders import batch, build, local_loss


@pytest.mark.parametrize("k", [1, 2])
def test_shared_router_gradient_is_sum_of_per_layer_gradients(k):
    omni, p = build("omni", k, drop_tokens=True)
    switch, _ = build("switch", k, drop_tokens=True)
    switch.load_state_dict(omni.state_dict())  # every per-layer router gets the shared router's weights
    b = batch(0)
    losses = []
    for m in (omni, switch):
        loss, _ = local_loss(m, b, p.moe)
        loss.total.backward()
        losses.append(loss.total.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    shared = omni.routers()[0].wg.weight.grad
    reference = sum(g.wg.weight.grad for g in switch.routers())
    assert shared.abs().sum() > 0
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-7)
