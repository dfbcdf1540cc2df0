"""CTC Transformer encoder whose feed-forward blocks are dense, Switch (router per layer) or Omni (one router).

log-mel [B, T, 80] -> stack 4 frames (40 ms) -> Linear -> + sinusoidal or CAPE positions -> pre-LN blocks
(self-attention, full or causal, then FFN or MoE) -> LayerNorm -> Linear over the sentencepiece pieces plus
blank (id 0).
"""
import math
import zlib
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE

from trainer.config import ModelConfig, MoEConfig
from trainer.model.experts import GroupedExperts, dropless_moe, grouped_mm_fast
from trainer.model.routing import Roster, RosterDraw, RouteCall, RouterGate, RoutingStats
from trainer.runtime import distributed
from trainer.runtime.deepspeed_contract import gate_of, install_experts, install_gate, local_experts

BLANK = 0


def feed_forward(d_model: int, ffn_dim: int) -> nn.Sequential:
    """The FFN of the dense model and every expert: Linear-ReLU-Linear."""
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d_model))


def make_gate(d_model: int, moe: MoEConfig) -> RouterGate:
    """A router for ``moe``: one per MoE layer (switch), or the one all layers share (omni)."""
    return RouterGate(d_model, moe.num_experts, k=moe.top_k, capacity_factor=moe.capacity_factor,
                      min_capacity=moe.min_capacity,
                      noisy_gate_policy=moe.noisy_gate_policy, drop_tokens=moe.drop_tokens, use_rts=False,
                      top2_2nd_expert_sampling=moe.second_expert_sampling)


def moe_blocks(cfg: ModelConfig, moe: MoEConfig) -> list[int]:
    """Indices of the blocks whose feed-forward is an MoE layer: every ``moe_every``-th, none for dense."""
    every = moe.moe_every
    return [] if moe.mode == "dense" else [i for i in range(cfg.num_layers) if i % every == every - 1]


class DenseFeedForward(nn.Sequential):
    """The dense model's FFN (Linear-ReLU-Linear), with the MoE layer's interface: (x, routed, max_frames) ->
    (y, None); it routes nothing, so it ignores both."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__(*feed_forward(d_model, ffn_dim))

    def forward(self, x: torch.Tensor, routed: torch.Tensor, max_frames: int, roster=None):
        """[B, T, D] -> ([B, T, D], no routing)."""
        return super().forward(x), None


class MoEFeedForward(nn.Module):
    """DeepSpeed's MoE layer with our gate and grouped experts swapped in: (x, routed, max_frames) ->
    (y, RoutingStats).

    Capacity mode runs DeepSpeed's MOELayer (capacity buffer, all-to-all of equal shapes) in training;
    ``moe.dropless`` computes exactly the routed frames instead (``experts.dropless_moe``), and so does every
    evaluation (nothing is dropped there, so the two are equal, and dropless needs no capacity from the host).
    DeepSpeed deep-copies one expert module, so every expert would start equal; each local expert is
    initialised from (seed, layer, global expert id) instead, so the experts differ from step 0 and the model
    is the same whatever the ep_size (experts live on ranks ep_rank * n_local + j)."""

    def __init__(self, d_model: int, ffn_dim: int, moe: MoEConfig, ep_size: int, ep_rank: int, gate: RouterGate,
                 init_key: str):
        super().__init__()
        self.dropless, self.num_experts = moe.dropless, moe.num_experts
        self.moe = MoE(d_model, feed_forward(d_model, ffn_dim), num_experts=moe.num_experts, ep_size=ep_size,
                       k=moe.top_k, use_rts=False, drop_tokens=moe.drop_tokens)
        install_gate(self.moe, gate)
        n_local = moe.num_experts // ep_size
        experts = GroupedExperts(d_model, ffn_dim, n_local, self.moe.expert_group_name)
        for j in range(n_local):
            seed = zlib.crc32(f"{init_key}:expert{ep_rank * n_local + j}".encode())
            with torch.random.fork_rng(devices=[]):  # the CPU generator alone: GPUs' streams stay untouched
                torch.default_generator.manual_seed(seed)
                experts.init_expert(j, feed_forward(d_model, ffn_dim))  # nn.Linear's own initialisation
        install_experts(self.moe, experts)

    @property
    def gate(self) -> RouterGate:
        """The router this layer calls (shared by all layers under omni)."""
        return gate_of(self.moe)

    def forward(self, x: torch.Tensor, routed: torch.Tensor, max_frames: int, roster: RosterDraw = None):
        """x [B, T, D], routed [B, T] (frames to route), max_frames (the capacity's frame count, 0 where none is
        needed: ``CTCModel.max_frames``), roster (inference: this layer's draws) -> (y [B, T, D], RoutingStats);
        unrouted frames get 0."""
        dropless = self.dropless or not self.training
        call = RouteCall(routed.reshape(-1), max_frames, dropless=dropless, roster=roster)
        if not dropless:
            y, _, _ = self.moe(x, call)
            return y, call.stats
        x_SD = x.reshape(-1, x.shape[-1])
        (_, _, _, indices_KS, _, gates_KS, _), stats = self.gate.decide(x_SD, call)
        y_SD = dropless_moe(x_SD, indices_KS, gates_KS, local_experts(self.moe), self.num_experts,
                            self.gate.ep_group, self.moe.ep_size)
        return y_SD.view_as(x), stats


class Block(nn.Module):
    """Pre-LayerNorm Transformer block; the FFN is dense or MoE, with one interface."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, real: torch.Tensor, routed: torch.Tensor, max_frames: int, causal_mask=None,
                roster: RosterDraw = None):
        """x [B, T, D]; real [B, T] (attended frames); routed [B, T] (the real frames of utterances that carry
        loss: the only ones the MoE routes and counts); max_frames and roster, passed to the FFN
        (``CTCModel.max_frames``, ``Roster``) -> (x [B, T, D], RoutingStats or None)."""
        h = self.ln_attn(x)
        h, _ = self.attn(h, h, h, key_padding_mask=~real, attn_mask=causal_mask, need_weights=False)
        x = x + self.drop(h)
        h, stats = self.ffn(self.ln_ffn(x), routed, max_frames, roster)
        return x + self.drop(h), stats


class ModelOutput(NamedTuple):
    """A NamedTuple, not a dataclass: DeepSpeed's engine hooks its backward prologue on the tensors of the
    outputs it can walk (tuples, lists, dicts), and without the prologue fp32 gradient accumulation in bf16
    counts earlier micro-batches again (tests/scenarios/test_parallel.py)."""
    log_probs: torch.Tensor  # [B, T', V+1]
    lengths: torch.Tensor  # [B] valid encoder frames, on the device of the input lengths (the host in training)
    routing: list[RoutingStats]  # one per MoE layer, in depth order (empty for dense)


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., T] positions (any real values) -> [..., T, dim]: sin and cos of each at 10000^(-2i/dim) rates."""
    freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    angle = positions.float().unsqueeze(-1) * freq
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)


def cape_positions(real: torch.Tensor, cfg: ModelConfig, training: bool) -> torch.Tensor:
    """[B, T] positions of CAPE (Likhomanenko et al., 2021), in encoder frames. Centred on each utterance's
    real frames (not when causal: a stream's length is unknown); in training, each utterance's positions are
    shifted by one U(-global, global), each frame's by U(-local/2, local/2), and all scaled by
    exp(U(-log s, log s)), so the model learns relative rather than absolute position. None at evaluation."""
    B, T = real.shape
    pos = torch.arange(T, device=real.device, dtype=torch.float32).expand(B, T)
    if not cfg.causal:
        pos = pos - (real.sum(1, keepdim=True) - 1).clamp(min=0) / 2
    if training:
        pos = pos + cfg.cape_global_shift * _symmetric(B, 1, like=pos) + cfg.cape_local_shift / 2 * _symmetric(
            B, T, like=pos)
        pos = pos * torch.exp(math.log(cfg.cape_global_scaling) * _symmetric(B, 1, like=pos))
    return pos


def _symmetric(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """U(-1, 1) samples on ``like``'s device, from the global stream (saved with every checkpoint)."""
    return torch.rand(*shape, device=like.device) * 2 - 1


class CTCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int, ep_size: int = 1, ep_rank: int = 0,
                 seed: int = 0):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.stack = cfg.frame_stacking
        self.input_proj = nn.Linear(cfg.n_mels * cfg.frame_stacking, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        shared = make_gate(cfg.d_model, moe) if moe.mode == "omni" else None
        blocks, moe_at = [], set(moe_blocks(cfg, moe))
        for i in range(cfg.num_layers):
            if i not in moe_at:
                ffn = DenseFeedForward(cfg.d_model, cfg.ffn_dim)
            else:
                ffn = MoEFeedForward(cfg.d_model, cfg.ffn_dim, moe, ep_size, ep_rank,
                                     shared or make_gate(cfg.d_model, moe), init_key=f"{seed}:block{i}")
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size + 1)  # + blank
        self.aligned_head = False  # on CUDA (``use_cuda_kernels``): see ``logits``

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V+1]. With ``aligned_head`` the GEMM runs on the weight padded with zero rows to a
        multiple of 8 (V+1 = 4,097 columns of bf16 output are rows of 8,194 bytes, which cuBLAS's fast kernels
        do not take), and the padding columns are cut before any softmax: they are never a class or a target.
        The parameter keeps its V+1 rows, so checkpoints do not change."""
        if not self.aligned_head:
            return self.head(h)
        n = self.head.out_features
        pad = (-n) % 8
        return F.linear(h, F.pad(self.head.weight, (0, 0, 0, pad)), F.pad(self.head.bias, (0, pad)))[..., :n]

    def use_cuda_kernels(self, capability, dtype: torch.dtype):
        """The kernels for a CUDA device of this ``capability`` (None: not CUDA) and engine ``dtype``: each MoE
        layer's ``grouped_mm`` where ``experts.grouped_mm_fast`` (else a matmul per expert), and the aligned
        output GEMM on any CUDA device."""
        grouped = grouped_mm_fast(capability, dtype, self.cfg.d_model, self.cfg.ffn_dim)
        for block in self.blocks:
            if isinstance(block.ffn, MoEFeedForward):
                local_experts(block.ffn.moe).grouped_mm = grouped
        self.aligned_head = capability is not None

    def routers(self) -> list:
        """Distinct router modules: one for omni, one per MoE layer for switch, none for dense."""
        gates = [b.ffn.gate for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]
        return list({id(g): g for g in gates}.values())

    def frontend(self, feats: torch.Tensor, lengths: torch.Tensor):
        """feats [B, T, n_mels], lengths [B] (input frames, on the host) -> (x [B, T', D], encoder lengths [B] on
        the lengths' device, real [B, T'] on the features' device). Frames past each length are zeroed first, so
        whatever a batch holds in its padding never reaches a real step."""
        B, T, F_ = feats.shape
        feats = feats.to(self.input_proj.weight.dtype)  # fp32 features into a bf16 (or fp16) engine's weights
        on_device = lengths.to(feats.device, non_blocking=True)  # the step's one copy of them (pinned in the loader)
        feats = feats * (torch.arange(T, device=feats.device) < on_device.unsqueeze(1)).unsqueeze(-1).to(feats.dtype)
        pad = (-T) % self.stack
        feats = F.pad(feats, (0, 0, 0, pad))
        x = self.input_proj(feats.reshape(B, (T + pad) // self.stack, F_ * self.stack))
        real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < self.stacked(on_device).unsqueeze(1)
        return x, self.stacked(lengths), real

    def stacked(self, lengths: torch.Tensor) -> torch.Tensor:
        """Input frames -> encoder frames (after frame stacking), on the lengths' device."""
        return torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")

    def max_frames(self, out_lengths: torch.Tensor, carries_loss: torch.Tensor) -> int:
        """The largest routed-frame count of one rank in the expert-parallel group, once per forward (the same
        for every MoE layer): training capacity is sized from it. One host read: of the host lengths on one rank,
        of the group's all-reduced maximum (a sync) with experts on several; none for dense, dropless or
        evaluation."""
        routers = self.routers()
        if not routers or not self.training or not self.moe_cfg.drop_tokens or self.moe_cfg.dropless:
            return 0
        return distributed.group_max((out_lengths * carries_loss).sum(), routers[0].ep_group)

    def positions(self, real: torch.Tensor) -> torch.Tensor:
        """[B, T', d_model] positional embeddings for the encoder frames."""
        if self.cfg.positions == "cape":
            return sinusoids(cape_positions(real, self.cfg, self.training), self.cfg.d_model)
        return sinusoids(torch.arange(real.shape[1], device=real.device), self.cfg.d_model).expand(
            real.shape[0], -1, -1)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, carries_loss: torch.Tensor = None,
                roster: Roster = None) -> ModelOutput:
        """feats [B, T, n_mels] on the model's device; lengths [B] input frames and carries_loss [B] bool (default:
        all), both best on the host. Frames of utterances that carry no loss (the stand-in of an all-failed batch)
        are attended but never routed nor counted by a router. ``roster`` (inference): how each row routes."""
        x, out_lengths, real = self.frontend(feats, lengths)
        carries_loss = torch.ones_like(lengths, dtype=torch.bool) if carries_loss is None else carries_loss
        routed = real & carries_loss.to(real.device, non_blocking=True).unsqueeze(1)
        x = self.drop(x + self.positions(real).to(x.dtype))
        max_frames = self.max_frames(out_lengths, carries_loss.to(out_lengths.device))
        T = x.shape[1]  # causal: True above the diagonal masks every later frame
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1) if self.cfg.causal else None
        routing, layer = [], 0
        rows = out_lengths.tolist() if roster is not None else None  # inference only: each row's real frames
        for block in self.blocks:
            draw = None
            if roster is not None and isinstance(block.ffn, MoEFeedForward):
                draw = roster.draw(layer, rows, T, self.moe_cfg.num_experts, x.device)
                layer += 1
            x, stats = block(x, real, routed, max_frames, causal, draw)
            if stats is not None:
                routing.append(stats)
        logits = self.logits(self.ln_out(x))
        return ModelOutput(F.log_softmax(logits.float(), dim=-1), out_lengths, routing)
