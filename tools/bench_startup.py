"""Start-up time and memory against corpus size: a 2-rank run of a tiny model from N training rows, to its first
optimizer step, for Lhotse Shar shards (read lazily) and for one NeMo manifest (read whole), side by side.

    python -m tools.bench_startup --manifest ~/.cache/omni-router/demo-corpus/train.jsonl \\
        --dev_manifest ~/.cache/omni-router/demo-corpus/dev.jsonl --rows 10000,1000000

The rows are copies of real ones: the first ``--shard_size`` utterances of the manifest are written as one real
shard, and a set of N rows holds N / shard_size copies of its cut records, each beside a link to its tar (the
manifest: the same utterances' lines, repeated). Reading records, tokenising and holding the index cost what N
distinct rows cost; the audio is not copied. Each run is the real launcher (``deepspeed --num_gpus 2``, gloo
on CPU); "first step" is the wall time from launch to the log line of step 1, "peak RSS" the largest resident
set of any one process of the run (a rank: GNU time's maximum over the launcher and the processes it waited
for). The tokenizer is trained on at most ``--tokenizer_sentences`` texts.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from tools.make_shards import make_shards
from trainer.data.sources import read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.n_mels": 80, "model.frame_stacking": 4, "model.d_model": 32, "model.num_layers": 2,
        "model.num_heads": 2, "model.ffn_dim": 64, "data.batch_frames": 4000, "data.vocab_size": 64,
        "data.cache_features": False, "run.max_steps": 1, "run.log_every": 1, "run.eval_every": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="the rows copied (NeMo manifest of real audio)")
    p.add_argument("--dev_manifest", required=True, help="a small dev set, the same for every run")
    p.add_argument("--rows", default="10000,1000000", help="comma-separated training set sizes")
    p.add_argument("--shard_size", type=int, default=1000, help="utterances per shard")
    p.add_argument("--tokenizer_sentences", type=int, default=10000, help="data.tokenizer_sentences of the runs")
    p.add_argument("--sources", default="shards,manifest", help="which sources to measure")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all settings; medians are reported")
    p.add_argument("--port", type=int, default=29611)
    return p.parse_args(argv)


def shard_copies(base: Path, folder: Path, copies: int):
    """``copies`` shards in ``folder``, each a copy of ``base``'s one cut file beside a link to its tar."""
    folder.mkdir(parents=True)
    cuts, tar = base / "cuts.000000.jsonl.gz", base / "recording.000000.tar"
    for i in range(copies):
        shutil.copyfile(cuts, folder / f"cuts.{i:06d}.jsonl.gz")
        os.symlink(tar, folder / f"recording.{i:06d}.tar")


def manifest_copies(source: Path, path: Path, rows: int):
    """A manifest of ``rows`` lines, the source's lines repeated (absolute audio paths)."""
    lines = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        row["audio_filepath"] = str(source.parent / row["audio_filepath"])
        lines.append(json.dumps(row))
    with open(path, "w") as f:
        for i in range(rows):
            f.write(lines[i % len(lines)] + "\n")


def first_step(flags: list, out: Path, args) -> tuple[float, float]:
    """(seconds from launch to step 1's log line, peak RSS in GB of the largest process) of one run."""
    sets = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "data.tokenizer_sentences": args.tokenizer_sentences}.items()]
    cmd = ["/usr/bin/time", "-f", "PEAK_RSS_KB %M", str(Path(sys.executable).with_name("deepspeed")),
           "--num_gpus", "2", "--master_port", str(args.port), "trainer/main.py",
           "--deepspeed_config", "ds_configs/omni.json", "--output_dir", str(out),
           "--dev_manifest", args.dev_manifest, *flags, *[a for s in sets for a in ("--set", s)]]
    started, reached, peak = time.perf_counter(), None, None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:  # the run's own log, read as it is written
        tail = (tail + [line])[-30:]
        if reached is None and "step 1/1 " in line:
            reached = time.perf_counter() - started
        if line.startswith("PEAK_RSS_KB"):
            peak = int(line.split()[1]) / 1e6
    if proc.wait() != 0 or reached is None or peak is None:
        raise RuntimeError(f"run failed: {' '.join(cmd)}\n{''.join(tail)}")
    return reached, peak


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.rows.split(",")]
    utts, _ = read_manifest(args.manifest, 20.0)
    if len(utts) < args.shard_size:
        print(f"error: {args.manifest} has {len(utts)} usable rows, fewer than --shard_size", file=sys.stderr)
        return 2
    runs = {}  # (source, rows) -> [(seconds, peak GB)], the settings taken in turn, ``--repeats`` rounds
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_shards(utts[:args.shard_size], str(tmp / "base"), args.shard_size)
        flags = {}
        for source in args.sources.split(","):
            for n in sizes:
                if source == "shards":
                    shard_copies(tmp / "base", tmp / f"shards{n}", n // args.shard_size)
                    flags[source, n] = ["--train_shards", str(tmp / f"shards{n}")]
                else:
                    manifest_copies(Path(args.manifest), tmp / f"train{n}.jsonl", n)
                    flags[source, n] = ["--train_manifest", str(tmp / f"train{n}.jsonl")]
        for r in range(args.repeats):
            for (source, n), f in flags.items():
                seconds, peak = first_step(f, tmp / f"run-{source}{n}-{r}", args)
                runs.setdefault((source, n), []).append((seconds, peak))
                print(f"{source:>8} {n:>9,} rows: first step after {seconds:6.1f} s, peak RSS {peak:5.2f} GB",
                      flush=True)
    print(f"\nmedian of {args.repeats} (range)")
    print(f"{'source':>8} {'rows':>9} {'first step s':>18} {'peak RSS GB':>18} {'time / smallest':>16} "
          f"{'RSS / smallest':>15}")
    for (source, n), rows in runs.items():
        base = runs[source, sizes[0]]
        t, m = ([x[k] for x in rows] for k in (0, 1))
        print(f"{source:>8} {n:>9,} {median(t):7.1f} ({min(t):.1f}-{max(t):.1f}) {median(m):7.2f} "
              f"({min(m):.2f}-{max(m):.2f}) {median(t) / median(x[0] for x in base):16.2f} "
              f"{median(m) / median(x[1] for x in base):15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
