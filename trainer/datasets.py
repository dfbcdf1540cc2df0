"""The datasets of a run: its sources read (each rank its share of the training rows), the embedded corpus
built and the tokenizer trained once by rank 0, and the SpeechDatasets over them.

audio rows (``sources``) -> utterances -> ``SpeechDataset`` (``data``), with the tokenizer (``text``).
"""
import shutil
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.data.batches import ShardSet, SpeechDataset, describe, tokenizer_sample
from trainer.data.corpus import build_corpus
from trainer.data.sources import DataError, read_sources, set_name
from trainer.data.text import Tokenizer
from trainer.plan import RunPlan
from trainer.runtime import distributed
from trainer.runtime.distributed import log0


def prepare_data(plan: RunPlan) -> tuple[SpeechDataset, dict, Tokenizer]:
    """(training set, {name: dev set}, tokenizer): the utterances (the embedded corpus unless given), the
    tokenizer made once by rank 0, and the datasets. Rank 0 may take minutes (a corpus build, a tokenizer on
    200,000 texts): the others wait for it under ``run.checkpoint_timeout_s``, not the collective timeout."""
    with distributed.timeout(plan.project.run.checkpoint_timeout_s):
        return _prepare_data(plan)


def _prepare_data(plan: RunPlan):
    project = plan.project
    data, out = project.data, plan.output_dir
    train_m, dev_m = list(data.train_manifests), list(data.dev_manifests)
    if not (train_m or data.train_hf or data.train_cuts or data.train_shards):
        c = data.corpus
        distributed.on_rank0(lambda: build_corpus(c.dir, c.sentences, seed=c.seed, words=c.words, text=c.text),
                             DataError)
        corpus = Path(c.dir).expanduser()
        train_m = [str(corpus / "train.jsonl")]
        dev_m = dev_m or ([] if data.dev_hf or data.dev_cuts or data.dev_shards else [str(corpus / "dev.jsonl")])
    if not (dev_m or data.dev_hf or data.dev_cuts or data.dev_shards):
        raise DataError("no dev set: pass --dev_manifest, --dev_cuts or --dev_shards (or omni_router.data.dev_hf)")
    options = dict(cuts_root=data.cuts_root, duration_cache=data.duration_cache)
    rank, world = plan.rank, plan.world
    shards = read_train_shards(data, train_m, world) if data.train_shards else None

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
    distributed.on_rank0(make_tokenizer, DataError)
    tokenizer = Tokenizer(str(sp_path))
    if data.global_cmvn:  # the statistics travel with the model, beside its tokenizer
        distributed.on_rank0(lambda: shutil.copyfile(data.global_cmvn, out / checkpoint.CMVN), DataError)
    n_mels = project.model.n_mels
    return (SpeechDataset(train, tokenizer, data, n_mels, train=True, seed=seed, shards=shards),
            {name: SpeechDataset(utts, tokenizer, data, n_mels, train=False) for name, utts in dev.items()},
            tokenizer)


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


def read_train_shards(data, manifests: list[str], world: int) -> ShardSet:
    """The training shards, listed (read lazily in training); strict_data reads every record first."""
    if manifests or data.train_hf or data.train_cuts:
        raise DataError("--train_shards cannot be mixed with other training sources: write those as shards too "
                        "(tools/make_shards.py)")
    shards = ShardSet(list(data.train_shards), data.max_duration)
    if data.strict_data:  # a check of everything before training starts, at the cost of reading it all
        read_sources([], [], data.max_duration, True, shards=data.train_shards)
    if len(shards.shards) < world:
        raise DataError(f"{', '.join(data.train_shards)}: {len(shards.shards)} shards for {world} "
                        "ranks; each rank reads shards of its own: write smaller ones (tools/make_shards.py "
                        "--shard_size)")
    return shards


def report(problems: list, name: str, every_rank: bool = False):
    """Unusable rows, named by file and line: on rank 0, or on every rank for what only it read (its share)."""
    if problems and (every_rank or distributed.rank() == 0):
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        print(f"{name}: skipping {len(problems)} unusable rows:\n  {shown}", flush=True)
