"""Checkpoints that survive crashes, and the run's checkpoint policy: what is saved, when, what is kept, how
a run resumes.

DeepSpeed writes ``latest`` from rank 0 without waiting for the other ranks' files. Here a checkpoint becomes
visible only after every rank has written everything: the save runs with ``save_latest=False``, all ranks
meet at a barrier, rank 0 records every file with its size and SHA-256 (computed by the rank that wrote it,
while writing) in ``TAG/complete.json``, and only then replaces ``latest`` atomically. At start-up the newest
checkpoint whose record matches the disk, byte for byte, is used; a damaged or partial one is reported by
name and skipped. The ranks share that check, each hashing the files it is about to load (``share``), under
the checkpoint timeout. Nothing is loaded in a way that could run code (``integrity``).
"""
import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import deepspeed
import torch

from trainer.data.text import tokenizer_problem
from trainer.plan import RunPlan
from trainer.runtime import distributed, integrity
from trainer.runtime.deepspeed_contract import MODEL_STATES, SAFE_GLOBALS, loading_ranks, set_schedule_position
from trainer.runtime.exits import ToFix

RECORD = "complete.json"
TOKENIZER, CMVN = "tokenizer.model", "cmvn.json"  # beside the checkpoints in a run's folder, and copied into each


class ResumeError(ToFix, RuntimeError):
    """A checkpoint that this run cannot continue from as asked (its config or flags must change: exit 2);
    worded for the user."""


# Keys that define what the weights mean: a resume that changes one is refused (``--reset_optimizer`` lets
# the weights load into the new model where the shapes still fit). Every other key is run-level.
MODEL_DEFINING = ("model.n_mels", "model.frame_stacking", "model.d_model", "model.num_layers", "model.num_heads",
                  "model.ffn_dim", "moe.mode", "moe.num_experts", "moe.moe_every", "moe.top_k", "data.vocab_size")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every key of both configs whose value differs (keys new since the
    checkpoint's version are not compared)."""
    before, after = _flat(saved), _flat(current)
    return [f"{k}: {json.dumps(before[k])} -> {json.dumps(after[k])}" for k in after
            if k in before and before[k] != after[k]]


@dataclass
class Record:
    """The trainer's state in a checkpoint, beside DeepSpeed's (its client state): one writer, one reader."""
    project_config: dict
    step: int
    epoch: int = 0  # data position: the epoch, and the batches of it this rank has taken
    position: int = 0
    best: dict = field(default_factory=lambda: {"wer": math.inf, "tag": ""})  # best mean dev WER and its tag
    world_size: Optional[int] = None  # None: re-sharded by tools/consolidate_checkpoint.py
    ep_size: int = 1
    optimizer_state: bool = True  # False: weights only, the optimizer starts afresh
    finished: bool = False  # the final checkpoint of a run that reached run.max_steps
    dev_wer: Optional[float] = None  # mean dev WER of the evaluation at this step (None: saved without one)

    @classmethod
    def from_saved(cls, saved: dict) -> "Record":
        """The record inside DeepSpeed's saved dict (``mp_rank_00_model_states.pt`` or ``load_checkpoint``'s
        client state), which also holds DeepSpeed's own keys."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def client_state(self) -> dict:
        """The record as DeepSpeed's client state (saved in the dense states file)."""
        return asdict(self)


def _rank0() -> bool:
    return distributed.rank() == 0


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_of(tag: str) -> int:
    """N of a checkpoint tag stepN; -1 for anything else."""
    return int(tag[len("step"):]) if tag.startswith("step") and tag[4:].isdigit() else -1


def tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders (``stepN``), oldest first, whether complete or not."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) >= 0), key=step_of)


def recorded_files(ckpt_dir: Path, tag: str) -> tuple[str, dict]:
    """The cheap half of the check: (why the checkpoint cannot be used or '', {name: {"bytes", "sha256"}} of its
    record), every recorded file there with its size."""
    record = ckpt_dir / tag / RECORD
    if not record.exists():
        return f"{ckpt_dir / tag}: incomplete (no {RECORD}; the save did not finish)", {}
    try:
        files = json.loads(record.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{record}: unreadable ({e})", {}
    for name, entry in files.items():
        path = ckpt_dir / tag / name
        if not path.exists():
            return f"{path}: missing", {}
        if path.stat().st_size != entry["bytes"]:
            return f"{path}: {path.stat().st_size} bytes, {entry['bytes']} recorded", {}
    return "", files


def file_problem(path: Path, entry: dict) -> str:
    """The costly half, for one file: its SHA-256 against the record's, and a ``.pt`` file opened without
    running code (before DeepSpeed opens it)."""
    try:  # an error here would leave the other ranks waiting: it is the file's problem, reported as such
        if integrity.digest(path) != entry["sha256"]:
            return f"{path}: content differs from the SHA-256 recorded when it was written (corrupted)"
    except OSError as e:
        return f"{path}: unreadable ({e})"
    if path.suffix == ".pt":
        try:
            integrity.load(path, SAFE_GLOBALS, mmap=True)
        except integrity.UnsafeFile as e:
            return str(e)
        except Exception as e:  # torch raises several types for a damaged archive
            return f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return ""


def problem(ckpt_dir: Path, tag: str) -> str:
    """Why this checkpoint cannot be used, or '' if every recorded file is there with its size and SHA-256, in
    this process alone (the tools; a run shares the work among its ranks: ``verify_on_all_ranks``)."""
    why, files = recorded_files(ckpt_dir, tag)
    for name, entry in files.items():
        why = why or file_problem(ckpt_dir / tag / name, entry)
    return why


def newest_usable(ckpt_dir: Path) -> tuple[str, list[str]]:
    """The newest verified tag ('' if none) and the warnings about newer ones that were skipped."""
    warnings = []
    for tag in reversed(tags(ckpt_dir)):
        why = problem(ckpt_dir, tag)
        if not why:
            return tag, warnings
        warnings.append(why)
    return "", warnings


def share(files: dict, world: int, readers) -> dict:
    """{name: the rank that verifies it}: each file goes to the least loaded (in bytes so far, largest files first)
    of the ranks that will read it (``readers(name)``; any rank for a file no rank reads), so every rank reads
    about as much and a file is read where its bytes are wanted next. The same on every rank."""
    load, owner = [0] * world, {}
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        r = min([r for r in readers(name) if 0 <= r < world] or range(world), key=lambda r: (load[r], r))
        owner[name] = r
        load[r] += files[name]["bytes"]
    return owner


def verify_on_all_ranks(ckpt_dir: Path, tag: str, readers) -> str:
    """``problem`` with its costly half shared by the ranks (``share``): rank 0 reads the record and checks the
    sizes, each rank hashes and opens its share, and every rank gets the first problem found (in the record's
    order; '' if none). Entered by every rank; run it under the checkpoint timeout (ranks wait for the slowest)."""
    why, files = distributed.broadcast_from_rank0(recorded_files(ckpt_dir, tag) if _rank0() else None)
    if why:
        return why
    owner = share(files, distributed.world(), readers)
    mine = {name: file_problem(ckpt_dir / tag / name, files[name]) for name in files
            if owner[name] == distributed.rank()}
    found = {name: why for part in distributed.gather_objects(mine) for name, why in part.items() if why}
    return next((found[name] for name in files if name in found), "")


def rank_readers(world: int, ep_size: int, num_experts: int):
    """``readers`` for ``share``: the ranks that load each file of a checkpoint in this run, DeepSpeed's files
    (``deepspeed_contract.loading_ranks``) and each rank's own random states."""
    def readers(name: str) -> list[int]:
        own = re.fullmatch(r"rng_rank(\d+)\.pt", name)
        return [int(own[1])] if own else loading_ranks(name, world, ep_size, num_experts)
    return readers


def restore_tokenizer(out_dir: Path) -> bool:
    """True when the run folder holds a tokenizer sentencepiece reads, restored if need be (missing or damaged)
    from the newest checkpoint's copy that matches its record; False when there is none, and none to restore
    (then a new one is trained). A damaged one with no copy to restore raises ValueError saying what to do."""
    path, ckpt_dir = out_dir / TOKENIZER, out_dir / "checkpoints"
    damage = tokenizer_problem(path) if path.exists() else "missing"
    if not damage:
        return True
    for tag in reversed(tags(ckpt_dir)):
        copy = ckpt_dir / tag / TOKENIZER
        try:
            entry = json.loads((ckpt_dir / tag / RECORD).read_text())["files"][TOKENIZER]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
        if copy.exists() and integrity.digest(copy) == entry.get("sha256") and not tokenizer_problem(copy):
            shutil.copyfile(copy, path.with_name(path.name + ".tmp"))
            os.replace(path.with_name(path.name + ".tmp"), path)
            distributed.log0(f"WARNING: {path}: {damage}; restored from {copy}, the copy saved with checkpoint "
                             f"{tag} (its SHA-256 as recorded)")
            return True
    if damage == "missing":
        return False
    raise ValueError(f"{path}: {damage}, and no checkpoint in {ckpt_dir} holds a copy that matches its record. "
                     "Restore the file from a backup; or, if this run has no checkpoint to continue from, delete "
                     "it and a new one is trained")


def read_record(ckpt_dir: Path, tag: str) -> Record:
    """A checkpoint's record, without reading its weights (the file is memory-mapped)."""
    return Record.from_saved(integrity.load(ckpt_dir / tag / MODEL_STATES, SAFE_GLOBALS, mmap=True))


def _rng_file(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / tag / f"rng_rank{distributed.rank()}.pt"


def publish(ckpt_dir: Path, tag: str, digests: dict):
    """Record every file of a written checkpoint with its size and SHA-256 (``digests``: name -> SHA-256 as
    computed while writing; a file without one is read once), then point ``latest`` at it (atomically)."""
    files = {}
    for p in sorted((ckpt_dir / tag).rglob("*")):
        if p.is_file():
            name = str(p.relative_to(ckpt_dir / tag))
            files[name] = {"bytes": p.stat().st_size, "sha256": digests.get(name) or integrity.digest(p)}
    _atomic_write(ckpt_dir / tag / RECORD, json.dumps({"files": files}))
    _atomic_write(ckpt_dir / "latest", tag)


def save(engine, ckpt_dir: Path, record: Record, keep: "Keep", extra_files: list) -> str:
    """Write a checkpoint on every rank with copies of ``extra_files`` (tokenizer, statistics), then publish
    it; prune the others to those ``keep`` keeps."""
    tag = f"step{engine.global_steps}"
    if _rank0() and (ckpt_dir / tag).exists():  # a leftover of a crashed save with this step
        shutil.rmtree(ckpt_dir / tag)
    distributed.barrier()
    written = engine.checkpoint_engine.written  # path -> SHA-256 of each file this rank writes
    written.clear()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=record.client_state(), save_latest=False)
    written[str(_rng_file(ckpt_dir, tag))] = integrity.save(_rng_states(), _rng_file(ckpt_dir, tag))
    mine = {str(Path(path).relative_to(ckpt_dir / tag)): sha for path, sha in written.items()}
    digests = {k: v for part in distributed.gather_objects(mine) for k, v in part.items()}  # after all wrote
    if _rank0():
        for f in extra_files:
            shutil.copyfile(f, ckpt_dir / tag / Path(f).name)
        publish(ckpt_dir, tag, digests)
        kept = keep.tags(ckpt_dir) | {tag}
        for old in tags(ckpt_dir):
            if old not in kept:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    distributed.barrier()
    return tag


@dataclass
class Keep:
    """Which checkpoints a run keeps: the newest ``last`` (0: all), the ``best`` with the lowest mean dev WER in
    their records, and ``also`` (the best of a run written before records held their WER)."""
    last: int
    best: int
    also: set

    def tags(self, ckpt_dir: Path) -> set:
        """The tags to keep among those on disk."""
        present = tags(ckpt_dir)
        newest = present if self.last == 0 else present[-self.last:]
        return set(newest) | set(best_scored(ckpt_dir)[:self.best]) | (self.also & set(present))


def best_scored(ckpt_dir: Path) -> list[str]:
    """The tags whose records hold a mean dev WER, lowest first (the newer of two equal); records are read
    memory-mapped, and one that cannot be read is not scored (its checkpoint is named when it is verified)."""
    scored = []
    for tag in tags(ckpt_dir):
        try:
            wer = read_record(ckpt_dir, tag).dev_wer
        except Exception:  # torch raises several types for a damaged archive
            continue
        if wer is not None:
            scored.append((wer, -step_of(tag), tag))
    return [tag for *_, tag in sorted(scored)]


def _rng_states() -> dict:
    """This rank's random streams: CPU, accelerator (dropout on a GPU draws from it) and Python's."""
    return {"torch": torch.get_rng_state(), "accelerator": deepspeed.get_accelerator().get_rng_state(),
            "python": random.getstate()}


def _restore_rng(state: dict):
    torch.set_rng_state(state["torch"])
    deepspeed.get_accelerator().set_rng_state(state["accelerator"])
    random.setstate(state["python"])


def load(engine, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> Record:
    """Load a verified checkpoint (the caller picks it with ``Checkpointer.newest_verified``).
    Without the optimizer, the learning-rate schedule is set to the checkpoint's step rather than restarted."""
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                       load_lr_scheduler_states=load_optimizer)
    if not load_optimizer:
        set_schedule_position(engine.lr_scheduler, engine.global_steps)
    rng = _rng_file(ckpt_dir, tag)
    if rng.exists():  # absent when the world size changed: then the random streams start afresh
        _restore_rng(integrity.load(rng, []))
    return Record.from_saved(client)


class Checkpointer:
    """The run's checkpoint policy over one engine: saves with the run's files, keeps the newest ``run.keep_last``
    and the ``run.keep_best`` best by mean dev WER, and resumes from the newest usable checkpoint."""

    def __init__(self, engine, plan: RunPlan):
        self.engine, self.plan, self.out_dir = engine, plan, plan.output_dir
        self.timeout_s = plan.project.run.checkpoint_timeout_s
        self.dir = self.out_dir / "checkpoints"
        self.best = {"wer": math.inf, "tag": ""}
        self.dev_wer = {"step": -1, "wer": None}  # the last evaluation's step and mean dev WER

    def note_evaluation(self, mean_wer: float):
        """Remember the dev WER of the checkpoint about to be saved at this step (in its record, and as the best
        so far when it is)."""
        self.dev_wer = {"step": self.engine.global_steps, "wer": mean_wer}
        if mean_wer < self.best["wer"]:
            self.best = {"wer": mean_wer, "tag": f"step{self.engine.global_steps}"}

    def save(self, record: Record) -> str:
        """Save a verified checkpoint with the run's files, then prune to the newest and the best; its tag."""
        run = self.plan.project.run
        keep = Keep(run.keep_last, run.keep_best, {self.best["tag"]} if self.best["tag"] else set())
        extra = [f for f in (self.out_dir / TOKENIZER, self.out_dir / CMVN) if f.exists()]
        with distributed.timeout(self.timeout_s):  # ranks wait for the slowest writer at its barriers
            evaluated = self.dev_wer["wer"] if self.dev_wer["step"] == self.engine.global_steps else None
            tag = save(self.engine, self.dir, replace(record, best=self.best, dev_wer=evaluated), keep, extra)
        distributed.log0(f"saved checkpoint {self.dir / tag}")
        return tag

    def resume(self, reset_optimizer: bool, weights_only: bool = False) -> Optional[Record]:
        """Continue from the newest usable checkpoint, if any: weights, optimizer, scheduler, step, random
        states (the data position is in the record returned). A different world size or ep_size needs
        ``reset_optimizer`` (weights only); the learning-rate schedule then continues from the step. Config
        changes since the checkpoint are named: run-level ones are accepted, model-defining ones refused
        unless ``reset_optimizer`` and the weights still fit. ``weights_only`` (evaluation): the weights of any
        world size or ep_size, the optimizer left alone, a changed model still refused."""
        project_config, world_size, ep_size = self.plan.project.model_dump(), self.plan.world, self.plan.ep_size
        with distributed.timeout(self.timeout_s):  # ranks wait for the slowest to hash its share of the files
            newest, warnings = self.newest_verified(world_size, ep_size, self.plan.project.moe.num_experts)
            written = distributed.broadcast_from_rank0(read_record(self.dir, newest) if newest and _rank0() else None)
        for w in warnings:
            distributed.log0(f"WARNING: skipping a damaged checkpoint: {w}")
        if not newest:
            return None
        changes = config_changes(written.project_config, project_config)
        model = [c for c in changes if c.split(":")[0] in MODEL_DEFINING]
        if model and not reset_optimizer:
            raise ResumeError(f"{self.dir / newest} was trained with another model; changed since: "
                              + "; ".join(model) + ". Restore these keys, choose another --output_dir, or pass "
                              "--reset_optimizer to load the weights into the new model where their shapes fit")
        if changes:
            distributed.log0("config changed since the checkpoint: " + "; ".join(changes)
                             + (" (model-defining; weights loaded where they fit)" if model else ""))
        if not written.optimizer_state:  # re-sharded by tools/consolidate_checkpoint.py: weights only
            reset_optimizer = True
        moved = (written.world_size, written.ep_size) != (world_size, ep_size)
        if moved and not (reset_optimizer or weights_only):
            raise ResumeError(f"{self.dir / newest} was written by {written.world_size} ranks with ep_size "
                              f"{written.ep_size}, this run has {world_size} with ep_size {ep_size}: the optimizer "
                              "state cannot be re-partitioned; pass --reset_optimizer to continue from the weights "
                              "(experts are stored by global id) with a fresh optimizer")
        try:
            with distributed.timeout(self.timeout_s):  # every rank reads its files: ranks wait for the slowest
                record = load(self.engine, self.dir, newest, load_optimizer=not (reset_optimizer or weights_only))
        except (RuntimeError, FileNotFoundError, KeyError) as e:  # the weights do not fit the new model
            if not model:
                raise
            raise ResumeError(f"{self.dir / newest}: its weights do not fit the changed model ("
                              + "; ".join(model) + f"): {str(e).splitlines()[0]}") from None
        self.best = record.best
        distributed.log0(f"resumed from {self.dir / newest} at step {self.engine.global_steps}"
                         + (" (optimizer reset)" if reset_optimizer else ""))
        return record

    def newest_verified(self, world_size: int, ep_size: int, num_experts: int) -> tuple[str, list[str]]:
        """``newest_usable`` with each file verified by a rank that reads it (``verify_on_all_ranks``); the same
        answer on every rank. Every rank enters."""
        readers, warnings = rank_readers(world_size, ep_size, num_experts), []
        for tag in reversed(distributed.broadcast_from_rank0(tags(self.dir) if _rank0() else None)):
            why = verify_on_all_ranks(self.dir, tag, readers)
            if not why:
                return tag, warnings
            warnings.append(why)
        return "", warnings
