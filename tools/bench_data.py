"""How fast audio becomes padded feature batches, from one file per utterance and from Lhotse Shar shards
(sequential tars), side by side: x real time, per DataLoader worker and with N workers.

    python tools/bench_data.py --manifest ~/.cache/omni-router/demo-corpus/train.jsonl --workers 0,1,2

Caching is off and SpecAugment on, as in training on a large corpus; each setting reads the same utterances
(the shards are written from them first, into a temporary folder, unless --shards names a folder). The files
are read in the trainer's length-bucketed order, the shards in its shard-by-shard order. "x real time" is
seconds of audio delivered per second of wall time. A profile of one process's stages (decode + resample,
log-mel, normalisation, SpecAugment, collate) follows.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from tools.make_shards import make_shards
from trainer.config import DataConfig
from trainer.data import ShardSet, SpeechDataset, length_batches, loader, padding_fraction
from trainer.features import log_mel
from trainer.sources import load_utterance, read_sources
from trainer.text import Tokenizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--max_frames", type=int, default=12000, help="padded input frames per batch")
    p.add_argument("--utterances", type=int, default=600, help="how many utterances each setting reads")
    p.add_argument("--shards", default="", help="a Shar folder of the same utterances (default: written here)")
    p.add_argument("--shard_size", type=int, default=100, help="utterances per shard when written here")
    return p.parse_args()


def stage_profile(ds: SpeechDataset, n: int) -> dict:
    t = dict.fromkeys(("decode+resample", "log-mel", "normalise", "specaugment", "collate"), 0.0)
    items = []
    for u in ds.utts[:n]:
        t0 = time.perf_counter()
        wave = load_utterance(u)
        t1 = time.perf_counter()
        feats = log_mel(wave, ds.n_mels)
        t2 = time.perf_counter()
        feats = ds.normalize(feats)
        t3 = time.perf_counter()
        feats = ds.augment(feats)
        t4 = time.perf_counter()
        items.append((feats, torch.tensor(ds.tokenizer.encode(u.text)), 0))
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k] += dt
    t0 = time.perf_counter()
    for i in range(0, len(items), 16):
        ds.collate(items[i:i + 16])
    t["collate"] = time.perf_counter() - t0
    return t


def throughput(ds: SpeechDataset, batches: list, workers: int) -> float:
    """Seconds of audio delivered per second of wall time; a batch holds indices into ``ds.utts``, or (key,
    utterance) pairs read from shards."""
    t0 = time.perf_counter()
    for _ in loader(ds, batches, workers):
        pass
    seconds = sum((i[1] if isinstance(i, tuple) else ds.utts[i]).duration for b in batches for i in b)
    return seconds / (time.perf_counter() - t0)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    utts, _ = read_sources(args.manifest, [], 60.0, strict=False)
    utts = utts[:args.utterances]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.shards:
            make_shards(utts, tmp, args.shard_size)
        shards = ShardSet([args.shards or tmp], 60.0)
        tok = Tokenizer.train([u.text for u in utts], str(Path(tmp) / "tokenizer.model"), 128)
        config = DataConfig(cache_features=False)
        paths = {"files": (SpeechDataset(utts, tok, config, 80, train=True), length_batches(utts, args.max_frames)),
                 "shards": (SpeechDataset([], tok, config, 80, train=True, shards=shards),
                            list(shards.batches(args.max_frames, 0, 0, 0, 1)))}
        ds, batches = paths["files"]
        print(f"{len(utts)} utterances, {sum(u.duration for u in utts) / 60:.1f} min of audio, {len(batches)} "
              f"batches of <= {args.max_frames} padded frames, padding {100 * padding_fraction(utts, batches):.1f}%; "
              f"{sum(map(len, paths['shards'][1]))} of them in {len(shards.shards)} shards")
        print(f"{'workers':>7} {'files x real time':>18} {'shards x real time':>19} {'shards / files':>15}")
        for w in (int(x) for x in args.workers.split(",")):
            rates = {name: throughput(d, b, w) for name, (d, b) in paths.items()}
            print(f"{w:>7} {rates['files']:18.0f} {rates['shards']:19.0f} {rates['shards'] / rates['files']:15.2f}")
    n = min(200, len(utts))
    prof = stage_profile(ds, n)
    total = sum(prof.values())
    print(f"one process, {n} utterances: {sum(u.duration for u in utts[:n]) / total:.0f}x real time; "
          "where the time goes:")
    for k, v in prof.items():
        print(f"  {k:16} {1000 * v:8.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
