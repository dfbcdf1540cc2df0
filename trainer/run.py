"""A run, start to end: ``deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json [--num_gpus 2]``.

With no data flags it trains on the embedded corpus (built on first use); manifests of your own data are
flags. Here: the flags, the config they change, and the exit status of each way a run ends (0 done, 1 a failure
in training, 2 a configuration, data or checkpoint to fix, 75 stopped on a signal after a save); the order of
the run is config -> plan (``trainer.plan``) -> datasets (``trainer.datasets``) -> model and engine -> loop.
"""
import argparse
import json
import sys

import deepspeed

from trainer import checkpoint
from trainer.runtime import distributed, locks
from trainer.checkpoint import ResumeError
from trainer.config import ConfigError, load_config, parse_assignment, with_overrides
from trainer.data.batches import describe
from trainer.datasets import prepare_data
from trainer.runtime.distributed import log0
from trainer.engine import build_engine, build_model
from trainer.evaluation import EvaluationError
from trainer.runtime.integrity import UnsafeFile
from trainer.loop import Trainer, TrainingError
from trainer.plan import RunPlan, plan_run
from trainer.data.sources import DataError
from trainer.runtime.stopping import launcher_chain


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--corpus_dir", default=None, help="alias of --set data.corpus_dir=...")
    p.add_argument("--strict_data", action="store_true", default=None,
                   help="stop at start-up on any unusable row instead of skipping it")
    p.add_argument("--eval_only", action="store_true",
                   help="evaluate the newest checkpoint in the output directory on the dev sets, and stop")
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
               "data.corpus_dir": args.corpus_dir, "data.strict_data": args.strict_data}
    assignments = [(k, v) for k, v in aliases.items() if v is not None]
    return ds_config, with_overrides(project, assignments + [parse_assignment(a) for a in args.set])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ds_config, project = load_project(args)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    problem = "" if project.run.allow_cpu else distributed.missing_gpus(bool(launcher_chain()))
    if problem:  # before anything is written or joined: a CPU run on a GPU allocation would waste it
        print(f"error: {problem}", file=sys.stderr)
        return 2
    distributed.init(project.run.collective_timeout_s)
    try:
        return train(args, ds_config, project)  # every rank returns here, in step with the others or alone
    finally:
        locks.release_all()  # a lock file is removed here: ranks end with os._exit, which runs no exit hook


def train(args, ds_config, project) -> int:
    """The run on this rank: its plan, data, model, engine, then training or evaluation; the exit status."""
    try:  # checked against the world size before anything is written
        plan = plan_run(ds_config, project, distributed.rank(), distributed.world(), distributed.device())
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    try:  # held by rank 0 until the process ends (a lock file is removed on the way out of main)
        distributed.on_rank0(lambda: locks.claim_output_dir(plan.output_dir), locks.LockBusy)
    except locks.LockBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train_set, dev_sets, tokenizer = prepare_data(plan)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    model = build_model(plan, tokenizer.vocab_size)
    engine = build_engine(plan, model)
    distributed.apply_timeout()  # DeepSpeed's groups too
    log0(describe_run(plan, model, train_set, dev_sets, tokenizer.vocab_size))
    trainer = Trainer(engine, plan, train_set, dev_sets, tokenizer)
    try:
        if args.resume == "never" and checkpoint.tags(trainer.checkpointer.dir):
            raise ResumeError(f"--resume never: {trainer.checkpointer.dir} already holds checkpoints; choose "
                              "another --output_dir (nothing there is overwritten)")
        resumed = args.resume == "auto" and trainer.resume(args.reset_optimizer)
        if args.eval_only:
            if not resumed:
                raise TrainingError(f"--eval_only: no usable checkpoint in {trainer.checkpointer.dir}")
            result = trainer.evaluate()
            if plan.rank == 0:
                (plan.output_dir / f"eval_step{result['step']}.json").write_text(json.dumps(result, indent=1))
            return 0
        return trainer.fit()
    except ResumeError as e:  # a checkpoint this run's config or flags cannot continue from: fix them
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, EvaluationError, UnsafeFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not distributed.is_collective_failure(e):
            raise
        print(f"error: rank {distributed.rank()}, {trainer.phase}: a collective failed (timeout "
              f"{project.run.collective_timeout_s:.0f} s, run.collective_timeout_s): {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 1


def describe_run(plan: RunPlan, model, train_set, dev_sets: dict, vocab: int) -> str:
    params = sum(p.numel() for p in model.parameters())
    return (f"mode {plan.project.moe.mode}: {params:,} parameters on rank 0, {len(model.routers())} router(s), "
            f"{plan.world} rank(s), ep_size {plan.ep_size}, {describe(train_set.utts, train_set.shards)} train / "
            f"{sum(len(d) for d in dev_sets.values())} dev utterances, vocabulary {vocab}; {plan.batch.describe()}")


if __name__ == "__main__":
    distributed.end_process(main())
