"""Model structure, shared-router gradients and padding, in one process (ep_size 1, no process group)."""
import pytest
import torch

from tests.common import VOCAB, batch, fill_weights, tiny_project
from trainer.model import CTCModel, ctc_loss


def build(mode, k=1, **kw):
    p = tiny_project(mode, k, **kw)
    model = CTCModel(p.model, p.moe, VOCAB)
    fill_weights(model)
    return model, p


def expected_params(p) -> int:
    d, ff, L, E, V = p.model.d_model, p.model.ffn_dim, p.model.num_layers, p.moe.num_experts, VOCAB + 1
    ffn, attn, ln = 2 * d * ff + ff + d, 4 * d * d + 4 * d, 2 * d
    dense = p.model.n_mels * p.model.frame_stacking * d + L * (2 * ln + attn + ffn) + ln + d * V + V
    extra_experts = L * (E - 1) * ffn
    return {"dense": dense, "switch": dense + extra_experts + L * d * E, "omni": dense + extra_experts + d * E}[
        p.moe.mode]


@pytest.mark.parametrize("mode,routers", [("dense", 0), ("switch", 3), ("omni", 1)])
def test_router_objects_and_parameter_count(mode, routers):
    model, p = build(mode)
    assert len(model.routers()) == routers
    router_params = {id(g.wg.weight) for g in model.routers()}
    assert len(router_params) == routers
    assert sum(x.numel() for x in model.parameters()) == expected_params(p)
    if mode == "omni":  # the one router sits in every MoE layer, and is not an expert parameter
        gates = [b.ffn.gate for b in model.blocks]
        assert all(g is gates[0] for g in gates)
        assert getattr(gates[0].wg.weight, "allreduce", True)


@pytest.mark.parametrize("k", [1, 2])
def test_shared_router_gradient_is_sum_of_per_layer_gradients(k):
    omni, _ = build("omni", k, drop_tokens=True)
    switch, _ = build("switch", k, drop_tokens=True)
    switch.load_state_dict(omni.state_dict())  # every per-layer router gets the shared router's weights
    b = batch(0)
    losses = []
    for m in (omni, switch):
        out = m(b["feats"], b["lengths"])
        loss = ctc_loss(out, b["targets"], b["target_lengths"]) + out.aux_loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    shared = omni.routers()[0].wg.weight.grad
    reference = sum(g.wg.weight.grad for g in switch.routers())
    assert shared.abs().sum() > 0
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode,k", [("omni", 1), ("omni", 2), ("switch", 2)])
def test_padding_changes_neither_routing_nor_real_outputs(mode, k):
    model, _ = build(mode, k, drop_tokens=True, capacity_factor=1.0)
    b = batch(1, lengths=(13, 9))
    padded = {**b, "feats": torch.cat([b["feats"], 50 * torch.randn(2, 11, 8)], 1)}
    padded["feats"][1, 9:13] = 50.0  # garbage inside the padding of a shorter utterance too
    out_a, out_b = model(b["feats"], b["lengths"]), model(padded["feats"], padded["lengths"])
    for i, n in enumerate(out_a.lengths.tolist()):
        torch.testing.assert_close(out_a.log_probs[i, :n], out_b.log_probs[i, :n], rtol=1e-5, atol=1e-5)
    for sa, sb in zip(out_a.routing, out_b.routing):
        assert torch.equal(sa.expert_counts, sb.expert_counts)
        assert sa.capacity == sb.capacity and sa.dropped == sb.dropped and sa.routes == sb.routes
        assert sb.routes == k * sum(out_a.lengths.tolist())
        torch.testing.assert_close(sa.lb_loss, sb.lb_loss)
        torch.testing.assert_close(sa.z_loss, sb.z_loss)
        real = sa.first_choice[sa.first_choice >= 0]
        assert torch.equal(real, sb.first_choice[sb.first_choice >= 0])
    torch.testing.assert_close(out_a.aux_loss, out_b.aux_loss)


def test_capacity_drops_routes_when_tokens_exceed_it():
    model, _ = build("omni", 1, drop_tokens=True, capacity_factor=0.25)
    b = batch(2, lengths=(30, 30))
    out = model(b["feats"], b["lengths"])
    for s in out.routing:
        assert int(s.expert_counts.max()) <= s.capacity
        assert s.dropped > 0 and s.dropped + s.expert_counts.sum() == s.routes
