"""CTC Transformer encoder whose feed-forward blocks are dense, Switch (router per layer) or Omni (one router).

log-mel [B, T, 80] -> stack 4 frames (40 ms) -> Linear -> + sinusoidal positions -> pre-LN blocks
(self-attention, then FFN or MoE) -> LayerNorm -> Linear over the sentencepiece pieces plus blank (id 0).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.moe.layer import MoE

from trainer.config import ModelConfig, MoEConfig
from trainer.routing import RouterGate

BLANK = 0


def feed_forward(d_model: int, ffn_dim: int) -> nn.Sequential:
    """The FFN of the dense model and every expert: Linear-ReLU-Linear."""
    return nn.Sequential(nn.Linear(d_model, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d_model))


def make_gate(d_model: int, moe: MoEConfig) -> RouterGate:
    return RouterGate(d_model, moe.num_experts, k=moe.top_k, capacity_factor=moe.capacity_factor,
                      eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                      noisy_gate_policy=moe.noisy_gate_policy, drop_tokens=moe.drop_tokens, use_rts=False,
                      top2_2nd_expert_sampling=False)


def moe_blocks(cfg: ModelConfig, moe: MoEConfig) -> list[int]:
    """Indices of the blocks whose feed-forward is an MoE layer: every ``moe_every``-th, none for dense."""
    every = moe.moe_every
    return [] if moe.mode == "dense" else [i for i in range(cfg.num_layers) if i % every == every - 1]


class MoEFeedForward(nn.Module):
    """DeepSpeed's MoE layer with our gate swapped in; returns the output and the gate's stats of this call."""

    def __init__(self, d_model: int, ffn_dim: int, moe: MoEConfig, ep_size: int, gate: RouterGate):
        super().__init__()
        self.moe = MoE(d_model, feed_forward(d_model, ffn_dim), num_experts=moe.num_experts, ep_size=ep_size,
                       k=moe.top_k, use_rts=False, drop_tokens=moe.drop_tokens)
        self.moe.deepspeed_moe.gate = gate

    @property
    def gate(self) -> RouterGate:
        return self.moe.deepspeed_moe.gate

    def forward(self, x: torch.Tensor, real: torch.Tensor):
        y, _, _ = self.moe(x, real.reshape(-1).to(x.dtype))
        return y, self.gate.stats


class Block(nn.Module):
    """Pre-LayerNorm Transformer block; the FFN is dense or MoE."""

    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, real: torch.Tensor):
        h = self.ln_attn(x)
        h, _ = self.attn(h, h, h, key_padding_mask=~real, need_weights=False)
        x = x + self.drop(h)
        h = self.ln_ffn(x)
        stats = None
        if isinstance(self.ffn, MoEFeedForward):
            h, stats = self.ffn(h, real)
        else:
            h = self.ffn(h)
        return x + self.drop(h), stats


@dataclass
class ModelOutput:
    log_probs: torch.Tensor  # [B, T', V+1]
    lengths: torch.Tensor  # [B] valid encoder frames
    aux_loss: torch.Tensor  # weighted load-balancing + z-loss, mean over MoE layers (0 for dense)
    routing: list  # RoutingStats of each MoE layer, in depth order

    def mean_over_layers(self, field: str) -> float:
        """An unweighted routing loss ('lb_loss' or 'z_loss') averaged over MoE layers, for logs."""
        return sum(float(getattr(s, field).detach()) for s in self.routing) / max(len(self.routing), 1)


def sinusoids(length: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class CTCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig, vocab_size: int, ep_size: int = 1):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.stack = cfg.frame_stacking
        self.input_proj = nn.Linear(cfg.n_mels * cfg.frame_stacking, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        shared = make_gate(cfg.d_model, moe) if moe.mode == "omni" else None
        blocks, moe_at = [], set(moe_blocks(cfg, moe))
        for i in range(cfg.num_layers):
            if i not in moe_at:
                ffn = feed_forward(cfg.d_model, cfg.ffn_dim)
            else:
                ffn = MoEFeedForward(cfg.d_model, cfg.ffn_dim, moe, ep_size,
                                     shared or make_gate(cfg.d_model, moe))
            blocks.append(Block(cfg, ffn))
        self.blocks = nn.ModuleList(blocks)
        self.ln_out = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size + 1)  # + blank

    def routers(self) -> list:
        """Distinct router modules: one for omni, one per MoE layer for switch, none for dense."""
        gates = [b.ffn.gate for b in self.blocks if isinstance(b.ffn, MoEFeedForward)]
        return list({id(g): g for g in gates}.values())

    def frontend(self, feats: torch.Tensor, lengths: torch.Tensor):
        """Stack ``frame_stacking`` frames into one step; frames past each length are zeroed first, so
        whatever a batch holds in its padding never reaches a real step."""
        B, T, F_ = feats.shape
        feats = feats.to(self.input_proj.weight.dtype)  # fp32 features into a bf16 (or fp16) engine's weights
        feats = feats * (torch.arange(T, device=feats.device) < lengths.unsqueeze(1)).unsqueeze(-1).to(feats.dtype)
        pad = (-T) % self.stack
        feats = F.pad(feats, (0, 0, 0, pad))
        x = self.input_proj(feats.reshape(B, (T + pad) // self.stack, F_ * self.stack))
        out_lengths = torch.div(lengths + self.stack - 1, self.stack, rounding_mode="floor")
        real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < out_lengths.unsqueeze(1)
        return x, out_lengths, real

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> ModelOutput:
        x, out_lengths, real = self.frontend(feats, lengths)
        x = self.drop(x + sinusoids(x.shape[1], x.shape[2], x.device).to(x.dtype))
        routing = []
        for block in self.blocks:
            x, stats = block(x, real)
            if stats is not None:
                routing.append(stats)
        logits = self.head(self.ln_out(x))
        aux = x.new_zeros(())
        if routing:
            aux = sum(self.moe_cfg.lb_coef * s.lb_loss + self.moe_cfg.z_coef * s.z_loss for s in routing)
            aux = aux / len(routing)
        return ModelOutput(F.log_softmax(logits.float(), dim=-1), out_lengths, aux, routing)


def ctc_loss(out: ModelOutput, targets: torch.Tensor, target_lengths: torch.Tensor, weight=None) -> torch.Tensor:
    """CTC summed over each utterance, averaged over utterances: a per-batch normalisation that does not
    depend on other ranks, so data-parallel averaging equals one large batch of equal-sized shards.
    ``weight`` (per utterance) lets a stand-in batch take part in the step without carrying loss."""
    losses = F.ctc_loss(out.log_probs.transpose(0, 1), targets, out.lengths, target_lengths,
                        blank=BLANK, reduction="none", zero_infinity=True)
    if weight is not None:
        losses = losses * weight
    return losses.sum() / targets.shape[0]
