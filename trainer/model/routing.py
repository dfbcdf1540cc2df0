"""The router: one ``TopKGate`` subclass, used once per MoE layer (switch) or shared by all of them (omni).

Why not DeepSpeed's gating functions, whose linear ``wg``, jitter and 7-tuple contract with ``MOELayer`` it keeps:
- they route padded frames (top-2 has no ``used_token``);
- they size capacity from the local frame count, so ranks disagree on the all-to-all buffer;
- they fill capacity in frame order, so in length-sorted batches the longest utterances lose frames;
- they sample the first expert under ``RSample``, and have no router z-loss.

A call, in steps (shape suffixes: S frames, E experts, K choices, D model width):
1. ``router_probs``: fp32 logits and softmax.
2. ``choose_experts``: top-k; when sampling, top-2's second choice by Gumbel noise (GShard), top-1's one choice
   under ``RSample`` (as DeepSpeed's ``top1gating``); at inference under a ``Roster``, Gumbel-top-k over the
   logits / temperature for the frames of copies 1..K-1.
3. ``assign_slots``: places in each expert's buffer, first choices first, then by router probability; padding
   never placed.
4. ``train_capacity``: ``ceil(k * capacity_factor * frames / E)``, ``frames`` the expert-parallel group's largest
   real-frame count (one buffer shape on every rank); without ``drop_tokens`` the busiest expert's load.
   Evaluation never drops (``trainer.model.experts.dropless_moe``).
5. ``gate_values``: the router probability of each kept choice (top-2: normalised over the two).
6. ``RoutingStats``: the sums the losses need, normalised over the global batch by ``trainer.model.objective``.
"""
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from trainer.runtime import distributed
from trainer.runtime.deepspeed_contract import TopKGate, gumbel_rsample, multiplicative_jitter


@dataclass
class RoutingStats:
    """What one gate call (one MoE layer) decided: sums for the losses and counts for telemetry."""
    prob_sum_E: torch.Tensor  # sum over real frames of the router probabilities (carries gradient)
    z_sum: torch.Tensor  # sum over real frames of logsumexp(logits)^2 (carries gradient)
    choice_counts_E: torch.Tensor  # real frames whose first choice is each expert, before capacity (float)
    kept_E: torch.Tensor  # routes kept per expert after the capacity limit
    entropy_sum: torch.Tensor  # sum over real frames of the router distribution's entropy (nats)
    first_choice_S: torch.Tensor  # int64 first choice of every frame, -1 for padding
    frames: torch.Tensor  # real frames (float)
    routes: torch.Tensor  # routes requested by real frames (frames * k)
    dropped: torch.Tensor  # of those, dropped by the capacity limit
    capacity: Union[int, torch.Tensor]  # slots per expert; dropless: the busiest expert's count, on the device

    def lb_loss(self) -> torch.Tensor:
        """Switch load-balancing loss E * sum_e f_e * P_e over this call's frames alone (for telemetry)."""
        n = self.frames.clamp(min=1.0)
        return len(self.prob_sum_E) * (self.choice_counts_E / n * self.prob_sum_E.detach() / n).sum()


@dataclass
class RosterDraw:
    """One MoE layer's share of a ``Roster``: what its choice of experts adds to the logits."""
    gumbel_SE: torch.Tensor  # Gumbel noise per frame and expert (0 for copy 0 and padding)
    sampled_S: torch.Tensor  # bool, the frames of copies 1..K-1
    temperature: float


@dataclass
class Roster:
    """K routes per utterance at inference (Roster of Experts, arXiv 2509.17238): the batch holds K copies of
    each utterance; copy 0 routes as trained, copies 1..K-1 draw each MoE layer's experts by Gumbel-max over the
    router logits / ``temperature`` (omni: the shared router, drawn anew per layer). The noise of a row comes
    from (seed, utterance, copy, layer) alone, so an utterance's routes do not depend on its batch."""
    seed: int
    utterances: list[int]  # per batch row: the utterance's index
    copies: list[int]  # per batch row: its copy, 0..K-1
    temperature: float

    def draw(self, layer: int, lengths: list[int], frames: int, experts: int, device) -> RosterDraw:
        """Layer ``layer``'s noise for a batch of ``len(lengths)`` rows of ``frames`` encoder frames (``lengths``:
        each row's real frames) -> RosterDraw over the flattened [rows * frames] frames."""
        gumbel = torch.zeros(len(lengths), frames, experts)
        for row, (utt, copy, n) in enumerate(zip(self.utterances, self.copies, lengths)):
            if copy:
                g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{utt}:{copy}:{layer}".encode()))
                u = torch.rand(n, experts, generator=g).clamp(1e-10, 1 - 1e-7)
                gumbel[row, :n] = -torch.log(-torch.log(u))
        sampled = torch.tensor(self.copies).bool().unsqueeze(1).expand(-1, frames)
        return RosterDraw(gumbel.reshape(-1, experts).to(device), sampled.reshape(-1).to(device), self.temperature)


@dataclass
class RouteCall:
    """The per-call input that rides in ``MOELayer``'s ``used_token`` slot, and the call's statistics back."""
    real_S: torch.Tensor  # bool, False for padding
    max_frames: int  # largest real-frame count of one rank in the expert-parallel group (training capacity)
    dropless: bool = False  # no capacity at all: every route is computed (trainer.model.experts.dropless_moe)
    roster: Optional[RosterDraw] = None  # inference with a roster of experts
    stats: Optional[RoutingStats] = None


class RouterGate(TopKGate):
    """Top-1/top-2 gate with padding masks, priority drops and group-wide capacity; shareable across layers."""

    def _set_ep_group(self, ep_group):
        # Every MoE layer that holds a shared gate hands it the group once; they must all agree.
        if self.ep_group is None:
            self.ep_group = ep_group
        elif self.ep_group is not ep_group:
            raise RuntimeError("one shared router was given two different expert-parallel groups; "
                               "every MoE layer that shares it must use the same ep_size")

    def forward(self, input, used_token=None, sparse_routes=True, use_tutel=False):
        """MOELayer's call (capacity mode): the 7-tuple; the statistics go back in the RouteCall."""
        if not sparse_routes or use_tutel or not isinstance(used_token, RouteCall):
            raise NotImplementedError("RouterGate is called by MoEFeedForward with a RouteCall, sparse routes only")
        out, used_token.stats = self.decide(input, used_token)
        return out

    def decide(self, input: torch.Tensor, call: RouteCall):
        """(7-tuple, RoutingStats) for S frames [S, D]."""
        x = input.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = multiplicative_jitter(x, device=x.device)
        logits_SE = F.linear(x, self.wg.weight.float())
        sample = self.training and (self.noisy_gate_policy == "RSample" or
                                    (self.k == 2 and self.top2_2nd_expert_sampling))
        if call.dropless:
            capacity = DROPLESS
        elif self.training and self.drop_tokens:
            capacity = train_capacity(call.max_frames, logits_SE.shape[1], self.k, self.capacity_factor,
                                      self.min_capacity)
        else:
            capacity = None  # no drop: the busiest expert of the group sets it
        return route(logits_SE, call.real_S, self.k, capacity, sample, self.ep_group, call.roster)


def router_probs(logits_SE: torch.Tensor) -> torch.Tensor:
    """[S, E] fp32 logits -> [S, E] probabilities."""
    return F.softmax(logits_SE, dim=-1)


def choose_experts(logits_SE: torch.Tensor, k: int, sample: bool, roster: Optional[RosterDraw] = None
                   ) -> torch.Tensor:
    """[K, S] expert ids. Sampling (Gumbel-max) draws the second choice for top-2 and the only one for top-1. A
    roster's sampled frames take the top k of logits / temperature + Gumbel noise (sampling without
    replacement); its other frames route as trained."""
    if roster is not None:
        noisy_SE = logits_SE / roster.temperature + roster.gumbel_SE
        return torch.topk(torch.where(roster.sampled_S.unsqueeze(1), noisy_SE, logits_SE), k, dim=-1).indices.t()
    if not sample:
        return torch.topk(logits_SE, k, dim=-1).indices.t()
    noisy_SE = logits_SE + gumbel_rsample(logits_SE.shape, device=logits_SE.device)
    if k == 1:
        return noisy_SE.argmax(-1).unsqueeze(0)
    first_S = logits_SE.argmax(-1)
    second_S = noisy_SE.scatter(1, first_S.unsqueeze(1), float("-inf")).argmax(-1)
    return torch.stack([first_S, second_S])


def chosen_probs(probs_SE: torch.Tensor, indices_KS: torch.Tensor) -> torch.Tensor:
    """[K, S] router probability of each choice."""
    return probs_SE.gather(1, indices_KS.t()).t()


def gate_values(chosen_KS: torch.Tensor) -> torch.Tensor:
    """[K, S] weight of each choice's expert output: its probability; for top-2 normalised over the two (GShard)."""
    gates_KS = chosen_KS
    if gates_KS.shape[0] > 1:
        gates_KS = gates_KS / gates_KS.sum(0, keepdim=True).clamp(min=torch.finfo(gates_KS.dtype).eps)
    return gates_KS


def assign_slots(indices_KS: torch.Tensor, priority_KS: torch.Tensor, real_S: torch.Tensor,
                 num_experts: int) -> torch.Tensor:
    """[K, S] place of each route in its expert's buffer (-1 for padding): first choices before second choices,
    and within each, highest priority first (ties in frame order), so a capacity limit drops the least
    confident routes wherever they are in the batch."""
    K, S = indices_KS.shape
    # One sort key: the choice rank, then descending priority in [0, 1].
    key = torch.arange(K, device=indices_KS.device).unsqueeze(1) * 2.0 + (1.0 - priority_KS.detach().float())
    key = torch.where(real_S.unsqueeze(0), key, torch.full_like(key, 2.0 * K + 1.0))
    order = torch.argsort(key.reshape(-1), stable=True)
    experts = indices_KS.reshape(-1)[order]
    placed = _one_hot(experts, num_experts) * real_S.repeat(K)[order].unsqueeze(1)
    slot_sorted = ((placed.cumsum(0) - 1) * placed).sum(1) - (1 - placed.sum(1))  # -1 where not placed
    slots = torch.empty_like(slot_sorted)
    slots[order] = slot_sorted
    return slots.view(K, S)


def _one_hot(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] int64 one-hot of ids in [0, C) (``F.one_hot`` reads the ids' range on the host on some devices)."""
    return torch.zeros(ids.numel(), num_classes, dtype=torch.int64, device=ids.device).scatter_(
        1, ids.reshape(-1, 1), 1)


def train_capacity(max_frames: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert when dropping: k * capacity_factor * frames / E (DeepSpeed's formula, group frames)."""
    return max(math.ceil(max_frames / num_experts * capacity_factor * k), min_capacity, 1)


def _counts(experts: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 count of the entries of ``experts`` where ``mask`` holds, per expert (sized by E, not by the
    data: no host sync)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=experts.device).index_add_(
        0, experts.reshape(-1), mask.reshape(-1).long())


DROPLESS = -1  # route()'s capacity for the dropless dispatch: no buffer, nothing dropped, no collective


def route(logits_SE: torch.Tensor, real_S: torch.Tensor, k: int, capacity: Optional[int], sample: bool,
          ep_group=None, roster: Optional[RosterDraw] = None):
    """Route S frames to E experts; return ``MOELayer``'s 7-tuple and the call's ``RoutingStats``.

    ``capacity`` None means no drop in a capacity buffer: the busiest expert over the expert-parallel group sets
    it (a collective); ``DROPLESS`` means no buffer at all (the recorded capacity is the local busiest)."""
    S, E = logits_SE.shape
    probs_SE = router_probs(logits_SE)
    indices_KS = choose_experts(logits_SE, k, sample, roster)
    chosen_KS = chosen_probs(probs_SE, indices_KS)
    gates_KS = gate_values(chosen_KS)
    placed_KS = real_S.unsqueeze(0).expand_as(indices_KS)
    placed_E = _counts(indices_KS, placed_KS, E)
    if capacity == DROPLESS:  # no buffer: no places to assign, nothing dropped; the busiest expert, on the device
        capacity = placed_E.max().clamp(min=1)
        kept_KS, slots_KS, kept_E = placed_KS, torch.zeros_like(indices_KS), placed_E
    else:
        if capacity is None:
            capacity = max(distributed.group_max(placed_E.max(), ep_group), 1)  # host sync (drop_tokens off)
        slots_KS = assign_slots(indices_KS, chosen_KS, real_S, E)
        kept_KS = placed_KS & (slots_KS < capacity)
        kept_E = _counts(indices_KS, kept_KS, E)
    out_indices_KS = torch.where(kept_KS, indices_KS, torch.full_like(indices_KS, -1)).to(torch.int32)
    out_slots_KS = torch.where(kept_KS, slots_KS, torch.zeros_like(slots_KS)).to(torch.int32)

    real_f = real_S.to(logits_SE.dtype)
    log_probs_SE = torch.log_softmax(logits_SE, dim=-1)
    lse_S = torch.logsumexp(logits_SE, dim=-1)
    stats = RoutingStats(
        prob_sum_E=real_f @ probs_SE,
        z_sum=lse_S.square() @ real_f,
        choice_counts_E=_counts(indices_KS[0], real_S, E).float(),
        kept_E=kept_E.detach(),
        entropy_sum=(-(probs_SE * log_probs_SE).sum(-1) @ real_f).detach(),
        first_choice_S=torch.where(real_S, indices_KS[0], torch.full_like(indices_KS[0], -1)).detach(),
        frames=real_f.sum().detach(), routes=placed_E.sum(), dropped=placed_E.sum() - kept_E.sum(),
        capacity=capacity)
    gate_out = (stats.lb_loss(), capacity, E, out_indices_KS, out_slots_KS, gates_KS, kept_E)
    return gate_out, stats
