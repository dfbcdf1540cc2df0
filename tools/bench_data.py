"""How fast audio becomes padded feature batches: x real time, per DataLoader worker and with N workers.

    python tools/bench_data.py --manifest ~/.cache/omni-router/demo-corpus/train.jsonl --workers 0,1,2

Caching is off and SpecAugment on, as in training on a large corpus; each setting reads the same utterances.
"x real time" is seconds of audio delivered per second of wall time. A profile of one process's stages
(decode + resample, log-mel, normalisation, SpecAugment, collate) follows.
"""
import argparse
import time
from pathlib import Path

import torch

from trainer.audio import load_audio
from trainer.config import DataConfig
from trainer.data import SpeechDataset, length_batches, loader, padding_fraction
from trainer.features import log_mel
from trainer.sources import read_sources
from trainer.text import Tokenizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--max_frames", type=int, default=12000, help="padded input frames per batch")
    p.add_argument("--utterances", type=int, default=600, help="how many utterances each setting reads")
    return p.parse_args()


def stage_profile(ds: SpeechDataset, n: int) -> dict:
    t = dict.fromkeys(("decode+resample", "log-mel", "normalise", "specaugment", "collate"), 0.0)
    items = []
    for u in ds.utts[:n]:
        t0 = time.perf_counter()
        wave = load_audio(u.audio, u.offset, u.duration if u.offset else 0.0)
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


def main():
    args = parse_args()
    torch.set_num_threads(1)
    utts, _ = read_sources(args.manifest, [], 60.0, strict=False)
    utts = utts[:args.utterances]
    tok_path = Path("/tmp/bench_data_tokenizer.model")
    tok = Tokenizer.train([u.text for u in utts], str(tok_path), 128)
    ds = SpeechDataset(utts, tok, DataConfig(cache_features=False), 80, train=True)
    batches = length_batches(utts, args.max_frames)
    audio_s = sum(u.duration for u in utts)
    print(f"{len(utts)} utterances, {audio_s / 60:.1f} min of audio, {len(batches)} batches of <= {args.max_frames} "
          f"padded frames, padding {100 * padding_fraction(utts, batches):.1f}%")
    print(f"{'workers':>7} {'wall s':>7} {'x real time':>12} {'x real time per process':>24}")
    for w in (int(x) for x in args.workers.split(",")):
        t0 = time.perf_counter()
        for _ in loader(ds, batches, w):
            pass
        wall = time.perf_counter() - t0
        print(f"{w:>7} {wall:7.1f} {audio_s / wall:12.0f} {audio_s / wall / max(w, 1):24.0f}")
    prof = stage_profile(ds, min(200, len(utts)))
    total = sum(prof.values())
    n_audio = sum(u.duration for u in utts[:min(200, len(utts))])
    print(f"one process, {min(200, len(utts))} utterances: {n_audio / total:.0f}x real time; where the time goes:")
    for k, v in prof.items():
        print(f"  {k:16} {1000 * v:8.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
