"""The DeepSpeed engine around the model, and one forward of it: model -> engine -> loss.

``deepspeed.initialize`` creates the expert-parallel groups and splits expert from dense parameters; its dict,
batch keys derived, is the run plan's (``trainer.plan``).
"""
import deepspeed
import torch

from trainer.model import objective
from trainer.model.ctc import CTCModel, ModelOutput
from trainer.plan import RunPlan
from trainer.runtime.deepspeed_contract import install_checkpoint_engine


def build_model(plan: RunPlan, vocab_size: int) -> CTCModel:
    """This rank's part of the model: the same weights on every rank and for every ep_size (experts are
    initialised from their global id). Afterwards each rank draws its own random stream (dropout)."""
    seed, project = plan.project.run.seed, plan.project
    torch.manual_seed(seed)
    model = CTCModel(project.model, project.moe, vocab_size, plan.ep_size, plan.ep_rank, seed)
    capability = torch.cuda.get_device_capability(plan.device) if plan.device.type == "cuda" else None
    model.use_cuda_kernels(capability, plan.dtype)
    torch.manual_seed(seed + 1000003 * (plan.rank + 1))  # CPU and accelerator streams, per rank
    return model


def build_engine(plan: RunPlan, model: CTCModel):
    """deepspeed.initialize creates the expert-parallel groups and splits expert from dense parameters."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=plan.deepspeed)
    install_checkpoint_engine(engine)  # hashes what it writes, loads without running code
    return engine


def forward(engine, batch: dict) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
    """(model output, [B] weighted CTC sums, real encoder frames) of one batch as ``SpeechDataset.on_device``
    leaves it: features and targets on the engine's device, lengths and weights on the host."""
    out = engine(batch["feats"], batch["lengths"], batch["weight"] > 0)
    ctc = objective.ctc_sums(out, batch["targets"], batch["target_lengths"], batch["weight"])
    return out, ctc, objective.real_frames(out, batch["weight"])


def step_loss(engine, plan: RunPlan, batch: dict, stop_requested: bool = False, last: bool = False):
    """Forward one micro-batch and normalise its loss over all ranks: (Loss, output, StepTotals). One
    all-reduce (frame and routing counts, non-finite, stop and last-batch flags), entered by every rank."""
    out, ctc, frames = forward(engine, batch)
    ctc_sum = ctc.sum()
    totals = objective.step_totals(out, frames, ctc_sum, stop_requested, last)
    return objective.loss(ctc_sum, out, totals, plan.project.moe, plan.world), out, totals
