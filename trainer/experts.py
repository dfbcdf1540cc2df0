"""Expert compute at the cost of one FFN per route: grouped matrix multiplies, and a dropless dispatch.

* ``GroupedExperts`` holds the local experts of one MoE layer as four stacked parameters (w1 [n, F, D],
  b1 [n, F], w2 [n, D, F], b2 [n, D]), so a forward never copies weights; its state dict shows DeepSpeed's
  per-expert names (``deepspeed_experts.<j>.0.weight`` ...), so checkpoint files, their names and everything
  that reads them are those of DeepSpeed's ``Experts``. The parameters carry DeepSpeed's expert marks.
* ``expert_ffn`` computes routes sorted by expert with ``torch.nn.functional.grouped_mm`` where it runs fast
  (CUDA, bf16, SM80+), else one matmul per expert on its rows; capacity mode and dropless mode both use it.
* ``dropless_moe`` routes every frame without a capacity buffer: routes are sorted by expert, each expert
  computes exactly its routes, and across the expert-parallel group an all-to-all with split sizes moves
  exactly what each rank sends (one small all-to-all of the counts per layer first). The host reads the split
  sizes once per layer, its only sync. The result equals capacity mode whenever capacity mode drops nothing.

Shapes: G expert-parallel ranks, n local experts, C capacity, D model width, F hidden width, S frames,
K choices per frame, R routes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.experts import Experts

from trainer import distributed

PER_EXPERT_KEYS = {"w1": "0.weight", "b1": "0.bias", "w2": "2.weight", "b2": "2.bias"}  # in nn.Sequential(Linear, ReLU, Linear)


class GroupedExperts(Experts):
    """The local experts of one MoE layer in stacked storage; MOELayer calls it on the dispatched buffer
    [G, n, C, D]. ``init_expert(j, expert)`` copies the weights of one Linear-ReLU-Linear module into slot j."""

    def __init__(self, d_model: int, ffn_dim: int, num_local_experts: int, expert_group_name: str):
        nn.Module.__init__(self)  # not Experts.__init__: it deep-copies one module per expert
        n = self.num_local_experts = num_local_experts
        self.w1 = nn.Parameter(torch.empty(n, ffn_dim, d_model))
        self.b1 = nn.Parameter(torch.empty(n, ffn_dim))
        self.w2 = nn.Parameter(torch.empty(n, d_model, ffn_dim))
        self.b2 = nn.Parameter(torch.empty(n, d_model))
        for p in self.parameters():  # what Experts marks: reduced over the expert-data-parallel group only
            p.allreduce, p.group_name = False, expert_group_name
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    @torch.no_grad()
    def init_expert(self, j: int, expert: nn.Sequential):
        for name, key in PER_EXPERT_KEYS.items():
            getattr(self, name)[j].copy_(expert.get_parameter(key))

    def weights(self) -> tuple:
        return self.w1, self.b1, self.w2, self.b2

    def forward(self, inputs_GnCD: torch.Tensor) -> torch.Tensor:
        G, n, C, D = inputs_GnCD.shape
        x_RD = inputs_GnCD.transpose(0, 1).reshape(n * G * C, D)  # by local expert, then source rank
        counts = torch.full((n,), G * C, dtype=torch.int64, device=x_RD.device)
        return expert_ffn(x_RD, counts, [G * C] * n, self).view(n, G, C, D).transpose(0, 1)


def _per_expert_state(module: GroupedExperts, state: dict, prefix: str, local_metadata):
    """The stacked tensors as DeepSpeed's per-expert entries (views; DeepSpeed clones them when saving)."""
    for name, key in PER_EXPERT_KEYS.items():
        stacked = state.pop(prefix + name)
        for j in range(module.num_local_experts):
            state[f"{prefix}deepspeed_experts.{j}.{key}"] = stacked[j]


def _stacked_state(module: GroupedExperts, state: dict, prefix: str, local_metadata, strict, missing, unexpected,
                   errors):
    """Per-expert entries (as saved) back into the stacked tensors; an incomplete set is left for
    ``load_state_dict`` to report as missing or unexpected keys."""
    n = module.num_local_experts
    for name, key in PER_EXPERT_KEYS.items():
        keys = [f"{prefix}deepspeed_experts.{j}.{key}" for j in range(n)]
        if all(k in state for k in keys):
            state[prefix + name] = torch.stack([state.pop(k) for k in keys])


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` has a fast kernel for these operands: CUDA, bf16, SM80+, 16-byte rows."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)
            >= (8, 0) and x.shape[-1] % 8 == 0 and weight.shape[-2] % 8 == 0)


def expert_ffn(x_RD: torch.Tensor, counts_n: torch.Tensor, sizes: list[int], experts: GroupedExperts,
               grouped: bool = None) -> torch.Tensor:
    """[R, D] -> [R, D]: rows sorted by local expert, ``sizes[j]`` (host) = ``counts_n[j]`` (device) of them
    for expert j, each through its Linear-ReLU-Linear. ``grouped``: use ``grouped_mm`` (default: where it
    runs fast); else one matmul per expert, which an expert with no rows still enters (so every expert has a
    gradient, as in capacity mode)."""
    w1, b1, w2, b2 = experts.weights()
    if grouped is None:
        grouped = grouped_mm_runs(x_RD, w1)
    if not grouped:
        parts = torch.split(x_RD, sizes)
        return torch.cat([F.linear(F.relu(F.linear(x, w1[j], b1[j])), w2[j], b2[j]) for j, x in enumerate(parts)])
    offsets = counts_n.cumsum(0).to(torch.int32)
    expert_R = torch.repeat_interleave(torch.arange(len(sizes), device=x_RD.device), counts_n,
                                       output_size=x_RD.shape[0])  # the expert of each row, for its bias
    h_RF = F.relu(F.grouped_mm(x_RD, w1.transpose(1, 2), offs=offsets) + b1[expert_R])
    return F.grouped_mm(h_RF, w2.transpose(1, 2), offs=offsets) + b2[expert_R]


def dropless_moe(x_SD: torch.Tensor, indices_KS: torch.Tensor, gates_KS: torch.Tensor, experts: GroupedExperts,
                 num_experts: int, ep_group, ep_size: int) -> torch.Tensor:
    """[S, D] output of top-k routing without capacity: sum over a frame's routes of gate x expert(frame),
    combined in fp32 (as DeepSpeed's combine is). ``indices_KS`` holds -1 for routes not taken (padding)."""
    S, D = x_SD.shape
    E = num_experts
    expert_KS = torch.where(indices_KS >= 0, indices_KS.long(), E)  # routes not taken sort last, to bucket E
    order = torch.argsort(expert_KS.reshape(-1), stable=True)  # by expert; within one, in (choice, frame) order
    counts_E = torch.zeros(E + 1, dtype=torch.int64, device=x_SD.device).index_add_(
        0, expert_KS.reshape(-1), torch.ones_like(order))[:E]
    if ep_size > 1:
        received_Gn = distributed.exchange_counts(counts_E.view(ep_size, E // ep_size), ep_group)
        sizes = torch.cat([counts_E, received_Gn.reshape(-1)]).tolist()  # host sync: the split sizes
        routes = sum(sizes[:E])
    else:
        sizes = counts_E.tolist()  # host sync: the split sizes
        routes = sum(sizes)
    order = order[:routes]
    token_R = order % S  # route r = k * S + s is frame s's k-th choice
    x_sorted = x_SD.index_select(0, token_R)
    if ep_size > 1:
        y_sorted = _exchange_and_compute(x_sorted, sizes[:E], sizes[E:], received_Gn, experts, ep_group, ep_size)
    else:
        y_sorted = expert_ffn(x_sorted, counts_E, sizes, experts)
    weighted = y_sorted.float() * gates_KS.reshape(-1)[order].float().unsqueeze(1)
    return x_SD.new_zeros(S, D, dtype=torch.float32).index_add_(0, token_R, weighted).to(x_SD.dtype)


def _exchange_and_compute(x_sorted: torch.Tensor, counts_E: list, received: list, received_Gn: torch.Tensor,
                          experts: GroupedExperts, ep_group, ep_size: int):
    """Send each rank exactly the routes for its experts, compute them, send the results back. ``counts_E``:
    this rank's routes per global expert; ``received``: routes per (source rank, local expert), flat."""
    n = len(counts_E) // ep_size
    send = [sum(counts_E[g * n:(g + 1) * n]) for g in range(ep_size)]
    recv = [sum(received[g * n:(g + 1) * n]) for g in range(ep_size)]
    x_recv = distributed.all_to_all(x_sorted, recv, send, ep_group)  # by source rank, then local expert
    # Regroup by local expert (then source rank), compute, and put the results back in received order: row i
    # of the regrouped block (j, g) is row i of block (g, j) as received.
    flat_Gn = received_Gn.reshape(-1)
    starts_nG = (flat_Gn.cumsum(0) - flat_Gn).view(ep_size, n).t().reshape(-1)  # each block's start as received
    counts_nG = received_Gn.t().reshape(-1)
    shift_nG = starts_nG - (counts_nG.cumsum(0) - counts_nG)  # as received minus as regrouped
    total = sum(recv)
    perm = torch.arange(total, device=x_recv.device) + torch.repeat_interleave(shift_nG, counts_nG, output_size=total)
    sizes = [sum(received[g * n + j] for g in range(ep_size)) for j in range(n)]
    y_local = expert_ffn(x_recv.index_select(0, perm), received_Gn.sum(0), sizes, experts)
    y_recv = torch.empty_like(y_local).index_copy(0, perm, y_local)
    return distributed.all_to_all(y_recv, send, recv, ep_group)
