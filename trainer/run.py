"""A run, start to end: ``deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json [--num_gpus 2]``.

With no data flags it trains on the embedded corpus (built on first use); manifests of your own data are
flags. Rank 0 prepares shared files (corpus, tokenizer) while the others wait at a barrier.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import deepspeed
import torch

from trainer import checkpoint, distributed, locks
from trainer.checkpoint import ResumeError
from trainer.config import (ConfigError, batch_plan, load_config, parse_assignment, resolve_ep_size, zero_for_world,
                            with_assignments)
from trainer.corpus import build_corpus
from trainer.data import ShardSet, SpeechDataset, describe, tokenizer_sample
from trainer.distributed import log0
from trainer.engine import build_engine, build_model
from trainer.evaluation import EvaluationError
from trainer.integrity import UnsafeFile
from trainer.loop import Trainer, TrainingError
from trainer.sources import DataError, read_sources, set_name
from trainer.stopping import launcher_chain
from trainer.text import Tokenizer

LOCK = ".lock"  # in the output folder: who is writing into it


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
    assignments = [(k.split("."), v) for k, v in aliases.items() if v is not None]
    return ds_config, with_assignments(project, assignments + [parse_assignment(a) for a in args.set])


def on_rank0(fn):
    """fn on rank 0 while the others wait; its error is raised on every rank, so no rank hangs at a barrier."""
    error = distributed.on_rank0(fn)
    if error:
        raise DataError(error)


def claim_output_dir(out: Path):
    """A lock on the output folder, held by rank 0 for the run's life (``trainer.locks``: flock, released by the
    kernel however the process ends, or a lock file with heartbeat where the file system has no flock, removed
    on the way out of ``main``): a second run into the folder stops before writing anything. Raises DataError
    naming the holder and the kind of lock on every rank."""

    def take():
        out.mkdir(parents=True, exist_ok=True)
        try:
            locks.acquire(out / LOCK)  # held until the process ends
        except locks.LockBusy as e:
            raise ValueError(f"{out} is in use by another run ({e}); wait for it to end, stop it, or choose "
                             "another --output_dir") from None

    on_rank0(take)


def read_dev_sets(data, manifests: list[str], options: dict) -> dict:
    """One dev set per source, named after it: WER is reported per set and averaged."""
    named = [(Path(m).stem, dict(manifests=[m])) for m in manifests] + \
        [(set_name(c), dict(cuts=[c])) for c in data.dev_cuts] + \
        [(Path(d).name, dict(shards=[d])) for d in data.dev_shards] + \
        [(Path(h.path).name, dict(hf_sources=[h])) for h in data.dev_hf]
    dev = {}
    for name, source in named:
        source = {"manifests": [], "hf_sources": [], **source}
        utts, problems = read_sources(max_duration=data.max_duration, strict=data.strict_data, **source, **options)
        report(problems, name)
        dev[name if name not in dev else f"{name}.{len(dev)}"] = utts
    return dev


def read_train_shards(data, manifests: list[str]) -> ShardSet:
    """The training shards, listed (read lazily in training); strict_data reads every record first."""
    if manifests or data.train_hf or data.train_cuts:
        raise DataError("--train_shards cannot be mixed with other training sources: write those as shards too "
                        "(tools/make_shards.py)")
    shards = ShardSet(list(data.train_shards), data.max_duration)
    if data.strict_data:  # a check of everything before training starts, at the cost of reading it all
        read_sources([], [], data.max_duration, True, shards=data.train_shards)
    if len(shards.shards) < distributed.world():
        raise DataError(f"{', '.join(data.train_shards)}: {len(shards.shards)} shards for {distributed.world()} "
                        "ranks; each rank reads shards of its own: write smaller ones (tools/make_shards.py "
                        "--shard_size)")
    return shards


def prepare_data(project):
    """Utterances (the embedded corpus unless given), the tokenizer made once by rank 0, and the datasets.
    Rank 0 may take minutes (a corpus build, a tokenizer on 200,000 texts): the others wait for it under
    ``run.checkpoint_timeout_s``, not the collective timeout."""
    with distributed.timeout(project.run.checkpoint_timeout_s):
        return _prepare_data(project)


def _prepare_data(project):
    data, out = project.data, Path(project.run.output_dir)
    train_m, dev_m = list(data.train_manifests), list(data.dev_manifests)
    if not (train_m or data.train_hf or data.train_cuts or data.train_shards):
        on_rank0(lambda: build_corpus(data.corpus_dir, data.corpus_sentences, seed=data.corpus_seed,
                                      words=data.corpus_words, text=data.corpus_text))
        corpus = Path(data.corpus_dir).expanduser()
        train_m = [str(corpus / "train.jsonl")]
        dev_m = dev_m or ([] if data.dev_hf or data.dev_cuts or data.dev_shards else [str(corpus / "dev.jsonl")])
    if not (dev_m or data.dev_hf or data.dev_cuts or data.dev_shards):
        raise DataError("no dev set: pass --dev_manifest, --dev_cuts or --dev_shards (or omni_router.data.dev_hf)")
    options = dict(cuts_root=data.cuts_root, duration_cache=data.duration_cache)
    shards = read_train_shards(data, train_m) if data.train_shards else None
    rank, world = distributed.rank(), distributed.world()

    def read_train(share: tuple, strict: bool = data.strict_data):
        return read_sources(train_m, data.train_hf, data.max_duration, strict, cuts=data.train_cuts, share=share,
                            **options)

    # Each rank decodes and keeps only its share of the training rows (every world-th): start-up time and
    # memory per rank fall with the number of ranks.
    refused = ""
    try:
        train, problems = read_train((rank, world)) if shards is None else ([], shards.problems)
    except DataError as e:  # strict_data: unusable rows in this rank's share
        train, problems, refused = [], [], str(e)
    report(problems, "train" if world == 1 else f"train (rank {rank}'s share)", every_rank=shards is None)
    if shards is None:  # what the ranks found, agreed, so that no rank goes on alone
        found = distributed.sum_over_ranks({"refused": torch.tensor([float(bool(refused))]),
                                            "empty": torch.tensor([float(not train and not refused)])})
        refusing, empty = int(found["refused"][0]), int(found["empty"][0])
        if refusing:
            raise DataError(refused or f"{refusing} other rank(s) found unusable training rows (strict_data)")
        if empty:
            raise DataError("train: no usable utterance" + (f" in the share of {empty} of {world} ranks (each rank "
                                                            f"reads one row in {world})" if world > 1 else ""))
    dev = read_dev_sets(data, dev_m, options)
    for name, utts in dev.items():
        if not utts:
            raise DataError(f"{name}: no usable utterance")
    read = train_m + list(data.train_cuts) + list(data.train_shards) + [h.path for h in data.train_hf]
    mine = f" on rank 0, one row in {world}" if world > 1 and shards is None else ""
    log0(f"train: {describe(train, shards)}{mine}, from {', '.join(read)}; dev sets: {', '.join(dev)}")
    sp_path, seed = out / checkpoint.TOKENIZER, project.run.seed

    def make_tokenizer():  # on a bounded sample of the texts, so start-up does not grow with the corpus
        # a damaged or missing one is restored from a checkpoint's copy, if any (one the checkpoints depend on)
        if checkpoint.restore_tokenizer(out):
            return
        # every row's text, not rank 0's share: the same pieces for any world (strict mode checked the rows)
        every_row = train if world == 1 or shards else read_train((0, 1), strict=False)[0]
        Tokenizer.train(tokenizer_sample(every_row, shards, data.tokenizer_sentences, seed), str(sp_path),
                        data.vocab_size)

    # Every rank enters: rank 0 alone looks for the file (a rank that looked itself could find it already
    # written by rank 0 and skip the broadcast that rank 0 then waits in).
    on_rank0(make_tokenizer)
    tokenizer = Tokenizer(str(sp_path))
    if data.global_cmvn:  # the statistics travel with the model, beside its tokenizer
        on_rank0(lambda: shutil.copyfile(data.global_cmvn, out / checkpoint.CMVN))
    n_mels = project.model.n_mels
    return (SpeechDataset(train, tokenizer, data, n_mels, train=True, seed=seed, shards=shards),
            {name: SpeechDataset(utts, tokenizer, data, n_mels, train=False) for name, utts in dev.items()},
            tokenizer)


def report(problems: list, name: str, every_rank: bool = False):
    """Unusable rows, named by file and line: on rank 0, or on every rank for what only it read (its share)."""
    if problems and (every_rank or distributed.rank() == 0):
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        print(f"{name}: skipping {len(problems)} unusable rows:\n  {shown}", flush=True)


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
    """The run on this rank: checks, data, model, engine, then training or evaluation; the exit status."""
    world = distributed.world()
    try:  # checked against the world size before anything is written
        plan = batch_plan(project.data, world)
        resolve_ep_size(project.moe, world)
        zero_for_world(ds_config, project, world)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    try:
        claim_output_dir(Path(project.run.output_dir))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train_set, dev_sets, tokenizer = prepare_data(project)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    model = build_model(project, tokenizer.vocab_size)
    engine = build_engine(ds_config, project, model)
    distributed.apply_timeout()  # DeepSpeed's groups too
    params = sum(p.numel() for p in model.parameters())
    log0(f"mode {project.moe.mode}: {params:,} parameters on rank 0, {len(model.routers())} router(s), "
         f"{world} rank(s), ep_size {resolve_ep_size(project.moe, world)}, "
         f"{describe(train_set.utts, train_set.shards)} train / "
         f"{sum(len(d) for d in dev_sets.values())} dev utterances, vocabulary {tokenizer.vocab_size}; "
         f"{plan.describe()}")
    trainer = Trainer(engine, project, train_set, dev_sets, tokenizer, project.run.output_dir)
    try:
        if args.resume == "never" and checkpoint.tags(trainer.checkpointer.dir):
            raise ResumeError(f"--resume never: {trainer.checkpointer.dir} already holds checkpoints; choose "
                              "another --output_dir (nothing there is overwritten)")
        resumed = args.resume == "auto" and trainer.resume(args.reset_optimizer)
        if args.eval_only:
            if not resumed:
                raise TrainingError(f"--eval_only: no usable checkpoint in {trainer.checkpointer.dir}")
            result = trainer.evaluate()
            if distributed.rank() == 0:
                Path(project.run.output_dir, f"eval_step{result['step']}.json").write_text(json.dumps(result, indent=1))
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


if __name__ == "__main__":
    distributed.end_process(main())
