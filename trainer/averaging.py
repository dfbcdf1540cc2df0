"""The average of several checkpoints of one run, as a consolidated model: the N newest, or the N best by dev WER.

Averaging the weights of the last few checkpoints is how icefall, ESPnet and NeMo publish their models. Here the
weights averaged are the fp32 master copies that the ZeRO optimizer keeps (a bf16 run's module weights are
rounded to bf16), read from every rank's optimizer file; a checkpoint without them (re-sharded by
``to_deepspeed``: weights only) gives its saved weights. Experts are matched by global id whatever ep_size wrote
them, the shared Omni router is averaged once, buffers are taken from the newest checkpoint.

ZeRO 1/2 layout (DeepSpeed 0.19.8): ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` holds rank R's slice of
each parameter group, flattened in the order of ``param_shapes`` (in ``mp_rank_00_model_states.pt``), with any
padding at the end: a dense group is split over all ranks in rank order; an expert group over the ranks of one
expert-parallel index e (R % ep_size == e) in the order R // ep_size, and holds the experts of e, stacked.
"""
import math
import sys
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.checkpoint import MODEL_DEFINING, config_changes, step_of
from trainer.config import ProjectConfig
from trainer.export import CheckpointError, build, read_deepspeed, write_consolidated
from trainer.model.experts import PER_EXPERT_KEYS
from trainer.runtime import integrity
from trainer.runtime.deepspeed_contract import SAFE_GLOBALS, ZERO_FILE

EXPERTS = ".deepspeed_moe.experts."  # in a parameter group's names: the group holds experts (stacked)


def checkpoints_dir(src: str) -> Path:
    """The ``checkpoints`` folder of a run folder (or the folder itself)."""
    p = Path(src)
    for d in (p / "checkpoints", p):
        if checkpoint.tags(d):
            return d
    raise CheckpointError(f"{p}: no checkpoints to average (give a run folder or its checkpoints folder)")


def usable(ckpt_dir: Path, candidates: list[str], n: int, what: str, hint: str) -> list[Path]:
    """The first ``n`` of ``candidates`` that pass the checkpoint's record (size and SHA-256 of every file);
    damaged ones are named on stderr and passed over. Fewer than ``n`` is an error naming what was found."""
    chosen = []
    for tag in candidates:
        why = checkpoint.problem(ckpt_dir, tag)
        if why:
            print(f"WARNING: skipping a damaged checkpoint: {why}", file=sys.stderr)
        else:
            chosen.append(ckpt_dir / tag)
        if len(chosen) == n:
            return chosen
    raise CheckpointError(f"{ckpt_dir}: {n} {what} checkpoints asked, {len(chosen)} usable "
                          f"({', '.join(p.name for p in chosen) or 'none'}); {hint}")


def newest(src: str, n: int) -> list[Path]:
    """The ``n`` newest usable checkpoints of a run, newest first."""
    ckpt_dir = checkpoints_dir(src)
    return usable(ckpt_dir, list(reversed(checkpoint.tags(ckpt_dir))), n, "newest",
                  "keep more with run.keep_last")


def best(src: str, n: int) -> list[Path]:
    """The ``n`` usable checkpoints of a run with the lowest mean dev WER in their records (the newer of two
    equal), best first. Only checkpoints saved at an evaluation have one."""
    ckpt_dir = checkpoints_dir(src)
    return usable(ckpt_dir, checkpoint.best_scored(ckpt_dir), n, "best-scored",
                  "evaluate more often (run.eval_every: each evaluation saves a scored checkpoint) and keep them "
                  "(run.keep_best)")


def master_weights(tag_dir: Path, saved: dict) -> dict:
    """{one-rank parameter name: fp32 master} from the ZeRO optimizer files of every rank; {} when the checkpoint
    has none (weights only). The masters of a shared parameter appear under its first name only."""
    world, ep = saved.get("world_size"), saved.get("ep_size", 1)
    files = {int(m[1]): f for f in tag_dir.iterdir() if (m := ZERO_FILE.fullmatch(f.name))}
    if not files or world is None:
        return {}
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"{tag_dir}: optimizer files of ranks {sorted(files)}, expected 0..{world - 1}")
    slices = [integrity.load(files[r], SAFE_GLOBALS)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
              for r in range(world)]
    masters = {}
    for g, shapes in enumerate(saved["param_shapes"]):
        expert = any(EXPERTS in name for name in shapes)
        for e in range(ep) if expert else [None]:
            ranks = range(world) if e is None else range(e, world, ep)
            flat = torch.cat([slices[r][g].float().view(-1) for r in ranks])
            masters.update(_unflatten(flat, shapes, e, tag_dir))
    return masters


def _unflatten(flat: torch.Tensor, shapes: dict, ep_rank, tag_dir: Path) -> dict:
    """One group's parameters from its flat fp32 copy; the stacked experts of ``ep_rank`` by global id."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if offset + numel > flat.numel():
            raise CheckpointError(f"{tag_dir}: the optimizer's fp32 copy is shorter than the parameters it holds")
        t = flat[offset:offset + numel].view(tuple(shape)).clone()
        offset += numel
        if ep_rank is None:
            out[name] = t
            continue
        prefix, _, stacked = name.rpartition(".")  # GroupedExperts: [n_local, ...] under w1, b1, w2, b2
        for j in range(t.shape[0]):
            out[f"{prefix}.deepspeed_experts.{ep_rank * t.shape[0] + j}.{PER_EXPERT_KEYS[stacked]}"] = t[j]
    return out


def read_weights(tag_dir: Path) -> tuple[dict, dict]:
    """(fp32 weights by one-rank name, the masters where saved; DeepSpeed's saved dict). A master that does not
    round to its saved weight is an error: the layout was misread."""
    state, saved, dtypes = read_deepspeed(tag_dir)
    masters = master_weights(tag_dir, saved)
    for name, master in masters.items():
        if name not in state or state[name].shape != master.shape:
            raise CheckpointError(f"{tag_dir}: the optimizer holds {name} {tuple(master.shape)}, the weights do not")
        if not torch.equal(master.to(dtypes[name]).float(), state[name]):
            raise CheckpointError(f"{tag_dir}: the optimizer's fp32 master of {name} does not round to its saved "
                                  "weight (an optimizer layout this tool does not know)")
        state[name] = master
    for alias, first in saved.get("shared_params", {}).items():
        if first in masters:
            state[alias] = masters[first]
    return state, saved


def average(tag_dirs: list[Path]) -> tuple[dict, dict]:
    """(the mean of the checkpoints' weights, the newest checkpoint's saved dict); buffers from the newest. The
    checkpoints must hold one model: the same model-defining config keys and the same weights and shapes."""
    newest_dir = max(tag_dirs, key=lambda p: step_of(p.name))
    states = []
    for tag_dir in tag_dirs:
        state, saved = read_weights(tag_dir)
        states.append((tag_dir, state, saved))
    _, ref, ref_saved = states[0]
    for tag_dir, state, saved in states[1:]:
        changed = [c for c in config_changes(ref_saved["project_config"], saved["project_config"])
                   if c.split(":")[0] in MODEL_DEFINING]
        shapes = {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in ref.items()}
        if changed or shapes:
            raise CheckpointError(f"{tag_dir} and {states[0][0]} hold different models: "
                                  + ("; ".join(changed) if changed else "their weights' names or shapes differ"))
    project = ProjectConfig.model_validate(ref_saved["project_config"])
    model = build(project, ref["head.weight"].shape[0] - 1, ref, str(states[0][0]))
    buffers = {name for name, _ in model.named_buffers()}
    _, newest_state, newest_saved = next(s for s in states if s[0] == newest_dir)
    mean = {}
    for name in ref:
        if name in buffers:
            mean[name] = newest_state[name]
        else:  # summed in float64: the mean of N copies of one tensor is that tensor
            mean[name] = (sum(s[name].double() for _, s, _ in states) / len(states)).float()
    return mean, newest_saved


def consolidate_average(src: str, out_dir: str, n: int, by: str) -> Path:
    """A consolidated folder of the average of the ``n`` newest (``by="newest"``) or best-scored (``"best"``)
    checkpoints of the run ``src``; returns it. Its config.json names them."""
    tag_dirs = (newest if by == "newest" else best)(src, n)
    state, saved = average(tag_dirs)
    return write_consolidated(state, saved, max(tag_dirs, key=lambda p: step_of(p.name)), out_dir,
                              averaged={"by": by, "checkpoints": [p.name for p in tag_dirs]})
