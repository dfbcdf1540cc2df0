"""The CTC model (trainer.model.ctc) in one process (ep_size 1, no process group): structure and parameters,
padding, expert initialisation, evaluation without drops, causal attention, positions, the aligned head."""
import math

import pytest
import torch

from tests.support.builders import (VOCAB, batch, build, fill_weights, local_loss, queued_gpu_seed, tiny_project,
                                    union)
from trainer.model.ctc import CTCModel, cape_positions
from trainer.model.routing import Roster
from trainer.runtime.deepspeed_contract import local_experts


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


@pytest.mark.parametrize("mode,k", [("omni", 1), ("omni", 2), ("switch", 2)])
def test_padding_changes_neither_routing_nor_real_outputs(mode, k):
    model, p = build(mode, k, drop_tokens=True, capacity_factor=1.0)
    b = batch(1, lengths=(13, 9))
    padded = {**b, "feats": torch.cat([b["feats"], 50 * torch.randn(2, 11, 8)], 1)}
    padded["feats"][1, 9:13] = 50.0  # garbage inside the padding of a shorter utterance too
    (loss_a, out_a), (loss_b, out_b) = local_loss(model, b, p.moe), local_loss(model, padded, p.moe)
    for i, n in enumerate(out_a.lengths.tolist()):
        torch.testing.assert_close(out_a.log_probs[i, :n], out_b.log_probs[i, :n], rtol=1e-5, atol=1e-5)
    for sa, sb in zip(out_a.routing, out_b.routing):
        assert torch.equal(sa.kept_E, sb.kept_E)
        assert sa.capacity == sb.capacity and sa.dropped == sb.dropped and sa.routes == sb.routes
        assert sb.routes == k * sum(out_a.lengths.tolist())
        torch.testing.assert_close(sa.prob_sum_E, sb.prob_sum_E)
        torch.testing.assert_close(sa.z_sum, sb.z_sum)
        real = sa.first_choice_S[sa.first_choice_S >= 0]
        assert torch.equal(real, sb.first_choice_S[sb.first_choice_S >= 0])
    torch.testing.assert_close(loss_a.total, loss_b.total)


def experts_of(model, block):
    return local_experts(model.blocks[block].ffn.moe)


def test_experts_start_apart_and_the_same_whatever_the_ep_size():
    p = tiny_project("switch")
    models = []
    for ep_size, ep_rank in ((1, 0), (2, 0), (2, 1)):
        torch.manual_seed(5)  # as build_model does on every rank
        gpu_seed = queued_gpu_seed()
        models.append(CTCModel(p.model, p.moe, VOCAB, ep_size=ep_size, ep_rank=ep_rank, seed=5))
        assert queued_gpu_seed() == gpu_seed  # expert initialisation does not reseed the GPUs' streams
    one, halves = models[0], models[1:]
    for block in range(p.model.num_layers):
        w1 = experts_of(one, block).w1
        assert all(not torch.equal(w1[0], w1[j]) for j in range(1, 4))  # four, different
        for r, half in enumerate(halves):
            for name, t in experts_of(half, block).named_parameters():  # local expert j of ep rank r is 2r+j
                assert torch.equal(t, getattr(experts_of(one, block), name)[2 * r:2 * r + 2]), name
    dense = [n for n in one.state_dict() if "deepspeed_experts" not in n]
    assert all(torch.equal(one.state_dict()[n], half.state_dict()[n]) for n in dense for half in halves)


def test_evaluation_drops_nothing_so_an_utterance_decodes_alike_alone_and_in_any_batch():
    model, _ = build("omni", 1, drop_tokens=True, capacity_factor=0.25)
    model.eval()
    alone = batch(4, lengths=(31,))
    crowd = union(alone, batch(5, lengths=(30, 29, 28)))  # with training capacity these would overflow
    with torch.no_grad():
        a, c = model(alone["feats"], alone["lengths"]), model(crowd["feats"], crowd["lengths"])
    n = int(a.lengths[0])
    torch.testing.assert_close(a.log_probs[0, :n], c.log_probs[0, :n], rtol=1e-5, atol=1e-5)
    assert all(s.dropped == 0 and s.capacity == int(s.kept_E.max()) for s in a.routing + c.routing)


def with_model(model_cfg: dict, mode="omni"):
    p = tiny_project(mode)
    p = p.model_copy(update={"model": p.model.model_copy(update=model_cfg)})
    model = CTCModel(p.model, p.moe, VOCAB)
    fill_weights(model)
    return model.eval()


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_encoder_sees_no_later_frame(causal):
    model = with_model({"causal": causal})
    b = batch(3, lengths=(40,))
    changed = b["feats"].clone()
    changed[0, 24:] += 1.0  # input frames 24.. are encoder frames 12.. (stacking 2)
    before, after = (model(f, b["lengths"]).log_probs for f in (b["feats"], changed))
    early, late = ((before[0, s] - after[0, s]).abs().max() for s in (slice(0, 12), slice(12, None)))
    # Causal: equal up to rounding (a changed later frame may route elsewhere, and an expert's GEMM over another
    # number of rows may round an early row's sums differently: 2e-7 here). The full encoder's do change.
    assert early < 1e-5 if causal else early > 1e-2
    assert late > 1e-2


def test_sinusoidal_positions_are_the_classic_table():
    model = with_model({})
    table = model.positions(torch.ones(1, 5, dtype=torch.bool))[0]
    d = table.shape[1]
    for pos in range(5):
        for i in range(0, d, 2):
            rate = 10000 ** (-i / d)
            assert table[pos, i].item() == pytest.approx(math.sin(pos * rate), abs=1e-5)
            assert table[pos, i + 1].item() == pytest.approx(math.cos(pos * rate), abs=1e-5)


def test_cape_centres_positions_at_evaluation_and_augments_them_in_training():
    cfg = with_model({"positions": "cape", "cape_global_shift": 5.0, "cape_local_shift": 0.5,
                      "cape_global_scaling": 1.2}).cfg
    real = torch.arange(7).unsqueeze(0) < torch.tensor([[7], [4]])  # 7 and 4 real frames
    evaluation = cape_positions(real, cfg, training=False)
    assert evaluation[0].tolist() == [-3, -2, -1, 0, 1, 2, 3] and evaluation[1, :4].tolist() == [-1.5, -0.5, 0.5, 1.5]
    torch.manual_seed(0)
    draws = torch.stack([cape_positions(real, cfg, training=True) for _ in range(200)])
    bound = (evaluation.abs() + 5.0 + 0.25) * 1.2
    assert (draws - evaluation).abs().max() > 4 and ((draws.abs() <= bound + 1e-5).all())
    causal = cape_positions(real, cfg.model_copy(update={"causal": True}), training=False)
    assert causal[1].tolist() == list(range(7))  # a stream is not centred: its length is unknown


def test_cape_model_is_deterministic_at_evaluation_only():
    model = with_model({"positions": "cape"})
    b = batch(4)
    assert torch.equal(model(b["feats"], b["lengths"]).log_probs, model(b["feats"], b["lengths"]).log_probs)
    model.train()
    assert not torch.equal(model(b["feats"], b["lengths"]).log_probs, model(b["feats"], b["lengths"]).log_probs)


def test_the_aligned_head_gives_the_same_log_probs_and_gradients_and_keeps_the_parameter_shape():
    """On CUDA the output GEMM runs on a weight padded to a multiple of 8 rows (VOCAB + 1 = 21 -> 24); the
    padding columns are cut before the softmax, so nothing a loss or a decoder sees changes."""
    p = tiny_project("omni")
    results = []
    for aligned in (False, True):
        model = CTCModel(p.model, p.moe, VOCAB)
        fill_weights(model)
        model.use_cuda_kernels((8, 0) if aligned else None, torch.float32)
        b = batch(5)
        out = model(b["feats"], b["lengths"])
        out.log_probs.mul(torch.linspace(-1, 1, out.log_probs.numel()).view_as(out.log_probs)).sum().backward()
        results.append((out.log_probs, model.head.weight.grad, model.head.bias.grad))
    assert results[1][0].shape[-1] == VOCAB + 1 and model.head.weight.shape == (VOCAB + 1, p.model.d_model)
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_)


def roster_rows(model, b: dict, k: int, temperature: float, seed: int = 0):
    """Log-probs [K, B, T', V] of the K copies of a batch under a roster (copy-major, as inference runs them)."""
    B = len(b["lengths"])
    roster = Roster(seed, list(range(B)) * k, [c for c in range(k) for _ in range(B)], temperature)
    out = model(b["feats"].repeat(k, 1, 1), b["lengths"].repeat(k), roster=roster)
    return out.log_probs.view(k, B, *out.log_probs.shape[1:]), out.routing


@pytest.mark.parametrize("mode", ["omni", "switch"])
def test_a_roster_routes_copy_zero_as_trained_and_draws_the_others_by_temperature(mode):
    model, _ = build(mode, layers=3)
    model.eval()
    b = batch(3, lengths=(20, 16, 11))
    with torch.no_grad():
        plain = model(b["feats"], b["lengths"]).log_probs
        one, _ = roster_rows(model, b, 1, 1.0)
        assert torch.equal(one[0], plain)  # K=1 is plain inference, exactly
        # A batch four times larger computes copy 0 within float rounding of the plain batch (not bit for bit).
        cold, _ = roster_rows(model, b, 4, 1e-6)  # T -> 0: every copy takes the argmax
        assert all(torch.equal(cold[c], cold[0]) for c in range(4))
        torch.testing.assert_close(cold[0], plain, rtol=0, atol=1e-5)
        warm, routing = roster_rows(model, b, 4, 1.0)
        torch.testing.assert_close(warm[0], plain, rtol=0, atol=1e-5)
        assert all((warm[c] - plain).abs().max() > 1e-2 for c in range(1, 4))
        again, _ = roster_rows(model, b, 4, 1.0)
        other, _ = roster_rows(model, b, 4, 1.0, seed=1)
    assert torch.equal(again, warm) and not torch.equal(other, warm)  # the seed decides the draws
    B, T = 3, warm.shape[2]
    for stats in routing:  # the copies' choices differ from copy 0's on some real frames of every layer
        first = stats.first_choice_S.view(4, B, T)
        assert (first[1:] != first[0]).any() and ((first >= 0) == (first[0] >= 0)).all()


def test_a_rosters_noise_belongs_to_the_utterance_not_to_its_batch():
    a = Roster(7, [5, 9], [1, 1], 1.0).draw(2, [6, 4], 8, 4, "cpu")
    b = Roster(7, [9], [1], 1.0).draw(2, [4], 5, 4, "cpu")  # utterance 9 alone, in a shorter batch
    assert torch.equal(a.gumbel_SE.view(2, 8, 4)[1, :4], b.gumbel_SE.view(1, 5, 4)[0, :4])
    assert not a.gumbel_SE.view(2, 8, 4)[1, 4:].any()  # padding draws nothing
    c = Roster(7, [9, 9], [0, 2], 1.0).draw(2, [4, 4], 4, 4, "cpu")
    assert not c.gumbel_SE.view(2, 4, 4)[0].any() and c.sampled_S.view(2, 4).tolist() == [[False] * 4, [True] * 4]
    assert not torch.equal(c.gumbel_SE.view(2, 4, 4)[1], b.gumbel_SE.view(1, 5, 4)[0, :4])  # another copy
