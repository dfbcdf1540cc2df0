"""The run resolved once against its process layout, as torchtitan builds its ``ParallelDims`` once.

``plan_run`` is the one place where the world size meets the config: the expert-parallel size and this rank's
place, the split of the batch over ranks and accumulation, the dict DeepSpeed is given and the output folder.
It raises ``ConfigError`` before anything is written; the model, engine, trainer and checkpointer read the plan.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import SECTION, ConfigError, DataConfig, MoEConfig, ProjectConfig
from trainer.runtime import deepspeed_config
from trainer.runtime.deepspeed_contract import ep_rank


@dataclass(frozen=True)
class BatchPlan:
    """How ``data.batch_frames`` is split over ranks and accumulation steps for a world size."""
    batch_frames: int
    world: int
    accumulation: int
    micro_frames: int  # padded frames per micro-batch per rank

    def describe(self) -> str:
        """The batch in words: frames and padded audio per step, and how they are split."""
        frames = self.micro_frames * self.world * self.accumulation
        audio = f"{frames / 6000:.1f} min" if frames < 360000 else f"{frames / 360000:.1f} h"
        return (f"batch {frames:,} frames ({audio} of padded audio) per step = {self.world} rank(s) x "
                f"{self.accumulation} micro-batch(es) x {self.micro_frames:,} frames")


def batch_plan(data: DataConfig, world: int) -> BatchPlan:
    """Accumulation derived so the global batch stays ``batch_frames`` whatever the number of ranks."""
    per_rank = data.batch_frames // world
    cap = data.max_frames_per_rank or per_rank
    accumulation = -(-per_rank // cap)
    micro = per_rank // accumulation
    if micro < 100:
        raise ConfigError(f"{SECTION}.data.batch_frames: {data.batch_frames} frames over {world} ranks x "
                          f"{accumulation} accumulation steps leaves {micro} frames (under 1 s) per micro-batch")
    return BatchPlan(data.batch_frames, world, accumulation, micro)


def resolve_ep_size(moe: MoEConfig, world_size: int) -> int:
    """'auto' spreads experts over as many ranks as divide both the world and the expert count."""
    if moe.mode == "dense":
        return 1
    if moe.ep_size == "auto":
        return math.gcd(world_size, moe.num_experts)
    if world_size % moe.ep_size:
        fits = [n for n in range(1, world_size + 1) if world_size % n == 0 and moe.num_experts % n == 0]
        raise ConfigError(f"{SECTION}.moe.ep_size: {moe.ep_size} does not divide the world size {world_size}; with "
                          f"{world_size} rank(s) and {moe.num_experts} experts use one of "
                          f"{', '.join(map(str, fits))}, or \"auto\" ({math.gcd(world_size, moe.num_experts)})")
    return moe.ep_size


@dataclass(frozen=True)
class RunPlan:
    """A validated config on one process layout; frozen, built once per process by ``plan_run``."""
    project: ProjectConfig
    rank: int
    world: int
    ep_size: int  # ranks that share one MoE layer's experts
    ep_rank: int  # this rank's place among them: its local experts are global ep_rank * n_local + j
    batch: BatchPlan
    deepspeed: dict  # what deepspeed.initialize is given
    output_dir: Path
    device: torch.device  # this rank's accelerator (the CPU under gloo)

    @property
    def dtype(self) -> torch.dtype:
        """The engine's parameter dtype (DeepSpeed's bf16 or fp16 section, else fp32)."""
        for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
            if self.deepspeed.get(key, {}).get("enabled"):
                return dtype
        return torch.float32


def plan_run(ds_config: dict, project: ProjectConfig, rank: int, world: int,
             device: torch.device = torch.device("cpu")) -> RunPlan:
    """The plan of this rank; ConfigError when the config does not fit ``world`` ranks."""
    ep_size = resolve_ep_size(project.moe, world)
    batch = batch_plan(project.data, world)
    try:
        ds = deepspeed_config.for_run(ds_config, project.run.max_steps, world, batch.accumulation, ep_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return RunPlan(project, rank, world, ep_size, ep_rank(rank, ep_size), batch, ds, Path(project.run.output_dir),
                   device)
