"""Transcribe audio files or a manifest with a consolidated model (no DeepSpeed engine), batched.

    python tools/transcribe.py --model models/omni a.flac b.wav
    python tools/transcribe.py --model models/omni --manifest test.jsonl --out hyps.jsonl --device cuda
    python tools/transcribe.py --model models/omni --decoder beam --lm lm/lm.arpa a.flac
    python tools/transcribe.py --model models/omni --roster 4 --roster_temperature 0.5 a.flac

Greedy CTC unless ``--decoder beam`` (``--beam``, a word n-gram with ``--lm``, ``--lm_weight``, ``--word_score``:
``trainer/beam.py``); ``--roster K`` runs K routes per utterance in one batch and averages their posteriors
(``trainer/model/routing.py``'s ``Roster``; ``--seed`` fixes the draws).

Prints ``path<TAB>text`` per utterance; ``--out`` writes JSON lines (audio_filepath, text; the reference as
``ref`` when the manifest has one). Prints its throughput (seconds of audio per second) on stderr; set
``OMP_NUM_THREADS`` for the number of CPU threads.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from trainer.data.sources import DataError, read_sources
from trainer.export import CheckpointError
from trainer.inference import Recognizer, decoding_arguments, decoding_settings, audio_utterances


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio", nargs="*", help="audio files (wav, flac, ogg)")
    p.add_argument("--model", required=True, help="a folder written by tools/consolidate_checkpoint.py")
    p.add_argument("--manifest", action="append", default=[], help="NeMo JSON-lines manifest (repeatable)")
    p.add_argument("--out", help="JSON-lines output file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max_frames", type=int, default=None,
                   help="padded 10 ms frames per batch (default: one rank's micro-batch of the run; "
                        "no route is dropped, so it changes no result)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    decoding_arguments(p)
    args = p.parse_args(argv)
    if not args.audio and not args.manifest:
        p.error("give audio files or --manifest")
    try:
        recognizer = Recognizer(args.model, args.device, *decoding_settings(args))
        utts = audio_utterances(args.audio)
        if args.manifest:
            utts += read_sources(args.manifest, [], float("inf"), strict=False)[0]
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    texts = recognizer.transcribe(utts, args.max_frames, args.workers)
    elapsed = time.perf_counter() - started
    audio_s = sum(u.duration for i, u in enumerate(utts) if i in texts)
    print(f"{audio_s:.1f} s of audio in {elapsed:.1f} s: {audio_s / max(elapsed, 1e-9):.1f} s of audio per second "
          f"({torch.get_num_threads()} thread(s), {args.device})", file=sys.stderr)
    rows = [{"audio_filepath": u.audio, "text": texts[i], **({"ref": u.text} if u.text else {})}
            for i, u in enumerate(utts) if i in texts]
    for row in rows:
        print(f"{row['audio_filepath']}\t{row['text']}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = len(utts) - len(rows)
    if failed:
        print(f"{failed} of {len(utts)} utterances could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
