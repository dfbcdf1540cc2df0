"""Expert compute at the cost of one FFN per route: grouped matrix multiplies, and a dropless dispatch.

* ``GroupedExperts`` holds the local experts of one MoE layer as four stacked parameters (w1 [n, F, D],
  b1 [n, F], w2 [n, D, F], b2 [n, D]), so a forward never copies weights; its state dict shows DeepSpeed's
  per-expert names (``deepspeed_experts.<j>.0.weight`` ...), so checkpoint files, their names and everything
  that reads them are those of DeepSpeed's ``Experts``. The parameters carry DeepSpeed's expert marks.
* ``expert_ffn`` computes routes sorted by expert with ``torch.nn.functional.grouped_mm`` where torch has its
  fast kernel (``grouped_mm_fast``, chosen once when the model is built), else one matmul per expert on its
  rows; capacity mode and dropless mode both use it. On either path an expert's bias gradient is a sum over
  its rows accumulated in fp32, and an expert with no rows gets zero gradients.
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

from trainer.runtime import distributed

# the names in nn.Sequential(Linear, ReLU, Linear)
PER_EXPERT_KEYS = {"w1": "0.weight", "b1": "0.bias", "w2": "2.weight", "b2": "2.bias"}


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
        self.grouped_mm = False  # set by ``CTCModel.use_cuda_kernels`` where the device has the fast kernel
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    @torch.no_grad()
    def init_expert(self, j: int, expert: nn.Sequential):
        """Copy one DeepSpeed ``Experts`` expert's weights into local slot ``j``."""
        for name, key in PER_EXPERT_KEYS.items():
            getattr(self, name)[j].copy_(expert.get_parameter(key))

    def weights(self) -> tuple:
        """(w1, b1, w2, b2), stacked over the local experts."""
        return self.w1, self.b1, self.w2, self.b2

    def forward(self, inputs_GnCD: torch.Tensor) -> torch.Tensor:
        """[G, n, C, D] buffer from ``MOELayer`` -> [G, n, C, D] expert outputs."""
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


def grouped_mm_fast(capability, dtype: torch.dtype, d_model: int, ffn_dim: int) -> bool:
    """Whether ``grouped_mm`` is the faster path on a device of this CUDA ``capability`` (None: not CUDA). torch
    2.11 has its grouped GEMM kernel for SM 9.x and 10.x only (``GroupedBlas.cpp``); elsewhere it falls back to
    one matmul per group after an ``offs.cpu()`` host sync, slower than the per-expert loop. bf16 with 16-byte
    rows only."""
    return (capability is not None and capability[0] in (9, 10) and dtype == torch.bfloat16
            and d_model % 8 == 0 and ffn_dim % 8 == 0)


def expert_ffn(x_RD: torch.Tensor, counts_n: torch.Tensor, sizes: list[int], experts: GroupedExperts,
               grouped: bool = None) -> torch.Tensor:
    """[R, D] -> [R, D]: rows sorted by local expert, ``sizes[j]`` (host) = ``counts_n[j]`` (device) of them
    for expert j, each through its Linear-ReLU-Linear. ``grouped``: use ``grouped_mm`` (default: the layer's
    choice, ``GroupedExperts.grouped_mm``); else one matmul per expert, which an expert with no rows still
    enters (so every expert has a gradient, zero where it had no rows, as in capacity mode)."""
    grouped = experts.grouped_mm if grouped is None else grouped
    w1, b1, w2, b2 = experts.weights()
    if not grouped:
        return _PerExpert.apply(x_RD, w1, b1, w2, b2, sizes)
    has_rows_n = counts_n > 0
    w1, w2 = _zero_grad_where_empty(w1, has_rows_n), _zero_grad_where_empty(w2, has_rows_n)
    offsets = counts_n.cumsum(0).to(torch.int32)
    expert_R = torch.repeat_interleave(torch.arange(len(sizes), device=x_RD.device), counts_n,
                                       output_size=x_RD.shape[0])
    # Each row's bias through a one-hot matmul: its backward sums an expert's rows in a GEMM, accumulated in
    # fp32, where b[expert_R]'s index_put would add them one by one in the weights' dtype (bf16).
    one_hot_Rn = (expert_R.unsqueeze(1) == torch.arange(len(sizes), device=x_RD.device)).to(x_RD.dtype)
    h_RF = F.relu(F.grouped_mm(x_RD, w1.transpose(1, 2), offs=offsets) + one_hot_Rn @ b1)
    return F.grouped_mm(h_RF, w2.transpose(1, 2), offs=offsets) + one_hot_Rn @ b2


class _PerExpert(torch.autograd.Function):
    """One matmul per expert on its rows, reading and writing the stacked tensors in place: autograd over
    per-expert views would copy every expert's gradient into the stack (``stack``, or a zero tensor of all n
    per expert for ``w[j]``) and every output into a ``cat``, which at a few rows per expert costs as much as
    the matmuls. Gradients as ``F.linear``'s: bias sums accumulated in fp32 by the reduction."""

    @staticmethod
    def forward(ctx, x_RD, w1_nFD, b1_nF, w2_nDF, b2_nD, sizes: list):
        h_RF = x_RD.new_empty(x_RD.shape[0], w1_nFD.shape[1])
        y_RD = x_RD.new_empty(x_RD.shape)
        for j, (x, h, y) in enumerate(zip(*(t.split(sizes) for t in (x_RD, h_RF, y_RD)))):
            torch.addmm(b1_nF[j], x, w1_nFD[j].t(), out=h).relu_()
            torch.addmm(b2_nD[j], h, w2_nDF[j].t(), out=y)
        ctx.sizes = sizes
        ctx.save_for_backward(x_RD, h_RF, w1_nFD, w2_nDF)
        return y_RD

    @staticmethod
    def backward(ctx, g_RD):
        x_RD, h_RF, w1_nFD, w2_nDF = ctx.saved_tensors
        g_RD = g_RD.contiguous()
        gx_RD = torch.empty_like(x_RD)
        gw1, gw2 = torch.empty_like(w1_nFD), torch.empty_like(w2_nDF)
        gb1 = w1_nFD.new_empty(w1_nFD.shape[:2])
        gb2 = w2_nDF.new_empty(w2_nDF.shape[:2])
        for j, (x, h, g, gx) in enumerate(zip(*(t.split(ctx.sizes) for t in (x_RD, h_RF, g_RD, gx_RD)))):
            torch.mm(g.t(), h, out=gw2[j])
            gb2[j] = g.sum(0)
            gh = torch.ops.aten.threshold_backward(g @ w2_nDF[j], h, 0)
            torch.mm(gh.t(), x, out=gw1[j])
            gb1[j] = gh.sum(0)
            torch.mm(gh, w1_nFD[j], out=gx)
        return gx_RD, gw1, gb1, gw2, gb2, None


class _ZeroGradWhereEmpty(torch.autograd.Function):
    """Identity on stacked weights [n, ...] whose gradient is zeroed for the experts with no rows: SM100's
    grouped GEMM writes non-zero weight gradients for empty groups (pytorch issue 172439)."""

    @staticmethod
    def forward(ctx, w_n, has_rows_n):
        ctx.save_for_backward(has_rows_n)
        return w_n.view_as(w_n)

    @staticmethod
    def backward(ctx, grad_n):
        has_rows_n, = ctx.saved_tensors
        return grad_n * has_rows_n.view(-1, *[1] * (grad_n.dim() - 1)).to(grad_n.dtype), None


def _zero_grad_where_empty(w_n: torch.Tensor, has_rows_n: torch.Tensor) -> torch.Tensor:
    return _ZeroGradWhereEmpty.apply(w_n, has_rows_n)


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
