"""Expert compute at the cost of one FFN per route: grouped matrix multiplies, and a dropless dispatch.

* ``GroupedExperts`` is DeepSpeed's ``Experts`` (the same modules, parameter names, expert marking and
  checkpoint files, one per layer and global expert id) computed as one batched matmul over the capacity
  buffer of all local experts, instead of a Python loop over them.
* ``dropless_moe`` routes every frame without a capacity buffer: routes are sorted by expert, each expert
  computes exactly its routes, and across the expert-parallel group an all-to-all with split sizes moves
  exactly what each rank sends (one small all-to-all of the counts per layer first). Nothing is dropped and no
  empty slot is computed; the result equals capacity mode whenever capacity mode drops nothing.

Shapes: G expert-parallel ranks, n local experts, C capacity, D model width, F hidden width, S frames,
R routes (real frames x top_k).
"""
from itertools import accumulate

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts

from trainer import distributed


def stacked_weights(experts) -> tuple:
    """(W1 [n, F, D], b1 [n, F], W2 [n, D, F], b2 [n, D]) of Linear-ReLU-Linear experts (gradients flow back)."""
    first, second = [e[0] for e in experts], [e[2] for e in experts]
    return (torch.stack([m.weight for m in first]), torch.stack([m.bias for m in first]),
            torch.stack([m.weight for m in second]), torch.stack([m.bias for m in second]))


def grouped_ffn(x_nTD: torch.Tensor, experts) -> torch.Tensor:
    """Expert j applied to x_nTD[j], for all local experts in two batched matmuls."""
    w1, b1, w2, b2 = stacked_weights(experts)
    h = F.relu(torch.baddbmm(b1.unsqueeze(1), x_nTD, w1.transpose(1, 2)))
    return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))


class GroupedExperts(Experts):
    """DeepSpeed's ``Experts`` with one batched matmul for all local experts (MOELayer calls it on the
    dispatched buffer [G, n, C, D])."""

    def forward(self, inputs_GnCD: torch.Tensor) -> torch.Tensor:
        G, n, C, D = inputs_GnCD.shape
        x_nTD = inputs_GnCD.transpose(0, 1).reshape(n, G * C, D)
        return grouped_ffn(x_nTD, self.deepspeed_experts).view(n, G, C, D).transpose(0, 1)


def segment_ffn(x_RD: torch.Tensor, counts: list[int], experts) -> torch.Tensor:
    """Routes sorted by local expert, ``counts[j]`` of them for expert j: each expert on exactly its rows."""
    # An expert with no route still runs (on zero rows), so every expert has a gradient, as in capacity mode.
    return torch.cat([expert(part) for expert, part in zip(experts, torch.split(x_RD, counts))])


def dropless_moe(x_SD: torch.Tensor, indices_KS: torch.Tensor, gates_KS: torch.Tensor, experts, num_experts: int,
                 ep_group, ep_size: int) -> torch.Tensor:
    """[S, D] output of top-k routing without capacity: sum over a frame's routes of gate x expert(frame).
    ``indices_KS`` holds -1 for routes not taken (padding)."""
    S, D = x_SD.shape
    K = indices_KS.shape[0]
    taken = indices_KS.reshape(-1) >= 0
    token_R = torch.arange(S, device=x_SD.device).repeat(K)[taken]
    expert_R = indices_KS.reshape(-1)[taken].long()
    gate_R = gates_KS.reshape(-1)[taken]
    order = torch.argsort(expert_R, stable=True)
    token_sorted = token_R[order]
    x_sorted = x_SD.index_select(0, token_sorted)
    counts_E = torch.bincount(expert_R, minlength=num_experts)
    if ep_size > 1:
        y_sorted = _exchange_and_compute(x_sorted, counts_E, experts, ep_group, ep_size)
    else:
        y_sorted = segment_ffn(x_sorted, counts_E.tolist(), experts)
    # Scattered straight from expert order: a frame's (at most K) routes add into its row.
    weighted = y_sorted * gate_R[order].unsqueeze(1).to(y_sorted.dtype)
    return x_SD.new_zeros(S, D).index_add(0, token_sorted, weighted)


def _exchange_and_compute(x_sorted: torch.Tensor, counts_E: torch.Tensor, experts, ep_group, ep_size: int):
    """Send each rank exactly the routes for its experts, compute them, send the results back."""
    n = counts_E.numel() // ep_size
    received_Gn = distributed.exchange_counts(counts_E.view(ep_size, n), ep_group)  # [source rank, local expert]
    send = counts_E.view(ep_size, n).sum(1).tolist()
    recv_counts = received_Gn.tolist()
    recv = [sum(row) for row in recv_counts]
    x_recv = distributed.all_to_all(x_sorted, recv, send, ep_group)  # by source rank, then local expert
    # Regroup by local expert (then source rank), compute, and put the results back in received order.
    starts = list(accumulate([c for row in recv_counts for c in row], initial=0))
    perm = torch.cat([torch.arange(starts[g * n + j], starts[g * n + j + 1], device=x_sorted.device)
                      for j in range(n) for g in range(ep_size)])
    y_local = segment_ffn(x_recv.index_select(0, perm), received_Gn.sum(0).tolist(), experts)
    y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local)
    return distributed.all_to_all(y_recv, send, recv, ep_group)
