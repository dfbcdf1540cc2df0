"""The start of a run, one path for training and the preflight: flags -> config -> plan -> lock -> data ->
model -> engine (``start``). Each error on the way carries its exit status (``runtime.exits``): the entry point
has one ``except``.
"""
import argparse
from dataclasses import dataclass

import deepspeed

from trainer.config import load_config, parse_assignment, with_overrides
from trainer.data.batches import SpeechDataset, describe
from trainer.data.text import Tokenizer
from trainer.datasets import prepare_data
from trainer.engine import build_engine, build_model
from trainer.model.ctc import CTCModel
from trainer.plan import RunPlan, plan_run
from trainer.runtime import distributed, locks
from trainer.runtime.distributed import log0
from trainer.runtime.exits import ToFix
from trainer.runtime.stopping import launcher_chain

DESCRIPTION = """A run, start to end: ``deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json``.

With no data flags it trains on the embedded corpus (built on first use); manifests of your own data are
flags. Exit status: 0 done, 1 a failure in training, 2 a configuration, data, lock or checkpoint to fix, 75
stopped on a signal after a save."""


def parse_args(argv=None, description: str = DESCRIPTION) -> argparse.Namespace:
    """trainer/main.py's flags (the preflight takes the same)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--train_manifest", action="append", default=None,
                   help="NeMo JSON-lines manifest (repeatable); default: the embedded corpus. Any training source "
                        "given here (manifest, cuts, shards) replaces every training source of the config, and "
                        "any dev source every dev source")
    p.add_argument("--dev_manifest", action="append", default=None, help="dev manifest (repeatable)")
    p.add_argument("--train_cuts", action="append", default=None, help="Lhotse cut set for training (repeatable)")
    p.add_argument("--dev_cuts", action="append", default=None, help="Lhotse cut set, a dev set (repeatable)")
    p.add_argument("--train_shards", action="append", default=None, help="Lhotse Shar folder for training")
    p.add_argument("--dev_shards", action="append", default=None, help="Lhotse Shar folder, a dev set")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the omni_router section, e.g. --set run.max_steps=5 "
                        "--set moe.lb_coef=0.02 (repeatable; the value is read as JSON, else as a string)")
    p.add_argument("--output_dir", default=None, help="alias of --set run.output_dir=...")
    p.add_argument("--max_steps", type=int, default=None, help="alias of --set run.max_steps=...")
    p.add_argument("--corpus_dir", default=None, help="alias of --set data.corpus.dir=...")
    p.add_argument("--strict_data", action="store_true", default=None,
                   help="stop at start-up on any unusable row instead of skipping it")
    p.add_argument("--eval_only", action="store_true",
                   help="evaluate the newest checkpoint in the output directory on the dev sets, and stop (a "
                        "checkpoint of any world size: evaluation loads the weights only)")
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue from the newest usable checkpoint in the output directory, if any; "
                        "never: start afresh, and refuse an output directory that already holds checkpoints")
    p.add_argument("--reset_optimizer", action="store_true",
                   help="resume from the weights only (needed when the number of ranks changed)")
    deepspeed.add_config_arguments(p)
    args = p.parse_args(argv)
    if not args.deepspeed_config:
        p.error("--deepspeed_config is required (for example ds_configs/omni.json)")
    if args.eval_only and args.resume == "never":
        p.error("--eval_only evaluates a checkpoint: it cannot be combined with --resume never")
    return args


SOURCE_KEYS = {split: [f"data.{split}_{kind}" for kind in ("manifests", "cuts", "shards", "hf")]
               for split in ("train", "dev")}


def load_project(args):
    """The config file with the flags applied: the aliases first, then every ``--set`` in order. A data source
    given on the command line replaces every source the config names for that split (train or dev)."""
    ds_config, project = load_config(args.deepspeed_config)
    sources = {"data.train_manifests": args.train_manifest, "data.dev_manifests": args.dev_manifest,
               "data.train_cuts": args.train_cuts, "data.dev_cuts": args.dev_cuts,
               "data.train_shards": args.train_shards, "data.dev_shards": args.dev_shards}
    for keys in SOURCE_KEYS.values():
        if any(sources.get(k) for k in keys):
            sources.update({k: sources.get(k) or [] for k in keys})
    aliases = {"run.output_dir": args.output_dir, "run.max_steps": args.max_steps, **sources,
               "data.corpus.dir": args.corpus_dir, "data.strict_data": args.strict_data}
    assignments = [(k, v) for k, v in aliases.items() if v is not None]
    return ds_config, with_overrides(project, assignments + [parse_assignment(a) for a in args.set])


@dataclass
class Started:
    """What a started run has on this rank."""
    plan: RunPlan
    train_set: SpeechDataset
    dev_sets: dict  # name -> SpeechDataset
    tokenizer: Tokenizer
    model: CTCModel
    engine: object  # DeepSpeedEngine


def start(args, lock: bool = True, refuse_cpu: bool = True) -> Started:
    """Flags -> a run on this rank, every rank in step. ``lock``: hold the output folder (training; the preflight
    writes no checkpoint); ``refuse_cpu``: stop a run given GPUs it cannot use (the preflight reports it)."""
    ds_config, project = load_project(args)
    problem = "" if project.run.allow_cpu or not refuse_cpu else distributed.missing_gpus(bool(launcher_chain()))
    if problem:  # before anything is written or joined: a CPU run on a GPU allocation would waste it
        raise ToFix(problem)
    distributed.init(project.run.collective_timeout_s)
    # checked against the world size before anything is written
    plan = plan_run(ds_config, project, distributed.rank(), distributed.world(), distributed.device())
    if lock:  # held by rank 0 until the process ends (``locks.release_all``)
        distributed.on_rank0(lambda: locks.claim_output_dir(plan.output_dir), locks.LockBusy)
    train_set, dev_sets, tokenizer = prepare_data(plan)
    model = build_model(plan, tokenizer.vocab_size)
    engine = build_engine(plan, model)
    distributed.apply_timeout()  # DeepSpeed's groups too
    log0(describe_run(plan, model, train_set, dev_sets, tokenizer.vocab_size))
    return Started(plan, train_set, dev_sets, tokenizer, model, engine)


def describe_run(plan: RunPlan, model, train_set, dev_sets: dict, vocab: int) -> str:
    """The run's one-line summary, printed at start."""
    params = sum(p.numel() for p in model.parameters())
    return (f"mode {plan.project.moe.mode}: {params:,} parameters on rank 0, {len(model.routers())} router(s), "
            f"{plan.world} rank(s), ep_size {plan.ep_size}, {describe(train_set.utts, train_set.shards)} train / "
            f"{sum(len(d) for d in dev_sets.values())} dev utterances, vocabulary {vocab}; {plan.batch.describe()}")
