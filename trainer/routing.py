"""The router: a ``TopKGate`` subclass that switch uses once per MoE layer and omni shares across all of them.

DeepSpeed's own gating functions route padded frames (top-2 has no ``used_token``), size capacity from the
local token count (ranks with different frame counts then disagree on the all-to-all buffer), and have no
router z-loss. This gate keeps DeepSpeed's linear ``wg``, its jitter and its sparse 7-tuple contract with
``MOELayer``, and replaces the routing arithmetic so that:

* padded frames are never routed, never counted in the losses and never take capacity (top-1 and top-2);
* capacity is computed from the largest real-frame count in the expert-parallel group, so every rank
  exchanges buffers of one shape;
* logits are always fp32, and the load-balancing loss, the z-loss and the routing statistics of each call
  are kept in ``self.stats`` for the layer that made the call (a shared gate is called once per layer).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter

from trainer.telemetry import entropy_of


@dataclass
class RoutingStats:
    """What one gate call decided, for the losses and for telemetry."""
    lb_loss: torch.Tensor  # Switch load-balancing loss E * sum_e f_e * P_e over real frames
    z_loss: torch.Tensor  # mean over real frames of logsumexp(logits)^2
    entropy: torch.Tensor  # mean over real frames of the router distribution's entropy
    first_choice: torch.Tensor  # [S] int64 top-1 expert of every frame, -1 for padding
    expert_counts: torch.Tensor  # [E] routes kept per expert after the capacity limit
    dropped: torch.Tensor  # routes of real frames dropped by the capacity limit
    routes: torch.Tensor  # routes of real frames requested (frames * k)
    capacity: int


class RouterGate(TopKGate):
    """Top-1/top-2 gate with padding masks, group-wide capacity and z-loss; shareable across MoE layers."""

    def _set_ep_group(self, ep_group):
        # Every MoE layer that holds a shared gate hands it the group once; they must all agree.
        if self.ep_group is None:
            self.ep_group = ep_group
        elif self.ep_group is not ep_group:
            raise RuntimeError("one shared router was given two different expert-parallel groups; "
                               "every MoE layer that shares it must use the same ep_size")

    def forward(self, input, used_token=None, sparse_routes=True, use_tutel=False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("RouterGate returns DeepSpeed 0.19's sparse routes only")
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        logits = F.linear(x, self.wg.weight.float())
        real = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if used_token is None \
            else used_token.reshape(-1).bool()
        noisy = self.noisy_gate_policy == "RSample" and self.training
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        out, self.stats = route(logits, real, self.k, cf, self.min_capacity, self.drop_tokens, self.ep_group,
                                noisy or (self.k == 2 and self.top2_2nd_expert_sampling and self.training))
        return out


def _group_max(value: int, group, device) -> int:
    """The largest value over the expert-parallel group (a tensor on the compute device: NCCL needs it)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def route(logits: torch.Tensor, real: torch.Tensor, k: int, capacity_factor: float, min_capacity: int,
          drop_tokens: bool, ep_group: Optional[object], sample_noise: bool):
    """Route S frames to E experts; return MOELayer's 7-tuple and the call's RoutingStats.

    Locations are assigned first choices before second choices, in frame order, as GShard does; a route
    whose location reaches the capacity is dropped (its index becomes -1, so MOELayer gives it no slot).
    """
    S, E = logits.shape
    real_f = real.float()
    n_real = real_f.sum().clamp(min=1.0)
    probs = F.softmax(logits, dim=-1)
    choice_logits = logits + gumbel_rsample(logits.shape, device=logits.device) if sample_noise else logits
    indices = torch.topk(choice_logits, k, dim=-1).indices.t()  # [k, S]
    masks = F.one_hot(indices, E) * real.view(1, S, 1)  # [k, S, E]; padding rows are all zero

    offsets = torch.cumsum(masks.sum(dim=1), dim=0) - masks.sum(dim=1)  # earlier choices come first
    locations = torch.cumsum(masks, dim=1) - 1 + offsets.unsqueeze(1)  # [k, S, E]
    if drop_tokens:
        n_max = _group_max(int(real.sum().item()), ep_group, logits.device)
        capacity = max(math.ceil(n_max / E * capacity_factor * k), min_capacity, 1)
    else:
        capacity = _group_max(int(masks.sum(dim=(0, 1)).max().item()), ep_group, logits.device)
        capacity = max(capacity, 1)
    kept = masks * (locations < capacity)
    loc_s = (locations * kept).sum(-1)  # [k, S]
    routed = kept.sum(-1).bool()  # [k, S]

    gates = (probs.unsqueeze(0) * F.one_hot(indices, E)).sum(-1)  # [k, S] router probability of each choice
    if k > 1:
        gates = gates / gates.sum(0, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    out_indices = torch.where(routed, indices, torch.full_like(indices, -1)).to(torch.int32)

    me = (probs * real_f.unsqueeze(1)).sum(0) / n_real
    ce = masks[0].float().sum(0) / n_real
    lb_loss = (me * ce).sum() * E
    z_loss = (torch.logsumexp(logits, dim=-1).square() * real_f).sum() / n_real
    expert_counts = kept.sum(dim=(0, 1)).detach()
    stats = RoutingStats(lb_loss=lb_loss, z_loss=z_loss, entropy=entropy_of(probs, real).detach(),
                         first_choice=torch.where(real, indices[0], torch.full_like(indices[0], -1)).detach(),
                         expert_counts=expert_counts, dropped=(masks.sum() - kept.sum()).detach(),
                         routes=masks.sum().detach(), capacity=capacity)
    gate_out = (lb_loss, capacity, E, out_indices, loc_s.to(torch.int32), gates, expert_counts)
    return gate_out, stats
