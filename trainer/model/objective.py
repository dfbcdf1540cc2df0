"""The training objective, normalised once and for all ranks: per real encoder frame of the global batch.

    loss = CTC_sum / N  +  sum over MoE layers of ( lb_coef * E * sum_e f_e * P_e  +  z_coef * z )

with N the real encoder frames (after frame stacking) of the whole micro-batch over all ranks, f_e the
fraction of those frames whose first choice is expert e, P_e their mean router probability for e, and z the
mean of logsumexp(logits)^2 (ST-MoE). Every term is a mean over the same frames, and each MoE layer adds its
own routing terms (as Switch Transformer, GShard and Megatron-Core do), so ``lb_coef`` and ``z_coef`` mean
what they mean next to a per-token cross-entropy in Switch Transformer (0.01) and ST-MoE (0.001).

Each rank holds a part of the batch; its loss is its share scaled by the world size, because DeepSpeed
averages gradients over ranks: the mean of the ranks' gradients is then exactly the gradient of one rank
holding the union batch, however unevenly utterances and frames fall on the ranks. The counts N and f_e are
all-reduced once per step, together (``step_totals``); P_e and z keep their gradient locally.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config import MoEConfig
from trainer.model.ctc import BLANK, ModelOutput
from trainer.runtime import distributed


def ctc_sums(out: ModelOutput, targets: torch.Tensor, target_lengths: torch.Tensor,
             weight: torch.Tensor) -> torch.Tensor:
    """[B] CTC negative log-likelihood of each utterance, times its weight (0 for a stand-in batch). The lengths
    stay on the host (CUDA's CTC reads them there: a device copy would cost a sync)."""
    losses = F.ctc_loss(out.log_probs.transpose(0, 1), targets, out.lengths, target_lengths, blank=BLANK,
                        reduction="none", zero_infinity=True)
    return losses * weight.to(losses.device, non_blocking=True)


def real_frames(out: ModelOutput, weight: torch.Tensor) -> torch.Tensor:
    """Encoder frames that carry loss (a stand-in batch carries none), where the lengths are (the host)."""
    return (out.lengths.to(weight.dtype) * weight.to(out.lengths.device)).sum()


@dataclass
class StepTotals:
    """What every rank needs from all the others to normalise its loss (and flags the ranks agree on)."""
    frames: float  # N: real encoder frames of the micro-batch over all ranks
    choice_counts_LE: torch.Tensor  # first-choice counts per MoE layer and expert over all ranks (on the device)
    bad_loss: bool  # a non-finite loss on some rank
    stop: bool  # a stop requested on some rank
    last: bool  # some rank has no batch after this one: the epoch ends here for all


def step_totals(out: ModelOutput, frames: torch.Tensor, ctc_sum: torch.Tensor, stop_requested: bool,
                last: bool = False) -> StepTotals:
    """One all-reduce per step (the global frame count, routing counts and the flags) and one host read of the
    frame count and flags, which is where the host learns whether the loss was finite (a collective)."""
    counts = torch.stack([s.choice_counts_E for s in out.routing]) if out.routing else ctc_sum.new_zeros(0, 0)
    on = dict(dtype=torch.float64, device=ctc_sum.device)  # made there (torch.full): a host value copied would sync
    flags = torch.stack([(~torch.isfinite(ctc_sum.detach())).double(), torch.full((), float(stop_requested), **on),
                         torch.full((), float(last), **on), frames.to(**on, non_blocking=True)])
    total = distributed.sum_over_ranks({"counts": counts, "flags": flags})
    bad, stop, last, frames = total["flags"].tolist()  # host sync: the step's one read of its own outcome
    return StepTotals(frames, total["counts"].to(counts.device, torch.float32), bad > 0, stop > 0, last > 0)


@dataclass
class Loss:
    """This rank's share of the loss (for backward) and its parts, in the units of the global mean."""
    total: torch.Tensor
    ctc: torch.Tensor
    lb: torch.Tensor  # unweighted load-balancing loss, mean over MoE layers (for logs: 1.0 is balanced)
    z: torch.Tensor  # unweighted z-loss, mean over MoE layers (for logs)


def loss(ctc_sum: torch.Tensor, out: ModelOutput, totals: StepTotals, moe: MoEConfig, world: int) -> Loss:
    """The rank's share of the global per-frame objective; averaged over ranks it is the union batch's loss."""
    share = world / max(totals.frames, 1.0)
    ctc = ctc_sum * share
    lb = z = ctc.new_zeros(())
    for stats, counts_E in zip(out.routing, totals.choice_counts_LE):
        f_E = counts_E / max(totals.frames, 1.0)  # global, a constant: the gradient flows through P_e
        lb = lb + len(f_E) * (f_E * stats.prob_sum_E).sum() * share
        z = z + stats.z_sum * share
    layers = max(len(out.routing), 1)
    return Loss(ctc + moe.lb_coef * lb + moe.z_coef * z, ctc, lb / layers, z / layers)
