"""Global mean and variance of the log-mel features of training manifests, for data.global_cmvn.

    python tools/compute_cmvn.py --manifest data/train.jsonl --out data/cmvn.json [--max_utterances 2000]

Point ``omni_router.data.global_cmvn`` at the output; the trainer copies the config (and so this path) into
every checkpoint. Unusable rows are skipped as in training.
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch

from trainer.data.audio import load_audio
from trainer.data.features import log_mel
from trainer.data.sources import DataError, read_sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n_mels", type=int, default=80)
    p.add_argument("--max_utterances", type=int, default=2000, help="a seeded random sample of this many")
    args = p.parse_args(argv)
    try:
        utts, _ = read_sources(args.manifest, [], float("inf"), strict=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    utts = random.Random(0).sample(utts, min(len(utts), args.max_utterances))
    total, sq, n = torch.zeros(args.n_mels, dtype=torch.float64), torch.zeros(args.n_mels, dtype=torch.float64), 0
    for u in utts:
        f = log_mel(load_audio(u.audio, u.offset, u.duration if u.offset else 0.0), args.n_mels).double()
        total, sq, n = total + f.sum(0), sq + f.square().sum(0), n + f.shape[0]
    if n == 0:
        print("error: no frames", file=sys.stderr)
        return 2
    mean = total / n
    std = (sq / n - mean.square()).clamp(min=1e-10).sqrt()
    Path(args.out).write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist(), "frames": n}))
    print(f"{args.out}: statistics of {n} frames from {len(utts)} utterances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
