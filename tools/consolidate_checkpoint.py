"""A DeepSpeed MoE checkpoint -> one self-contained model folder, and optionally a re-sharded DeepSpeed checkpoint.

    python tools/consolidate_checkpoint.py runs/omni --out models/omni
    python tools/consolidate_checkpoint.py runs/omni --average 5 --out models/omni-avg5
    python tools/consolidate_checkpoint.py runs/omni --average_best 5 --out models/omni-best5
    python tools/consolidate_checkpoint.py runs/omni/checkpoints/step2200 --ep_size 8 --to_deepspeed runs/omni-ep8

The source is a run's output folder (its newest verified checkpoint), a ``checkpoints`` folder or one ``stepN``
folder, written with any ep_size, ZeRO stage 1 or 2, fp32 or bf16. ``--out`` writes model.safetensors (fp32:
non-expert weights, every expert by global id, the shared router once), config.json and the tokenizer, for
tools/transcribe.py, tools/evaluate.py and tools/analyze_routing.py. ``--to_deepspeed`` writes a run folder the
trainer continues from with ``--output_dir`` at the new ep_size (weights only: the optimizer starts afresh).
DeepSpeed's zero_to_fp32 cannot do this for MoE: it does not read the per-expert files.

``--average N`` writes the mean of the N newest verified checkpoints of a run, ``--average_best N`` of the N with
the lowest mean dev WER in their records (saved at evaluations; the run keeps ``run.keep_last`` newest and
``run.keep_best`` best): their fp32 master weights (``trainer/averaging.py``); checkpoints of different models
are refused.
"""
import argparse
import sys

from trainer.averaging import consolidate_average
from trainer.export import CheckpointError, consolidate, to_deepspeed
from trainer.runtime.integrity import UnsafeFile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, checkpoints folder or stepN folder")
    p.add_argument("--out", help="consolidated model folder to write")
    p.add_argument("--to_deepspeed", help="run folder to write a DeepSpeed checkpoint into")
    p.add_argument("--ep_size", type=int, default=1, help="expert-parallel size of --to_deepspeed")
    average = p.add_mutually_exclusive_group()
    average.add_argument("--average", type=int, metavar="N", help="--out: the mean of the N newest checkpoints")
    average.add_argument("--average_best", type=int, metavar="N",
                         help="--out: the mean of the N checkpoints with the lowest dev WER")
    args = p.parse_args(argv)
    if not args.out and not args.to_deepspeed:
        p.error("nothing to do: give --out, --to_deepspeed or both")
    n = args.average or args.average_best
    if n is not None and (n < 1 or not args.out or args.to_deepspeed):
        p.error("--average and --average_best take N >= 1 and write --out (alone)")
    try:
        if args.out and n:
            by = "newest" if args.average else "best"
            print(f"average of the {n} {by} checkpoints: {consolidate_average(args.checkpoint, args.out, n, by)}")
        elif args.out:
            print(f"consolidated model: {consolidate(args.checkpoint, args.out)}")
        if args.to_deepspeed:
            tag = to_deepspeed(args.checkpoint, args.ep_size, args.to_deepspeed)
            print(f"DeepSpeed checkpoint for ep_size {args.ep_size}: {tag}")
    except (CheckpointError, UnsafeFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
