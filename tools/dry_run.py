"""The configured step on N GPUs, seen on any machine: memory, FLOPs, host syncs and copies, and a verdict.

    python tools/preflight.py --dry_run --gpus 8 [--gpu H100] --deepspeed_config ds_configs/paper/omni_8x84m.json

No GPU and no data are needed. Rank 0 of N is built as the run builds it (``trainer.plan``: its ep_size, its
local experts, the engine's dtype, the expert kernel the chosen GPU would get), on ``meta`` tensors (shapes
and dtypes, no storage, no compute) under torch's ``fake`` process group (collectives that move nothing). One
micro-batch of the configured size, utterances of ``data.max_duration`` as the sampler packs them, goes
through the run's own path: the dataset's collate and device features, the model, routing, experts and
objective (``trainer.engine.step_loss``), forward and backward; then a second one, as accumulation makes it.
A CPU tensor mixed into a device op raises on ``meta`` as on CUDA, and is reported with its line.

Each figure and where it comes from:
- parameters, in total and on this rank: the meta model;
- memory per GPU: parameters, gradients and the activation peak from torch's ``MemTracker`` over the two
  meta micro-batches; DeepSpeed's optimizer states, fp32 gradient buffer and reduce bucket from its source
  for the configured ZeRO stage, precision and N (``model_states``), not measured;
- FLOPs per optimizer step: ``FlopCounterMode`` over one micro-batch, times the accumulation; the step time
  at 40% MFU of the GPU's dense peak (``tools/gpu_specs.py``);
- host syncs and host-to-device copies of one micro-batch, with file:line: ``trainer.runtime.host_syncs`` on the meta
  device. Reads of meta tensors have no value; ``BalancedReads`` answers them as a step whose routes spread
  evenly would, and refuses any read it does not know (a new sync is an error until it is named here).
  Copies made inside CUDA kernels are not visible on meta: torch's CTC copies the lengths and target offsets
  to the GPU in its forward (``LossCTC.cu``), listed apart.
"""
import sys
import traceback
from pathlib import Path
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.utils import is_moe_param
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from tools.gpu_specs import ALIASES, GPU, GPUS, lookup
from trainer.config import ProjectConfig
from trainer.data.batches import SpeechDataset
from trainer.data.features import HOP, WINDOW
from trainer.engine import build_model, step_loss
from trainer.model.ctc import MoEFeedForward, moe_blocks
from trainer.model.experts import grouped_mm_fast
from trainer.plan import RunPlan, plan_run
from trainer.runtime import distributed
from trainer.runtime.deepspeed_contract import skip_shm_comm_build
from trainer.runtime.exits import RunError
from trainer.runtime.host_syncs import SyncLog, count_host_syncs

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
aten = torch.ops.aten
MFU = 0.4  # the step time is quoted at this model FLOPs utilisation
HEADROOM = 0.9  # of the GPU's memory a run may plan to use: the CUDA context and the allocator's fragmentation
FRAMES_PER_S = 100  # 10 ms input frames
TARGETS_PER_S = 4  # sentencepiece pieces per second of speech in the synthetic batch
CTC_KERNEL_COPIES = 3  # blocking host-to-device copies inside torch's CUDA CTC forward (LossCTC.cu), per call


class DryRunError(RunError, RuntimeError):
    """The step cannot be dry-run as configured: a CPU tensor in it, or a host read nobody has named."""


# -- the world --------------------------------------------------------------------------------------------
def fake_world(n: int):
    """Rank 0 of ``n`` in torch's ``fake`` process group: DeepSpeed's groups form, collectives return at once."""
    import deepspeed
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="fake")


def _register_meta_ctc():
    """Shapes of torch's CTC on meta, which has no kernel for it: the loss [B] and log-alpha [B, T, 2S+1] in
    the forward (what the CUDA kernel allocates and keeps for backward), the gradient like log_probs."""
    lib = torch.library.Library("aten", "IMPL")

    def forward(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
        T, B, _ = log_probs.shape
        S = targets.shape[1] if targets.dim() == 2 else int(max(target_lengths))
        return log_probs.new_empty(B), log_probs.new_empty(B, T, 2 * S + 1)

    def backward(grad, log_probs, *args, **kwargs):
        return torch.empty_like(log_probs)

    for name in ("_ctc_loss", "_ctc_loss.Tensor"):
        lib.impl(name, forward, "Meta")
    for name in ("_ctc_loss_backward", "_ctc_loss_backward.Tensor"):
        lib.impl(name, backward, "Meta")
    return lib


_META_CTC = []  # the library that holds the registration, made once per process


def meta_model(plan: RunPlan, vocab: int, capability):
    """This rank's model on meta, in the engine's dtype, its MoE layers joined to their expert-parallel groups
    as the engine joins them, the expert kernel chosen for ``capability``, the output GEMM aligned as on CUDA."""
    with META:
        model = build_model(plan, vocab)
    model.to(plan.dtype)
    model.use_cuda_kernels(capability, plan.dtype)
    join_expert_groups(model)
    return model.train()


def join_expert_groups(model):
    """Each MoE layer joined to its expert-parallel group, as ``deepspeed.initialize`` joins them."""
    for block in model.blocks:
        if isinstance(block.ffn, MoEFeedForward):
            block.ffn.moe.set_deepspeed_parallelism()


# -- the batch --------------------------------------------------------------------------------------------
def longest_batch(project: ProjectConfig, micro_frames: int, seed: int = 0):
    """(dataset, host batch, B, T): the micro-batch of the longest utterances the config keeps
    (``data.max_duration``), as ``synthetic_batch`` makes it."""
    data, cfg = project.data, project.model
    dataset = SpeechDataset([], None, data, cfg.n_mels, train=True, seed=seed)
    return (dataset, *synthetic_batch(dataset, micro_frames, data.max_duration, data.vocab_size, cfg.frame_stacking,
                                      seed))


def synthetic_batch(train_set, micro_frames: int, utt_seconds: float, vocab: int, stacking: int, seed: int):
    """A batch as the loader hands it over, in either ``data.features_on`` mode: B utterances of T frames of
    noise, as many as the micro-batch's padded frames hold (the sampler's packing), made by the dataset itself
    (``Features.host``, its masks, ``collate``), with random targets of 4 pieces per second. Returns
    (batch, B, T)."""
    T = min(max(1, round(utt_seconds * FRAMES_PER_S)), micro_frames)
    B = max(1, micro_frames // T)
    g = torch.Generator().manual_seed(seed)
    n_targets = max(1, min(T * TARGETS_PER_S // FRAMES_PER_S, T // stacking // 2))
    items = []
    for i in range(B):
        wave = torch.randn(WINDOW + HOP * (T - 1), generator=g) * 0.1  # exactly T frames
        x, masks = train_set.features.masked(train_set.features.host(wave), i)
        items.append((x, torch.randint(1, vocab + 1, (n_targets,), generator=g), i, masks))
    return train_set.collate(items), B, T


# -- the reads --------------------------------------------------------------------------------------------
@dataclass
class Balanced:
    """What a step whose routes spread evenly over the experts reads on the host."""
    frames: int  # routed encoder frames on this rank (the batch's, all real)
    world: int
    k: int
    experts: int
    ep_size: int

    def answer(self, callers: list[str], value: torch.Tensor):
        """The value of the read made under the functions ``callers`` (the stack), or None for an unknown one."""
        if "step_totals" in callers:  # non-finite, stop, last, frames over all ranks
            return [0.0, 0.0, 0.0, float(self.frames * self.world)]
        if "max_frames" in callers:  # the group's largest routed-frame count
            return self.frames
        routes = self.frames * self.k
        if "route" in callers:  # the group's busiest expert (capacity mode without dropping)
            return -(-routes // self.experts)
        if "dropless_moe" in callers:  # routes per expert, then (ep > 1) received per (source rank, expert)
            share = [routes // self.experts + (e < routes % self.experts) for e in range(self.experts)]
            return (share + share[:self.experts // self.ep_size] * self.ep_size)[:value.numel()]
        return None


class BalancedReads(TorchDispatchMode):
    """Host reads of meta tensors (a scalar read; a copy to the host, as ``tolist`` makes) answered by
    ``Balanced``; an unknown one is a DryRunError naming its line. Entered outside ``count_host_syncs``, so the
    counter sees each read before it is answered."""

    def __init__(self, balanced: Balanced):
        super().__init__()
        self.balanced = balanced

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scalar = func is aten._local_scalar_dense.default
        to_host = func is aten._to_copy.default and getattr(kwargs.get("device"), "type", None) == "cpu"
        if (scalar or to_host) and args[0].is_meta:
            stack = traceback.extract_stack()
            value = self.balanced.answer([f.name for f in stack], args[0])
            if value is None:
                raise DryRunError(f"a host read of a device tensor at {project_frame(stack)}: a sync the dry run "
                                  "does not know (tools/dry_run.py, Balanced)")
            if scalar:
                return value[0] if isinstance(value, list) else value
            return torch.tensor(value, dtype=kwargs.get("dtype") or args[0].dtype).reshape(args[0].shape)
        return func(*args, **kwargs)


@register_flop_formula(aten._grouped_mm)
def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """Multiply-adds x 2 of grouped_mm: [M, K] x [n, K, N] (forward and the input's gradient), [M, R] x [R, N]
    split over R (the weights' gradient), [n, M, K] x [K, N], and [n, M, K] x [n, K, N]."""
    groups = a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1
    return 2 * groups * a_shape[-2] * a_shape[-1] * b_shape[-1]


def project_frame(frames) -> str:
    """The innermost frame of this repository's code (but this file's) as path:line (function)."""
    for f in reversed(frames):
        path = Path(f.filename).resolve()
        if path.is_relative_to(ROOT) and ".venv" not in path.parts and path != Path(__file__).resolve():
            return f"{path.relative_to(ROOT)}:{f.lineno} ({f.name})"
    return "outside this repository"


# -- the step ---------------------------------------------------------------------------------------------
def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What CUDA runs for the model's attention (bf16, a padding mask, dropout): torch's SDPA takes the
    memory-efficient kernel where flash attention cannot take a mask, and it keeps O(T) per head for backward;
    on meta SDPA decomposes into the math path, which keeps the T x T scores."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p, is_causal,
                                                       scale=scale)[0]


@contextmanager
def cuda_attention():
    """``nn.MultiheadAttention``'s call of SDPA (``torch.nn.functional``'s global) bound to the CUDA kernel."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved



@dataclass
class Step:
    memory: dict  # MemTracker's peak, bytes per kind (PARAM, GRAD, ACT, TEMP, ...) and Total
    flops: float  # one micro-batch, forward and backward
    log: SyncLog  # the syncs and non-blocking host-to-device copies of one micro-batch


def micro_batch(model, plan: RunPlan, dataset: SpeechDataset, host_batch: dict):
    """One micro-batch as ``Trainer.train_step`` makes it, up to the optimizer, on the plan's device."""
    batch = dataset.on_device(host_batch, plan.device)
    loss, _, _ = step_loss(model, plan, batch)
    loss.total.backward()


def run_step(model, plan: RunPlan, dataset: SpeechDataset, host_batch: dict, balanced: Balanced,
             attention=cuda_attention) -> Step:
    """Two micro-batches on meta: the FLOPs of the first; the memory (with the first's gradients held, as
    accumulation holds them), syncs and copies of the second. ``attention``: the attention kernel's context
    (``cuda_attention``; ``nullcontext`` keeps SDPA's math path, as the CPU runs it)."""
    if not _META_CTC:
        _META_CTC.append(_register_meta_ctc())
    tracker = MemTracker()
    try:
        with distributed.collectives_on(META), BalancedReads(balanced), attention():
            with FlopCounterMode(display=False) as flops:
                micro_batch(model, plan, dataset, host_batch)
            tracker.track_external(model)
            with tracker, count_host_syncs(META) as log:
                micro_batch(model, plan, dataset, host_batch)
    except (RuntimeError, NotImplementedError) as e:
        if isinstance(e, DryRunError):
            raise
        where = project_frame(traceback.extract_tb(e.__traceback__))
        raise DryRunError(f"at {where}: {str(e).splitlines()[0]}") from None
    peak = {str(k).split(".")[-1]: v for k, v in tracker.get_tracker_snapshot("peak")[META].items()}
    return Step(peak, flops.get_total_flops(), log)


# -- DeepSpeed's states -----------------------------------------------------------------------------------
def model_states(plan: RunPlan, dense: int, expert: int) -> dict:
    """Bytes per rank that DeepSpeed 0.19.8 adds to the module's parameters and gradients, as its source
    allocates them (runtime/bf16_optimizer.py, runtime/zero/stage_1_and_2.py): the fp32 master copy and
    Adam's two moments of this rank's partition (12 bytes a parameter, partitioned over the data-parallel
    group for dense parameters and over the expert-data-parallel group for experts); with bf16 and fp32
    accumulation at ZeRO 1 (BF16_Optimizer) a full-size fp32 gradient buffer (4 bytes a parameter); at ZeRO 2
    with fp32 accumulation an fp32 gradient partition; otherwise (ZeRO's optimizer) a reduce bucket of
    ``reduce_bucket_size`` elements in the communication dtype."""
    ds, world = plan.deepspeed, plan.world
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    partition = dense / world + expert / (world // plan.ep_size)
    half = plan.dtype != torch.float32
    accum = ds.get("data_types", {}).get("grad_accum_dtype", "fp32" if not half else "bf16")
    out = {"optimizer": 12 * partition}
    if half and accum == "fp32" and stage == 1:
        out["fp32 gradients"] = 4 * (dense + expert)
    else:
        if half and accum == "fp32" and stage == 2:
            out["fp32 gradients"] = 4 * partition
        comm = {"fp32": 4, "bf16": 2, "fp16": 2}.get(ds.get("communication_data_type", ""), plan.dtype.itemsize)
        bucket = int(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8))
        out["reduce bucket"] = bucket * comm if stage else 0
    return out


# -- the report -------------------------------------------------------------------------------------------
def sync_budget(project: ProjectConfig, ep_size: int, host_reads_counted: bool = False) -> tuple[int, str]:
    """(host syncs one micro-batch needs by design, the mode): the step's outcome; in capacity mode the group's
    frame count where experts sit on several ranks (``host_reads_counted``: where a read of a host value counts
    too, as on CPU ranks, always); dropless, and capacity mode without dropping, one read per MoE layer."""
    moe, layers = project.moe, len(moe_blocks(project.model, project.moe))
    if not layers:
        return 1, "dense"
    if moe.dropless:
        return 1 + layers, "dropless"
    if not moe.drop_tokens:
        return 1 + layers, "capacity mode without dropping"
    return 1 + (ep_size > 1 or host_reads_counted), "capacity mode"


def largest_micro_frames(fixed: float, activations: float, micro_frames: int, budget: float, T: int) -> int:
    """The largest micro-batch (whole utterances of T frames) whose activations, scaled with its frames from the
    measured ones, fit the budget beside the ``fixed`` states."""
    per_frame = activations / micro_frames
    frames = int((budget - fixed) / per_frame) if budget > fixed else 0
    return frames // T * T


def dry_run(gpus: int, gpu_name: str, ds_config: dict, project: ProjectConfig, out=sys.stdout) -> "Figures":
    """Print the dry run of ``project`` on rank 0 of ``gpus`` GPUs named ``gpu_name`` (``tools/preflight.py
    --dry_run``); return its figures."""
    gpu = lookup(gpu_name)
    if gpu is None:
        raise DryRunError(f"--gpu {gpu_name}: unknown; one of {', '.join(GPUS)} (or {', '.join(ALIASES)})")
    fake_world(gpus)
    plan = plan_run(ds_config, project, 0, gpus, META)
    model = meta_model(plan, project.data.vocab_size, gpu.capability)
    dataset, host_batch, B, T = longest_batch(project, plan.batch.micro_frames)
    frames = B * -(-T // project.model.frame_stacking)
    balanced = Balanced(frames, gpus, project.moe.top_k, project.moe.num_experts, plan.ep_size)
    figures = measure(plan, model, gpu, run_step(model, plan, dataset, host_batch, balanced), B, T)
    print(render(figures), file=out)
    return figures


@dataclass
class Figures:
    plan: RunPlan
    gpu: GPU
    batch: tuple  # (B utterances, T frames)
    dense: int  # parameters on this rank outside the experts
    expert: int  # parameters of this rank's local experts
    kernel: str  # the experts' matmul
    memory: dict  # bytes per GPU, by kind
    flops: float  # per optimizer step per rank
    peak_tflops: float
    log: SyncLog  # one micro-batch's syncs and copies
    budget: int  # host syncs a micro-batch needs by design

    @property
    def need(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.need <= HEADROOM * self.gpu.memory_gib * 2 ** 30

    @property
    def step_s(self) -> float:
        return self.flops / (MFU * self.peak_tflops * 1e12)


def measure(plan: RunPlan, model, gpu: GPU, step: Step, B: int, T: int) -> Figures:
    """The figures of the meta step and DeepSpeed's states on this rank."""
    project = plan.project
    expert = sum(p.numel() for p in model.parameters() if is_moe_param(p))
    dense = sum(p.numel() for p in model.parameters()) - expert
    mem = step.memory
    memory = {"parameters": mem.get("PARAM", 0), "gradients": mem.get("GRAD", 0),
              **model_states(plan, dense, expert), "activations": mem.get("ACT", 0) + mem.get("TEMP", 0)}
    kernel = "none (dense)" if not expert else "grouped_mm" if grouped_mm_fast(
        gpu.capability, plan.dtype, project.model.d_model, project.model.ffn_dim) else "one matmul per expert"
    peak = gpu.bf16_tflops if plan.dtype != torch.float32 else gpu.fp32_tflops
    return Figures(plan, gpu, (B, T), dense, expert, kernel, memory, step.flops * plan.batch.accumulation, peak,
                   step.log, sync_budget(project, plan.ep_size)[0])


def render(f: Figures) -> str:
    plan, project, gpu, (B, T) = f.plan, f.plan.project, f.gpu, f.batch
    sources = {"parameters": "MemTracker, meta step", "gradients": "MemTracker, meta step",
               "activations": "MemTracker's peak over the meta step (activations and temporaries)"}
    usable = HEADROOM * gpu.memory_gib * 2 ** 30
    lines = [
        f"dry run: {project.moe.mode}{' dropless' if project.moe.dropless else ''}, rank 0 of {plan.world} x "
        f"{gpu.name} ({gpu.memory_gib:g} GiB, SM {gpu.capability[0]}.{gpu.capability[1]}), ep_size {plan.ep_size}, "
        f"{str(plan.dtype)[6:]}, ZeRO {plan.deepspeed.get('zero_optimization', {}).get('stage', 0)}; "
        f"{plan.batch.describe()}",
        f"micro-batch: {B} utterances x {T / 100:.1f} s ({B * T:,} frames); expert kernel: {f.kernel}",
        "== parameters",
        f"{f.dense + f.expert * plan.ep_size:,} in the model; on this rank {f.dense + f.expert:,} ({f.dense:,} dense, "
        f"{f.expert:,} in the local experts)",
        "== memory per GPU (GiB)",
        *(f"  {k:<16} {v / 2 ** 30:7.2f}   {sources.get(k, 'DeepSpeed 0.19.8 source (model_states)')}"
          for k, v in f.memory.items()),
        f"  {'total':<16} {f.need / 2 ** 30:7.2f}   of {gpu.memory_gib:g} GiB "
        f"({HEADROOM:.0%} usable: {usable / 2 ** 30:.1f})",
        "== compute",
        f"{f.flops / 1e12:.2f} TFLOP per optimizer step per rank ({plan.batch.accumulation} micro-batches, "
        f"FlopCounterMode); at {MFU:.0%} MFU of {f.peak_tflops:g} TFLOP/s: {f.step_s:.3f} s per step",
        "== host syncs of one micro-batch",
        f"{f.log.count} (budget {f.budget})" + (":\n" + f.log.summary() if f.log.count else ""),
        f"plus {CTC_KERNEL_COPIES} blocking host-to-device copies inside torch's CUDA CTC forward (LossCTC.cu: "
        "lengths and target offsets), not visible on meta",
        f"non-blocking host-to-device copies: {len(f.log.copies)}" + (
            ":\n" + f.log.summary(f.log.copies) if f.log.copies else ""),
        "== verdict", verdict(f)]
    return "\n".join(lines)


def verdict(f: Figures) -> str:
    """"fits: 15 GiB of 80" and how large a micro-batch would, or what to change; and the syncs over budget."""
    gpu, need, syncs = f.gpu, f.need / 2 ** 30, ""
    if f.log.count > f.budget:
        syncs = f"; {f.log.count} host syncs per micro-batch, over the budget of {f.budget}"
    activations = f.memory["activations"]
    frames = largest_micro_frames(f.need - activations, activations, f.plan.batch.micro_frames,
                                  HEADROOM * gpu.memory_gib * 2 ** 30, f.batch[1])
    if f.fits:
        per_rank = f.plan.batch.batch_frames // f.plan.world
        room = (f"the rank's whole batch, {per_rank:,} frames, would fit in one micro-batch" if frames >= per_rank
                else f"data.max_frames_per_rank up to {frames:,} would")
        return f"fits: {need:.0f} GiB of {gpu.memory_gib:g} ({room})" + syncs
    if not frames:
        return (f"does not fit: {need:.0f} GiB of {gpu.memory_gib:g} before any activation: use more GPUs "
                "(experts and optimizer states spread over them)" + syncs)
    return f"does not fit: {need:.0f} GiB of {gpu.memory_gib:g}; lower data.max_frames_per_rank to {frames:,}" + syncs
