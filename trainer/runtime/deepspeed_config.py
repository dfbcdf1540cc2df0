"""DeepSpeed's half of a run config: the keys DeepSpeed knows, the settings the trainer refuses, and the keys it
derives for a run. Beside ``deepspeed_contract``: what is policy about DeepSpeed's config lives here, what the
trainer relies on in DeepSpeed's code there. Plain dicts in, ``ValueError`` out (``config`` names the file)."""
import copy
import difflib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
SCHEDULERS_WITH_LENGTH = ("WarmupDecayLR", "WarmupCosineLR")


@lru_cache(maxsize=None)
def known_keys() -> frozenset:
    """Every snake_case string literal in DeepSpeed's source: a superset of the top-level keys it reads, which
    are spread over some twenty modules with no registry (0.1 s, without importing DeepSpeed)."""
    root = Path(importlib.util.find_spec("deepspeed").origin).parent
    literal = re.compile(r"""['"]([a-z][a-z0-9_]*)['"]""")
    return frozenset(k for f in root.rglob("*.py") for k in literal.findall(f.read_text(errors="replace")))


def check_top_level(raw: dict, section: str):
    """A top-level key that is neither ``section`` nor a key DeepSpeed knows is a typo (a misspelt section would
    otherwise be ignored and the run would train the defaults); DeepSpeed's batch keys are derived, never set."""
    for key in raw:
        if key != section and key not in known_keys():
            close = difflib.get_close_matches(key, [section, *known_keys()], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown top-level key '{key}': neither '{section}' nor a DeepSpeed key{hint}")
    fixed = [k for k in BATCH_KEYS if k in raw]
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: remove; the batch is one setting, {section}.data.batch_frames "
                         "(padded frames per optimizer step over all ranks), and the trainer derives DeepSpeed's "
                         "batch keys and gradient accumulation from it for each world size")


def check_zero_stage(ds: dict, moe_mode: str):
    """ZeRO 1 or 2 only: stage 0 does not skip a non-finite step on every rank, and DeepSpeed's MoE refuses 3."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        raise ValueError("zero_optimization.stage: 0 (or absent) is refused: only DeepSpeed's ZeRO optimizer "
                         "(stage 1 or 2) detects a non-finite gradient and skips that step on every rank")
    if stage == 3 and moe_mode != "dense":
        raise ValueError(f"zero_optimization.stage: 3 is refused with MoE (mode '{moe_mode}'): DeepSpeed's native "
                         "MoE layers work with ZeRO stage 0, 1 or 2 only")


def zero_for_world(zero: dict, world: int, ep_size: int) -> dict:
    """DeepSpeed's ``zero_optimization`` for this world size. ZeRO 1 on one rank reduces nothing, so the copy of
    every gradient into a contiguous bucket is skipped (``contiguous_gradients: false`` unless set: a pass over
    all parameters fewer, and MoE has three times dense's). With expert parallelism that setting is refused:
    DeepSpeed 0.19.8's path without contiguous gradients then reduces expert gradients wrongly."""
    zero = dict(zero)
    if world == 1 and zero.get("stage") == 1:
        zero.setdefault("contiguous_gradients", False)
    elif zero.get("contiguous_gradients") is False and ep_size > 1:
        raise ValueError(f"zero_optimization.contiguous_gradients: false is refused with expert parallelism "
                         f"(ep_size {ep_size}): DeepSpeed 0.19.8 then reduces expert gradients wrongly (the global "
                         "gradient norm differs from one rank's); remove the key: on one rank the trainer turns it "
                         "off by itself")
    return zero


def for_run(ds: dict, max_steps: int, world: int, accumulation: int, ep_size: int) -> dict:
    """The dict ``deepspeed.initialize`` gets: the scheduler's length (``run.max_steps``), the batch keys (one
    "sample" is one micro-batch; accumulation keeps the global batch fixed whatever the number of ranks) and the
    ZeRO settings for the world size."""
    cfg = copy.deepcopy(ds)
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and cfg["scheduler"].get("type") in SCHEDULERS_WITH_LENGTH:
        sched.setdefault("total_num_steps", max_steps)
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=accumulation,
               train_batch_size=world * accumulation,
               zero_optimization=zero_for_world(cfg.get("zero_optimization", {}), world, ep_size))
    return cfg
