"""Checkpoints that survive crashes: atomic publication, verification at start-up, retention.

DeepSpeed writes ``latest`` from rank 0 without waiting for the other ranks' files. Here a checkpoint becomes
visible only after every rank has written everything: the save runs with ``save_latest=False``, all ranks
meet at a barrier, rank 0 records every file and its size in ``TAG/complete.json``, and only then replaces
``latest`` atomically. At start-up the newest checkpoint whose record matches the disk is used; a damaged
or partial one is reported by name and skipped.
"""
import json
import os
import random
import shutil
from pathlib import Path

import deepspeed
import torch

from trainer import distributed

RECORD = "complete.json"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of non-expert weights and the client state
TOKENIZER, CMVN = "tokenizer.model", "cmvn.json"  # beside the checkpoints in a run's folder, and copied into each


def _rank0() -> bool:
    return distributed.rank() == 0


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step(tag: str) -> int:
    return int(tag[len("step"):]) if tag.startswith("step") and tag[4:].isdigit() else -1


def tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders (``stepN``), oldest first, whether complete or not."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and _step(p.name) >= 0), key=_step)


def problem(ckpt_dir: Path, tag: str) -> str:
    """Why this checkpoint cannot be used, or '' if every recorded file is there with its size."""
    record = ckpt_dir / tag / RECORD
    if not record.exists():
        return f"{ckpt_dir / tag}: incomplete (no {RECORD}; the save did not finish)"
    try:
        files = json.loads(record.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{record}: unreadable ({e})"
    for name, size in files.items():
        path = ckpt_dir / tag / name
        if not path.exists():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {size} recorded"
    return ""


def newest_usable(ckpt_dir: Path) -> tuple[str, list[str]]:
    """The newest verified tag ('' if none) and the warnings about newer ones that were skipped."""
    warnings = []
    for tag in reversed(tags(ckpt_dir)):
        why = problem(ckpt_dir, tag)
        if not why:
            return tag, warnings
        warnings.append(why)
    return "", warnings


def layout(ckpt_dir: Path, tag: str) -> dict:
    """How a checkpoint was written: world_size, ep_size and whether it holds optimizer state. The file is
    memory-mapped, so its weights are not read."""
    saved = torch.load(ckpt_dir / tag / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
    return {"world_size": saved.get("world_size"), "ep_size": saved.get("ep_size"),
            "optimizer_state": saved.get("optimizer_state", True)}


def _rng_file(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt"


def publish(ckpt_dir: Path, tag: str):
    """Record every file of a written checkpoint with its size, then point ``latest`` at it (atomically)."""
    files = {str(p.relative_to(ckpt_dir / tag)): p.stat().st_size
             for p in sorted((ckpt_dir / tag).rglob("*")) if p.is_file()}
    _atomic_write(ckpt_dir / tag / RECORD, json.dumps({"files": files}))
    _atomic_write(ckpt_dir / "latest", tag)


def save(engine, ckpt_dir: Path, client_state: dict, keep_last: int, keep: set, extra_files: list) -> str:
    """Write a checkpoint on every rank with copies of ``extra_files`` (tokenizer, statistics), then publish
    it; keep the newest ``keep_last`` and those in ``keep``."""
    tag = f"step{engine.global_steps}"
    if _rank0() and (ckpt_dir / tag).exists():  # a leftover of a crashed save with this step
        shutil.rmtree(ckpt_dir / tag)
    distributed.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "tag": tag}, save_latest=False)
    torch.save(_rng_states(), _rng_file(ckpt_dir, tag))
    distributed.barrier()  # every rank's files are on disk
    if _rank0():
        for f in extra_files:
            shutil.copyfile(f, ckpt_dir / tag / Path(f).name)
        publish(ckpt_dir, tag)
        saved = tags(ckpt_dir)
        for old in saved[:-keep_last] if keep_last > 0 else []:
            if old not in keep and old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()
    return tag


def _rng_states() -> dict:
    """This rank's random streams: CPU, accelerator (dropout on a GPU draws from it) and Python's."""
    return {"torch": torch.get_rng_state(), "accelerator": deepspeed.get_accelerator().get_rng_state(),
            "python": random.getstate()}


def _restore_rng(state: dict):
    torch.set_rng_state(state["torch"])
    deepspeed.get_accelerator().set_rng_state(state["accelerator"])
    random.setstate(state["python"])


def load(engine, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> tuple[str, dict]:
    """Load a verified checkpoint (the caller picks it with ``newest_usable`` on rank 0 and broadcasts it).
    Without the optimizer, the learning-rate schedule is set to the checkpoint's step rather than restarted."""
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                       load_lr_scheduler_states=load_optimizer)
    if not load_optimizer and engine.lr_scheduler is not None and engine.global_steps > 0:
        engine.lr_scheduler.step(engine.global_steps - 1)  # its position after that many steps
    rng = _rng_file(ckpt_dir, tag)
    if rng.exists():  # absent when the world size changed: then the random streams start afresh
        _restore_rng(torch.load(rng, weights_only=True))
    return tag, client
