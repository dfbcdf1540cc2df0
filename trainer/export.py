"""DeepSpeed MoE checkpoints to one self-contained model folder, and back at any expert-parallel size.

DeepSpeed stores an MoE checkpoint as ``mp_rank_00_model_states.pt`` (every non-expert weight under
``module``, the trainer's client state beside it) plus one file per MoE layer and *global* expert id
(``layer_L_expert_E_mp_rank_00_model_states.pt``) whatever the ep_size; only the ZeRO optimizer shards depend
on the layout. ``zero_to_fp32`` reads the shards and not the expert files, so it cannot rebuild an MoE model.
A consolidated folder holds ``model.safetensors`` (fp32; the shared Omni router once), ``config.json`` and the
tokenizer (and global CMVN statistics when the run used them).
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer import checkpoint
from trainer.config import ProjectConfig
from trainer.model.ctc import CTCModel, moe_blocks
from trainer.runtime import integrity
from trainer.runtime.deepspeed_contract import EXPERT_FILE, EXPERT_PARAM, MODEL_STATES, SAFE_GLOBALS, expert_file
from trainer.runtime.exits import ToFix

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "omni-router-consolidated/1"


class CheckpointError(ToFix, ValueError):
    """A path that is not the kind of checkpoint a tool expects, or one that is damaged; worded for the user."""


def find_checkpoint(path: str) -> Path:
    """The checkpoint folder meant by ``path``: a ``stepN`` folder, a ``checkpoints`` folder or a run's output
    folder (then its newest verified checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if (p / CONFIG).exists() and (p / WEIGHTS).exists():
        raise CheckpointError(f"{p}: a consolidated model, not a DeepSpeed checkpoint")
    if (p / MODEL_STATES).exists():
        why = checkpoint.problem(p.parent, p.name) if (p / checkpoint.RECORD).exists() else ""
        if why:
            raise CheckpointError(why)
        return p
    for ckpt_dir in (p, p / "checkpoints"):
        if checkpoint.tags(ckpt_dir):
            tag, warnings = checkpoint.newest_usable(ckpt_dir)
            if not tag:
                raise CheckpointError(f"{ckpt_dir}: no usable checkpoint:\n  " + "\n  ".join(warnings))
            return ckpt_dir / tag
    raise CheckpointError(f"{p}: not a DeepSpeed checkpoint (no {MODEL_STATES}, no stepN folders)")


def read_deepspeed(tag_dir: Path) -> tuple[dict, dict, dict]:
    """(every weight by its one-rank name in fp32, DeepSpeed's saved dict with the trainer's client state, the
    dtype each weight was saved in)."""
    saved = integrity.load(tag_dir / MODEL_STATES, SAFE_GLOBALS)
    if not isinstance(saved, dict) or "project_config" not in saved:
        raise CheckpointError(f"{tag_dir / MODEL_STATES}: not written by this trainer (no project_config)")
    dtypes = {k: v.dtype for k, v in saved["module"].items()}
    state = {k: v.float() for k, v in saved["module"].items()}
    project = ProjectConfig.model_validate(saved["project_config"])
    found = {}
    for f in tag_dir.iterdir():
        m = EXPERT_FILE.fullmatch(f.name)
        if m:
            found[(int(m[1]), int(m[2]))] = f
    n_layers = len(moe_blocks(project.model, project.moe))
    wanted = {(layer, e) for layer in range(n_layers) for e in range(project.moe.num_experts)}
    if set(found) != wanted:
        missing = sorted(wanted - set(found))
        raise CheckpointError(f"{tag_dir}: expert files do not match the config ({n_layers} MoE layers x "
                              f"{project.moe.num_experts} experts); missing (layer, expert): {missing[:8]}")
    for key in sorted(found):
        expert = integrity.load(found[key], [])
        dtypes.update({k: v.dtype for k, v in expert.items()})
        state.update({k: v.float() for k, v in expert.items()})
    return state, saved, dtypes


def aliases(model: torch.nn.Module) -> dict:
    """{second name: first name} of every parameter reachable under two names (the Omni router)."""
    first, out = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def build(project: ProjectConfig, vocab_size: int, state: dict, origin: str) -> CTCModel:
    """A one-rank model holding ``state`` (aliases of a shared router filled from their first name)."""
    model = CTCModel(project.model, project.moe, vocab_size, ep_size=1)
    full = dict(state)
    for alias, name in aliases(model).items():
        full.setdefault(alias, state[name])
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{origin}: weights do not fit the model its config describes: {e}") from None
    return model.eval()


def consolidate(src: str, out_dir: str) -> Path:
    """DeepSpeed checkpoint (any ep_size, ZeRO 1 or 2, fp32 or bf16) -> consolidated folder holding the weights
    the run evaluated; returns it."""
    tag_dir = find_checkpoint(src)
    state, saved, _ = read_deepspeed(tag_dir)
    return write_consolidated(state, saved, tag_dir, out_dir)


def write_consolidated(state: dict, saved: dict, tag_dir: Path, out_dir: str, **meta) -> Path:
    """A consolidated folder of ``state`` (one-rank names, fp32) with the config, tokenizer and statistics of the
    checkpoint ``tag_dir`` (``saved``: its dense states); ``meta`` goes into config.json beside them."""
    project = ProjectConfig.model_validate(saved["project_config"])
    vocab = saved["module"]["head.weight"].shape[0] - 1
    model = build(project, vocab, state, str(tag_dir))
    skip = aliases(model)
    for alias, name in skip.items():  # one router for omni: every layer saved the same tensor
        if not torch.equal(state[alias], state[name]):
            raise CheckpointError(f"{tag_dir}: shared router copies differ ({alias} vs {name})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in skip}, str(out / WEIGHTS),
              metadata={"format": "pt"})
    files = run_files(tag_dir)
    for name, path in files.items():
        shutil.copyfile(path, out / name)
    meta = {"format": FORMAT, "project_config": saved["project_config"], "vocab_size": vocab,
            "step": saved.get("global_steps"), "source": str(tag_dir.resolve()), "cmvn": checkpoint.CMVN in files,
            **meta}
    (out / CONFIG).write_text(json.dumps(meta, indent=1))
    return out


def run_files(tag_dir: Path) -> dict:
    """The tokenizer (and CMVN statistics) of a checkpoint: saved in it, else in its run's output folder."""
    found = {}
    for name in (checkpoint.TOKENIZER, checkpoint.CMVN):
        for where in (tag_dir, tag_dir.parent.parent):
            if (where / name).exists():
                found[name] = where / name
                break
    if checkpoint.TOKENIZER not in found:
        raise CheckpointError(f"{tag_dir}: no {checkpoint.TOKENIZER} in it or in {tag_dir.parent.parent}")
    return found


def load_consolidated(path: str) -> tuple[CTCModel, dict]:
    """(model on the CPU in eval mode, config.json) of a consolidated folder."""
    p = Path(path)
    if not (p / CONFIG).exists():
        hint = " (a DeepSpeed checkpoint: run tools/consolidate_checkpoint.py first)" \
            if (p / MODEL_STATES).exists() or (p / "checkpoints").is_dir() or (p / "latest").exists() else ""
        raise CheckpointError(f"{p}: not a consolidated model, no {CONFIG}{hint}")
    meta = json.loads((p / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    project = ProjectConfig.model_validate(meta["project_config"])
    return build(project, meta["vocab_size"], load_file(str(p / WEIGHTS)), str(p)), meta


def to_deepspeed(src: str, ep_size: int, out_dir: str) -> Path:
    """A DeepSpeed checkpoint for ``ep_size`` that the trainer resumes from (``--output_dir out_dir``) with a
    fresh optimizer: the weights of ``src``, experts by global id, the config's ep_size set to ``ep_size``."""
    tag_dir = find_checkpoint(src)
    state, saved, _ = read_deepspeed(tag_dir)
    project = saved["project_config"]
    if project["moe"]["mode"] != "dense" and project["moe"]["num_experts"] % ep_size:
        raise CheckpointError(f"--ep_size {ep_size} does not divide num_experts ({project['moe']['num_experts']})")
    project = {**project, "moe": {**project["moe"], "ep_size": ep_size}}
    out = Path(out_dir)
    ckpt_dir, tag = out / "checkpoints", tag_dir.name
    if checkpoint.tags(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: already holds checkpoints; choose another folder")
    (ckpt_dir / tag).mkdir(parents=True)
    experts = {}
    for name, t in state.items():
        m = EXPERT_PARAM.search(name)
        if m:
            experts.setdefault(name.split(".ffn.")[0], {}).setdefault(int(m[1]), {})[name] = t
    module = {k: v for k, v in state.items() if not EXPERT_PARAM.search(k)}
    digests = {}
    for layer, block in enumerate(sorted(experts, key=lambda b: int(b.split(".")[1]))):
        for e, sd in experts[block].items():
            digests[expert_file(layer, e)] = integrity.save(sd, ckpt_dir / tag / expert_file(layer, e))
    keep = {k: v for k, v in saved.items() if k not in ("optimizer", "lr_scheduler", "module")}
    record = replace(checkpoint.Record.from_saved(saved), project_config=project, ep_size=ep_size, world_size=None,
                     optimizer_state=False)
    digests[MODEL_STATES] = integrity.save(
        {**keep, **record.client_state(), "module": module, "optimizer": None, "lr_scheduler": None},
        ckpt_dir / tag / MODEL_STATES)
    for name, path in run_files(tag_dir).items():
        shutil.copyfile(path, ckpt_dir / tag / name)
        shutil.copyfile(path, out / name)
    checkpoint.publish(ckpt_dir, tag, digests)
    return ckpt_dir / tag
