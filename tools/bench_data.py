"""How fast audio becomes batches, with the features computed in the loader or left to the device
(``data.features_on``), from one file per utterance and from Lhotse Shar shards (sequential tars), side by side:
x real time, per DataLoader worker and with N workers.

    python tools/bench_data.py --manifest ~/.cache/omni-router/demo-corpus/train.jsonl --workers 0,1,2

Caching is off and SpecAugment on (the default masks, 2 frequency and 2 time), as in training on a large corpus;
every setting reads the same utterances (the shards are written from them first, into a temporary folder, unless
--shards names a folder). The files are read in the trainer's length-bucketed order, the shards in its
shard-by-shard order. "x real time" is seconds of audio delivered per second of wall time. Then the throughput of
the device's part in device mode (log-mel, normalisation and masks of the same batches, ``SpeechDataset.on_device``)
on the CPU with one thread and on CUDA when there is one, and a profile of one loader process's stages in loader
mode (decode + resample, log-mel, normalisation, mask draw, mask application, collate).
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from tools.make_shards import make_shards
from trainer.config import DataConfig
from trainer.data.audio import SAMPLE_RATE
from trainer.data.batches import ShardSet, SpeechDataset, length_batches, loader, padding_fraction
from trainer.data.features import apply_masks, log_mel
from trainer.data.sources import load_utterance, read_sources
from trainer.data.text import Tokenizer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True)
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--max_frames", type=int, default=12000, help="padded input frames per batch")
    p.add_argument("--utterances", type=int, default=600, help="how many utterances each setting reads")
    p.add_argument("--shards", default="", help="a Shar folder of the same utterances (default: written here)")
    p.add_argument("--shard_size", type=int, default=100, help="utterances per shard when written here")
    p.add_argument("--repeats", type=int, default=3, help="rounds of every setting; the best is shown (a loaded "
                                                          "machine slows some rounds)")
    return p.parse_args()


def stage_profile(ds: SpeechDataset, n: int) -> dict:
    """Seconds per stage of a loader-mode dataset over its first ``n`` utterances."""
    t = dict.fromkeys(("decode+resample", "log-mel", "normalise", "mask draw", "mask apply", "collate"), 0.0)
    f, items = ds.features, []
    for i, u in enumerate(ds.utts[:n]):
        t0 = time.perf_counter()
        wave = load_utterance(u)
        t1 = time.perf_counter()
        feats = log_mel(wave, ds.n_mels)
        t2 = time.perf_counter()
        feats = f.normalize(feats[None], torch.tensor([len(feats)]))[0]
        t3 = time.perf_counter()
        masks = f.augment.draw(len(feats), i)
        t4 = time.perf_counter()
        feats = apply_masks(feats[None], *f.augment.tensors([masks]))[0]
        t5 = time.perf_counter()
        items.append((feats, torch.tensor(ds.tokenizer.encode(u.text)), i, masks))
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
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


def device_throughput(ds: SpeechDataset, batches: list, device: str) -> float:
    """Seconds of audio per second that ``ds.on_device`` turns into features on ``device`` (batches collated in
    device mode; the first is a warm-up, outside the timing)."""
    ds.on_device(batches[0], device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        ds.on_device(b, device)["feats"].sum()
    sync()
    return sum(float(b["wave_lengths"].sum()) for b in batches) / SAMPLE_RATE / (time.perf_counter() - t0)


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
        loader_cfg, device_cfg = (DataConfig(cache_features=False, features_on=on) for on in ("loader", "device"))
        batches = length_batches(utts, args.max_frames)
        paths = {"loader": (SpeechDataset(utts, tok, loader_cfg, 80, train=True), batches),
                 "device": (SpeechDataset(utts, tok, device_cfg, 80, train=True), batches),
                 "shards": (SpeechDataset([], tok, device_cfg, 80, train=True, shards=shards),
                            list(shards.batches(args.max_frames, 0, 0, 0, 1)))}
        print(f"{len(utts)} utterances, {sum(u.duration for u in utts) / 60:.1f} min of audio, {len(batches)} "
              f"batches of <= {args.max_frames} padded frames, padding {100 * padding_fraction(utts, batches):.1f}%; "
              f"{sum(map(len, paths['shards'][1]))} of them in {len(shards.shards)} shards")
        print("x real time delivered by the loader; features computed in the loader (loader) or left to the "
              "device (device, from files and from shards)")
        print(f"{'workers':>7} {'loader':>8} {'device':>8} {'device / loader':>16} {'device, shards':>15} "
              f"{'shards / files':>15}")
        for w in (int(x) for x in args.workers.split(",")):
            r = {name: max(throughput(d, b, w) for _ in range(args.repeats)) for name, (d, b) in paths.items()}
            print(f"{w:>7} {r['loader']:8.0f} {r['device']:8.0f} {r['device'] / r['loader']:16.2f} "
                  f"{r['shards']:15.0f} {r['shards'] / r['device']:15.2f}")
    ds = paths["device"][0]
    collated = list(loader(ds, batches, 0))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("the device's part in device mode (log-mel, normalisation, masks of whole batches): " + ", ".join(
        f"{max(device_throughput(ds, collated, d) for _ in range(args.repeats)):.0f}x real time on {d}" +
        (" (one thread)" if d == "cpu" else "") for d in devices))
    n = min(200, len(utts))
    prof = min((stage_profile(paths["loader"][0], n) for _ in range(args.repeats)), key=lambda p: sum(p.values()))
    total = sum(prof.values())
    print(f"one loader-mode process, {n} utterances: {sum(u.duration for u in utts[:n]) / total:.0f}x real time; "
          "where the time goes:")
    for k, v in prof.items():
        print(f"  {k:16} {1000 * v:8.1f} ms  {100 * v / total:5.1f}%")


if __name__ == "__main__":
    main()
