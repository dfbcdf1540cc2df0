"""One JSON file configures a run: DeepSpeed's own keys plus the project's ``omni_router`` section.

DeepSpeed validates its keys when the engine starts; the project section is validated here, before any
process group exists, so a typo costs seconds, not a queued cluster job. Errors name the file and the key.
"""
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.runtime import deepspeed_config
from trainer.runtime.exits import ToFix

SECTION = "omni_router"
SPEED_RANGE = (0.5, 2.0)  # data.speed_perturb: an octave either way


class ConfigError(ToFix, ValueError):
    """A configuration problem, worded for the user: file, key, what is wrong."""
    label = "config error:\n"


class _Strict(BaseModel):
    # strict: "4" is not an int and true is not 1; forbid: a misspelt key is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(_Strict):
    n_mels: int = Field(80, description="log-mel bins (25 ms window, 10 ms hop)")
    frame_stacking: int = Field(4, description="input frames stacked into one encoder frame (4: 40 ms)")
    d_model: int = Field(144, description="encoder width")
    num_layers: int = Field(4, description="Transformer blocks")
    num_heads: int = Field(4, description="attention heads; must divide d_model")
    ffn_dim: int = Field(576, description="hidden width of the dense FFN and of every expert (Linear-ReLU-Linear)")
    dropout: float = Field(0.1, description="dropout after the frontend, attention and FFN")
    positions: Literal["sinusoidal", "cape"] = Field(
        "sinusoidal", description="absolute sinusoids, or CAPE (sinusoids of augmented positions in training)")
    cape_global_shift: float = Field(5.0, description="CAPE: largest shift of all positions of an utterance (frames)")
    cape_local_shift: float = Field(0.5, description="CAPE: width of the per-frame position jitter (frames)")
    cape_global_scaling: float = Field(1.0, description="CAPE: largest scaling of an utterance's positions (1: none)")
    causal: bool = Field(False, description="causal self-attention (streaming): a frame attends to no later frame")

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        return self


class MoEConfig(_Strict):
    mode: Literal["dense", "switch", "omni"] = Field(
        "omni", description="dense FFNs; switch: a router per MoE layer; omni: one router shared by all")
    num_experts: int = Field(4, description="experts per MoE layer")
    moe_every: int = Field(1, description="MoE in every n-th block (1: every block)")
    top_k: Literal[1, 2] = Field(1, description="experts per frame")
    capacity_factor: float = Field(
        1.25, description="training capacity: ceil(top_k * factor * frames / E) routes per expert; evaluation "
                          "and inference never drop")
    min_capacity: int = Field(4, description="least capacity per expert in training")
    drop_tokens: bool = Field(True, description="false: training capacity is the busiest expert's count (no drop)")
    dropless: bool = Field(False, description="no capacity buffer: every route computed, split-size all-to-all")
    noisy_gate_policy: Optional[Literal["Jitter", "RSample"]] = Field(
        None, description="Jitter: router input times U(0.99, 1.01); RSample (top-1): Gumbel-sampled choice")
    second_expert_sampling: bool = Field(False, description="top-2: sample the second expert with Gumbel noise")
    lb_coef: float = Field(0.01, description="load-balancing loss weight per MoE layer, next to a per-frame CTC")
    z_coef: float = Field(0.001, description="router z-loss weight per MoE layer")
    ep_size: Union[int, Literal["auto"]] = Field(
        "auto", description="expert-parallel size; auto: gcd(world size, num_experts)")

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
    path: str = Field(description="dataset folder (or parquet file)")
    kind: Literal["saved", "audiofolder", "parquet"] = Field("saved", description="how it is stored")
    split: str = Field("train", description="split of a saved DatasetDict")
    audio_column: str = Field("audio", description="column of audio (bytes or path)")
    text_column: str = Field("text", description="column of transcripts")


class SpecAugmentConfig(_Strict):
    freq_masks: int = Field(2, description="frequency masks per utterance")
    freq_width: int = Field(27, description="widest frequency mask (bins)")
    time_masks: int = Field(2, description="time masks per utterance")
    time_width: int = Field(40, description="widest time mask (frames; at most a fifth of the utterance)")


class AugmentConfig(_Strict):
    noise_prob: float = Field(0.0, ge=0, le=1, description="share of training utterances given additive noise: "
                              "white, pink, brown or babble (three other training utterances; not for shards)")
    noise_snr_db: list[float] = Field([5.0, 20.0], description="the noise's SNR range in dB, drawn uniformly")
    reverb_prob: float = Field(0.0, ge=0, le=1, description="share of training utterances put in a synthetic room")
    reverb_rt60: list[float] = Field([0.2, 0.8], description="the room's RT60 range in seconds, drawn uniformly")
    telephone_prob: float = Field(0.0, ge=0, le=1, description="share of training utterances sent through a "
                                  "telephone channel (8 kHz, 300-3400 Hz, 8-bit mu-law)")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("noise_snr_db", "reverb_rt60"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ValueError(f"{name} must be [low, high] with low <= high, not {lo_hi}")
        if self.reverb_rt60[0] <= 0:
            raise ValueError("reverb_rt60 must be above 0 seconds")
        return self


class CorpusConfig(_Strict):
    dir: str = Field("~/.cache/omni-router/demo-corpus", description="where the embedded corpus is built")
    sentences: int = Field(3000, description="training sentences of the embedded corpus (at most)")
    seed: int = Field(1234, description="the embedded corpus's draw of voices, speeds and pitches (not "
                                        "run.seed: runs of every seed share one corpus)")
    words: int = Field(
        0, description="the embedded corpus speaks only texts made of WordNet's N most frequent example words (0: all)")
    text: Literal["sentences", "phrases"] = Field(
        "sentences", description="whole WordNet usage examples, or the runs of data.corpus.words words within them "
                                 "(many more texts of one word list; needs data.corpus.words)")

    @model_validator(mode="after")
    def _phrases_need_words(self):
        """Refuse phrases without a word list here, not minutes into a run when the corpus is built."""
        if self.text == "phrases" and self.words <= 0:
            raise ValueError("data.corpus.text 'phrases' needs a word list: set data.corpus.words (e.g. 1000)")
        return self


class DataConfig(_Strict):
    train_manifests: list[str] = Field([], description="NeMo JSON-lines manifests; none: the embedded corpus")
    dev_manifests: list[str] = Field([], description="dev manifests, each its own dev set")
    train_hf: list[HFSource] = Field([], description="Hugging Face datasets on disk for training")
    dev_hf: list[HFSource] = Field([], description="Hugging Face datasets on disk, each its own dev set")
    train_cuts: list[str] = Field([], description="Lhotse cut sets (.jsonl.gz), e.g. libriheavy_cuts_small.jsonl.gz")
    dev_cuts: list[str] = Field([], description="Lhotse cut sets, each its own dev set")
    train_shards: list[str] = Field([], description="Lhotse Shar folders (tools/make_shards.py): sequential reads")
    dev_shards: list[str] = Field([], description="Lhotse Shar folders, each its own dev set")
    cuts_root: str = Field("", description="folder relative audio paths of cut sets start from (empty: the "
                                           "current folder, as Lhotse does)")
    duration_cache: str = Field("~/.cache/omni-router/durations",
                                description="where durations of Hugging Face datasets are cached (empty: none)")
    corpus: CorpusConfig = Field(CorpusConfig(), description="the embedded corpus, used when no training source "
                                                             "is given (trainer.data.corpus)")
    vocab_size: int = Field(256, description="sentencepiece pieces (the CTC blank comes on top)")
    tokenizer_sentences: int = Field(
        200000, description="most training texts the tokenizer is trained on (a seeded sample; shards: whole "
                            "shards in a seeded order), so start-up does not grow with the corpus")
    batch_frames: int = Field(
        12000, description="THE batch: padded 10 ms input frames per optimizer step, all ranks together")
    max_frames_per_rank: int = Field(
        0, description="most padded frames one rank takes at once (0: no limit); above it, accumulation")
    max_duration: float = Field(20.0, description="longest utterance kept (seconds)")
    strict_data: bool = Field(False, description="refuse to start on any unusable row instead of skipping it")
    num_workers: int = Field(0, description="DataLoader workers per rank")
    features_on: Literal["loader", "device"] = Field(
        "loader", description="where log-mel, normalisation and SpecAugment run: per utterance in the loader's CPU "
                              "processes, or per batch on the rank's device (the loader then only decodes, speed-"
                              "perturbs and draws the masks)")
    cache_features: bool = Field(True, description="keep features in memory (small corpora; those of utterances "
                                                   "an epoch leaves unchanged by speed or augmentation; with "
                                                   "features_on loader only: device mode caches nothing)")
    global_cmvn: str = Field("", description="statistics file of tools/compute_cmvn.py; empty: per utterance")
    specaugment: SpecAugmentConfig = Field(SpecAugmentConfig(), description="masks on training features")
    speed_perturb: list[float] = Field([], description="speed factors drawn per utterance, e.g. [0.9, 1.0, 1.1]")
    augment: AugmentConfig = Field(AugmentConfig(), description="waveform augmentation of training utterances, in "
                                                                "the loader after speed perturbation")

    @field_validator("speed_perturb")
    @classmethod
    def _sane_speeds(cls, factors: list[float]) -> list[float]:
        wrong = [f for f in factors if not SPEED_RANGE[0] <= f <= SPEED_RANGE[1]]
        if wrong:  # 0 would make an empty utterance, 10 a tenth of one: a typo, not a recipe
            raise ValueError(f"speed factors must lie in [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}], not {wrong}")
        return factors


class RunConfig(_Strict):
    output_dir: str = Field("runs/default", description="checkpoints, metrics, tokenizer")
    max_steps: int = Field(1000, description="optimizer steps; also the length of the learning-rate schedule")
    log_every: int = Field(25, description="steps between training log rows")
    eval_every: int = Field(0, description="steps between evaluations, each with a checkpoint (0: at the end)")
    save_every: int = Field(0, description="steps between checkpoints besides evaluations (0: none)")
    keep_last: int = Field(3, ge=0, description="newest checkpoints kept, besides the best by dev WER (0: all)")
    keep_best: int = Field(1, ge=1, description="checkpoints kept with the lowest mean dev WER, besides the newest "
                                                "(what consolidate_checkpoint.py --average_best averages)")
    max_bad_steps: int = Field(5, description="non-finite losses or gradients in a row before the run stops")
    seed: int = Field(1234, description="weights, data order, augmentation")
    collective_timeout_s: float = Field(
        300.0, description="a collective not completed within this many seconds is an error on every rank")
    checkpoint_timeout_s: float = Field(
        1800.0, description="the collective timeout while a checkpoint is written or read (slow file systems) and "
                            "while rank 0 builds the corpus or the tokenizer")
    stop_grace_s: float = Field(
        60.0, description="after a stop request, seconds without progress before a stuck rank exits unsaved")
    allow_cpu: bool = Field(
        False, description="train on the CPU even where GPUs were allocated but torch sees none (else: exit 2)")


class ProjectConfig(_Strict):
    model: ModelConfig = ModelConfig()
    moe: MoEConfig = MoEConfig()
    data: DataConfig = DataConfig()
    run: RunConfig = RunConfig()


MOVED = {f"data.corpus_{k}": f"data.corpus.{k}" for k in ("dir", "sentences", "seed", "words", "text")}


def _format(err: ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        moved = f" (moved: use {MOVED[loc]})" if loc in MOVED else ""
        lines.append(f"{path}: {SECTION}.{loc}: {e['msg']}{moved}")
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
    try:
        deepspeed_config.check_top_level(raw, SECTION)
        project = ProjectConfig.model_validate(ds.pop(SECTION, {}))
        deepspeed_config.check_zero_stage(ds, project.moe.mode)
    except ValidationError as e:
        raise ConfigError(_format(e, path)) from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return ds, project


def parse_assignment(text: str) -> tuple[str, object]:
    """``section.key=value`` (``--set``) -> (dotted key, value); the value is read as JSON, else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, for example run.max_steps=5")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def with_overrides(project: ProjectConfig, values: Union[Mapping[str, object], Iterable[tuple[str, object]]],
                   origin: str = "--set") -> ProjectConfig:
    """A copy with the values at dotted keys replaced, in order (``{"run.max_steps": 5}``; a key may name a
    whole section), re-validated. Errors are ConfigErrors naming ``origin`` and the key."""
    merged = project.model_dump()
    for key, value in values.items() if isinstance(values, Mapping) else values:
        path, node = key.split("."), merged
        for i, k in enumerate(path[:-1]):
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"{origin} {key}: {SECTION}.{'.'.join(path[:i + 1])} is not a section")
            node = node[k]
        node[path[-1]] = value
    try:
        return ProjectConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format(e, origin)) from None


def reference_table() -> str:
    """The README's table of project keys, from the field descriptions here (a test keeps them equal)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type, prefix: str):
        for name, f in model.model_fields.items():
            kind = f.annotation
            if isinstance(kind, type) and issubclass(kind, _Strict) and kind is not HFSource:
                walk(kind, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else json.dumps(
                f.default.model_dump() if isinstance(f.default, BaseModel) else f.default)
            rows.append(f"| `{prefix}{name}` | `{default}` | {f.description} |")

    walk(ProjectConfig, "")
    return "\n".join(rows)
