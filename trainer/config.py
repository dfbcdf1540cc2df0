"""One JSON file configures a run: DeepSpeed's own keys plus the project's ``omni_router`` section.

DeepSpeed validates its keys when the engine starts; the project section is validated here, before any
process group exists, so a typo costs seconds, not a queued cluster job. Errors name the file and the key.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

SECTION = "omni_router"


class ConfigError(ValueError):
    """A configuration problem, worded for the user: file, key, what is wrong."""


class _Strict(BaseModel):
    # strict: "4" is not an int and true is not 1; forbid: a misspelt key is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(_Strict):
    n_mels: int = 80
    frame_stacking: int = 4
    d_model: int = 144
    num_layers: int = 4
    num_heads: int = 4
    ffn_dim: int = 576
    dropout: float = 0.1

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        return self


class MoEConfig(_Strict):
    mode: Literal["dense", "switch", "omni"] = "omni"
    num_experts: int = 4
    moe_every: int = 1
    top_k: Literal[1, 2] = 1
    capacity_factor: float = 1.25  # training only: evaluation and inference never drop
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: Optional[Literal["Jitter", "RSample"]] = None  # RSample: sampled choice, top-1 only
    second_expert_sampling: bool = False  # top-2: draw the second expert with Gumbel noise (GShard)
    lb_coef: float = 0.01
    z_coef: float = 0.001
    ep_size: Union[int, Literal["auto"]] = "auto"

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode != "dense":
            if self.num_experts < 2:
                raise ValueError("num_experts must be at least 2 for switch and omni")
            if self.top_k > self.num_experts:
                raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
            if isinstance(self.ep_size, int) and self.num_experts % self.ep_size:
                raise ValueError(f"num_experts ({self.num_experts}) must be divisible by ep_size ({self.ep_size})")
            if self.noisy_gate_policy == "RSample" and self.top_k == 2:
                raise ValueError("noisy_gate_policy RSample samples the one choice of top-1; for top-2 use "
                                 "second_expert_sampling (the first choice stays the argmax)")
        if self.moe_every < 1:
            raise ValueError("moe_every must be >= 1")
        return self


class HFSource(_Strict):
    """A Hugging Face dataset on local disk: a save_to_disk folder, an audiofolder, or parquet files."""
    path: str
    kind: Literal["saved", "audiofolder", "parquet"] = "saved"
    split: str = "train"
    audio_column: str = "audio"
    text_column: str = "text"


class SpecAugmentConfig(_Strict):
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 2
    time_width: int = 40


class DataConfig(_Strict):
    train_manifests: list[str] = []
    dev_manifests: list[str] = []
    train_hf: list[HFSource] = []
    dev_hf: list[HFSource] = []
    corpus_dir: str = "~/.cache/omni-router/demo-corpus"
    corpus_sentences: int = 3000
    vocab_size: int = 256
    batch_frames: int = 12000  # THE batch: padded 10 ms input frames per optimizer step, all ranks together
    max_frames_per_rank: int = 0  # most padded frames one rank takes at once; above it, accumulation
    max_duration: float = 20.0
    strict_data: bool = False
    num_workers: int = 0
    cache_features: bool = True
    global_cmvn: str = ""
    specaugment: SpecAugmentConfig = SpecAugmentConfig()
    speed_perturb: list[float] = []


class RunConfig(_Strict):
    output_dir: str = "runs/default"
    max_steps: int = 1000
    log_every: int = 25
    eval_every: int = 0  # 0: only at the end; every evaluation also saves a checkpoint
    save_every: int = 0  # 0: only at evaluations and at the end
    keep_last: int = 3  # newest checkpoints kept, besides the best by dev WER
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    seed: int = 1234


class ProjectConfig(_Strict):
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()


DEEPSPEED_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class BatchPlan:
    """How ``data.batch_frames`` is split over ranks and accumulation steps for a world size."""
    batch_frames: int
    world: int
    accumulation: int
    micro_frames: int  # padded frames per micro-batch per rank

    def describe(self) -> str:
        frames = self.micro_frames * self.world * self.accumulation
        audio = f"{frames / 6000:.1f} min" if frames < 360000 else f"{frames / 360000:.1f} h"
        return (f"batch {frames:,} frames ({audio} of padded audio) per step = {self.world} rank(s) x "
                f"{self.accumulation} micro-batch(es) x {self.micro_frames:,} frames")


def batch_plan(data: "DataConfig", world: int) -> BatchPlan:
    """Accumulation derived so the global batch stays ``batch_frames`` whatever the number of ranks."""
    per_rank = data.batch_frames // world
    cap = data.max_frames_per_rank or per_rank
    accumulation = -(-per_rank // cap)
    micro = per_rank // accumulation
    if micro < 100:
        raise ConfigError(f"{SECTION}.data.batch_frames: {data.batch_frames} frames over {world} ranks x "
                          f"{accumulation} accumulation steps leaves {micro} frames (under 1 s) per micro-batch")
    return BatchPlan(data.batch_frames, world, accumulation, micro)


def _format(err: ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([SECTION, *(str(p) for p in e["loc"])])
        lines.append(f"{path}: {key}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str) -> tuple[dict, ProjectConfig]:
    """Read a run config; return (DeepSpeed dict without the project section, validated project section)."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    ds = dict(raw)
    fixed = [k for k in DEEPSPEED_BATCH_KEYS if k in ds]
    if fixed:
        raise ConfigError(f"{path}: {', '.join(fixed)}: remove; the batch is one setting, {SECTION}.data.batch_frames "
                          "(padded frames per optimizer step over all ranks), and the trainer derives DeepSpeed's "
                          "batch keys and gradient accumulation from it for each world size")
    try:
        project = ProjectConfig.model_validate(ds.pop(SECTION, {}))
    except ValidationError as e:
        raise ConfigError(_format(e, path)) from None
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        raise ConfigError(f"{path}: zero_optimization.stage: 0 (or absent) is refused: only DeepSpeed's ZeRO "
                          "optimizer (stage 1 or 2) detects a non-finite gradient and skips that step on every rank")
    if stage == 3 and project.moe.mode != "dense":
        raise ConfigError(f"{path}: zero_optimization.stage: 3 is refused with MoE (mode '{project.moe.mode}'): "
                          "DeepSpeed's native MoE layers work with ZeRO stage 0, 1 or 2 only")
    return ds, project


def resolve_ep_size(moe: MoEConfig, world_size: int) -> int:
    """'auto' spreads experts over as many ranks as divide both the world and the expert count."""
    if moe.mode == "dense":
        return 1
    if moe.ep_size == "auto":
        return math.gcd(world_size, moe.num_experts)
    if world_size % moe.ep_size:
        raise ConfigError(f"{SECTION}.moe.ep_size: {moe.ep_size} does not divide the world size {world_size}")
    return moe.ep_size


def with_overrides(project: ProjectConfig, **sections) -> ProjectConfig:
    """A copy with some fields replaced, re-validated: ``with_overrides(cfg, run={'max_steps': 5})``."""
    merged = project.model_dump()
    for name, fields in sections.items():
        merged[name].update(fields)
    return ProjectConfig.model_validate(merged)
