"""The DeepSpeed engine around the model, and one forward of it: model -> engine -> loss.

``deepspeed.initialize`` creates the expert-parallel groups and splits expert from dense parameters; the
batch keys it needs are derived from the project's one batch setting.
"""
import copy

import deepspeed
import torch

from trainer import distributed, objective
from trainer.config import ProjectConfig, batch_plan, resolve_ep_size, zero_for_world
from trainer.deepspeed_contract import ep_rank, install_checkpoint_engine
from trainer.model import CTCModel, ModelOutput


def ds_config_for(ds_config: dict, project: ProjectConfig) -> dict:
    """DeepSpeed's dict with what derives from the project section filled in: the scheduler's length, the
    batch keys from ``data.batch_frames`` (one "sample" is one micro-batch; accumulation keeps the global batch
    fixed whatever the number of ranks) and the ZeRO settings for the world size (``zero_for_world``)."""
    cfg = copy.deepcopy(ds_config)
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and cfg["scheduler"].get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sched.setdefault("total_num_steps", project.run.max_steps)
    plan = batch_plan(project.data, distributed.world())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=plan.accumulation,
               train_batch_size=plan.world * plan.accumulation,
               zero_optimization=zero_for_world(cfg, project, plan.world))
    return cfg


def build_model(project: ProjectConfig, vocab_size: int) -> CTCModel:
    """The model with ep_size resolved against the world: the same weights on every rank and for every ep_size
    (experts are initialised from their global id). Afterwards each rank draws its own random stream (dropout)."""
    seed, world = project.run.seed, distributed.world()
    ep_size = resolve_ep_size(project.moe, world)
    torch.manual_seed(seed)
    model = CTCModel(project.model, project.moe, vocab_size, ep_size, ep_rank(distributed.rank(), ep_size), seed)
    torch.manual_seed(seed + 1000003 * (distributed.rank() + 1))  # CPU and accelerator streams, per rank
    return model


def build_engine(ds_config: dict, project: ProjectConfig, model: CTCModel):
    """deepspeed.initialize creates the expert-parallel groups and splits expert from dense parameters."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config_for(ds_config, project))
    install_checkpoint_engine(engine)  # hashes what it writes, loads without running code
    return engine


def forward(engine, batch: dict) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
    """(model output, [B] weighted CTC sums, real encoder frames) of one batch as ``SpeechDataset.on_device``
    leaves it: features and targets on the engine's device, lengths and weights on the host."""
    out = engine(batch["feats"], batch["lengths"], batch["weight"] > 0)
    ctc = objective.ctc_sums(out, batch["targets"], batch["target_lengths"], batch["weight"])
    return out, ctc, objective.real_frames(out, batch["weight"])


def step_loss(engine, project: ProjectConfig, batch: dict, stop_requested: bool = False, last: bool = False):
    """Forward one micro-batch and normalise its loss over all ranks: (Loss, output, StepTotals). One
    all-reduce (frame and routing counts, non-finite, stop and last-batch flags), entered by every rank."""
    out, ctc, frames = forward(engine, batch)
    ctc_sum = ctc.sum()
    totals = objective.step_totals(out, frames, ctc_sum, stop_requested, last)
    return objective.loss(ctc_sum, out, totals, project.moe, distributed.world()), out, totals
