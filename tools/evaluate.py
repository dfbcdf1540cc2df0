"""WER and CER of consolidated models on test sets, per set and the unweighted average: Markdown and CSV tables.

    python tools/evaluate.py --model dense=models/dense --model switch=models/switch --model omni=models/omni \\
        --test clean=test_clean.jsonl --test other=test_other.jsonl --out results/wer
    python tools/evaluate.py --model omni=models/omni --test dev.jsonl --decoder beam --lm lm/lm.arpa \\
        --out results/lm

A test set is a NeMo manifest or a Lhotse cut set (e.g. libriheavy_cuts_test_clean.jsonl.gz, with --cuts_root).
One row per model, one WER and one CER column per test set, then the averages, as in the paper's tables
(CER beside it: at small scale it is the informative one); PREFIX.json adds the counts, the seconds each
model took per set and each utterance's (word errors, reference words), for tools/paired_bootstrap.py. Scored
with jiwer on the trainer's own text normaliser; an utterance whose audio cannot be read is left out and
counted. The decoding flags are tools/transcribe.py's (``--decoder beam``, ``--lm``, ``--roster``, ...).
"""
import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Optional

from trainer.data.sources import DataError, read_test_set, set_name
from trainer.decode import error_rates, utterance_errors
from trainer.export import CheckpointError
from trainer.inference import Recognizer, decoding_arguments, decoding_settings


def named(value: str) -> tuple[str, str]:
    """NAME=PATH, or PATH named after its file or folder (less .gz, .jsonl, .json)."""
    name, sep, path = value.partition("=")
    return (name, path) if sep else (set_name(value), value)


def score(recognizer: Recognizer, utts: list, max_frames: Optional[int]) -> dict:
    """WER, CER and counts of one model on one test set, and each utterance's (word errors, reference words)
    keyed by its index in ``utts`` (what a paired comparison of two models resamples)."""
    started = time.perf_counter()
    texts = recognizer.transcribe(utts, max_frames)
    seconds = time.perf_counter() - started
    refs = [utts[i].text for i in sorted(texts)]
    hyps = [texts[i] for i in sorted(texts)]
    rates = error_rates(refs, hyps) if refs else {"wer": float("nan"), "cer": float("nan")}
    return {**rates, "utterances": len(texts), "unreadable": len(utts) - len(texts), "seconds": seconds,
            "audio_seconds": sum(utts[i].duration for i in texts),
            "utterance_errors": {str(i): e for i, e in zip(sorted(texts), utterance_errors(refs, hyps))}}


def tables(results: dict, sets: list[str]) -> tuple[str, list[list]]:
    """(Markdown, CSV rows): WER then CER in percent per set, and the unweighted average of each."""
    header = ["model", *(f"{s} {m}" for m in ("WER", "CER") for s in sets), "average WER", "average CER"]
    rows = []
    for model, per_set in results.items():
        rates = {m: [per_set[s][m] for s in sets] for m in ("wer", "cer")}
        rows.append([model, *(f"{x:.2f}" for m in ("wer", "cer") for x in rates[m]),
                     *(f"{sum(rates[m]) / len(sets):.2f}" for m in ("wer", "cer"))])
    md = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])
    return md + "\n", [header, *rows]


def output_paths(prefix: str) -> dict:
    """{".md", ".csv", ".json": path} of an output prefix; dots in it stay (``w0.5`` gives ``w0.5.md``), and a prefix
    that already ends in one of the three suffixes loses it."""
    p = Path(prefix)
    if p.suffix in (".md", ".csv", ".json"):
        p = p.with_suffix("")
    return {ext: p.with_name(p.name + ext) for ext in (".md", ".csv", ".json")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, type=named, help="[NAME=]consolidated folder")
    p.add_argument("--test", action="append", required=True, type=named,
                   help="[NAME=]manifest or Lhotse cut set (repeatable)")
    p.add_argument("--cuts_root", default="", help="folder relative audio paths of cut sets start from")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.md and PREFIX.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_frames", type=int, default=None,
                   help="padded 10 ms frames per batch (default: one rank's micro-batch of the run; "
                        "no route is dropped, so it changes no result)")
    decoding_arguments(p)
    args = p.parse_args(argv)
    try:
        sets = {name: read_test_set(path, args.cuts_root) for name, path in args.test}
        settings = decoding_settings(args)
        recognizers = {name: Recognizer(path, args.device, *settings) for name, path in args.model}
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {m: {s: score(r, utts, args.max_frames) for s, utts in sets.items()} for m, r in recognizers.items()}
    for m, per_set in results.items():
        for s, r in per_set.items():
            if r["unreadable"]:
                print(f"{m} on {s}: {r['unreadable']} utterances unreadable, left out", file=sys.stderr)
    md, rows = tables(results, list(sets))
    paths = output_paths(args.out)
    paths[".md"].parent.mkdir(parents=True, exist_ok=True)
    paths[".md"].write_text(md)
    with open(paths[".csv"], "w", newline="") as f:
        csv.writer(f).writerows(rows)
    paths[".json"].write_text(json.dumps(results))
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
