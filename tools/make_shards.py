"""Any source the trainer reads, written as Lhotse Shar shards: sequential tar files of FLAC audio beside
gzipped cut records, so a cluster reads a few large files in order instead of millions of small ones at random.

    python -m tools.make_shards --manifest train.jsonl --out shards/train --shard_size 1000
    python -m tools.make_shards --cuts libriheavy_cuts_small.jsonl.gz --cuts_root . --out shards/small
    deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json --train_shards shards/train ...

Each shard holds ``--shard_size`` utterances (one cut each, its audio cut out of long recordings and mixed to
16 kHz mono, the text as read); rows the trainer would skip are skipped here too, and named. Lhotse reads the
result with ``CutSet.from_shar(in_dir=...)``.
"""
import argparse
import io
import json
import sys
from pathlib import Path

import soundfile as sf

from trainer.config import HFSource
from trainer.data.audio import SAMPLE_RATE
from trainer.data.sources import DataError, load_utterance, read_sources


def make_shards(utts: list, out: str, shard_size: int = 1000) -> tuple[list[Path], list[str]]:
    """Write the utterances into ``out``; return (the cut files written, one line per utterance left out)."""
    from lhotse import Recording, SupervisionSegment
    from lhotse.shar import SharWriter
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    left_out = []
    with SharWriter(str(folder), fields={"recording": "flac"}, shard_size=shard_size) as writer:
        for i, u in enumerate(utts):
            try:
                wave = load_utterance(u).numpy()
            except Exception as e:  # unreadable audio of any kind: named and left out, as training would
                left_out.append(f"{u.origin}: audio unreadable ({e})")
                continue
            flac = io.BytesIO()
            sf.write(flac, wave, SAMPLE_RATE, format="FLAC")
            cut = Recording.from_bytes(flac.getvalue(), recording_id=f"{i:010d}").to_cut()
            cut.supervisions = [SupervisionSegment(cut.id, cut.recording_id, 0.0, cut.duration, text=u.text)]
            writer.write(cut)
    return sorted(folder.glob("cuts.*.jsonl.gz")), left_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", default=[], help="NeMo JSON-lines manifest (repeatable)")
    p.add_argument("--cuts", action="append", default=[], help="Lhotse cut set (repeatable)")
    p.add_argument("--cuts_root", default="", help="folder relative audio paths of cut sets start from")
    p.add_argument("--hf", action="append", default=[], type=json.loads,
                   help='Hugging Face dataset on disk, as in the config: \'{"path": ..., "kind": "saved"}\'')
    p.add_argument("--out", required=True, help="folder of the shards")
    p.add_argument("--shard_size", type=int, default=1000, help="utterances per shard")
    p.add_argument("--max_duration", type=float, default=float("inf"), help="longest utterance kept (seconds)")
    args = p.parse_args(argv)
    try:
        utts, problems = read_sources(args.manifest, [HFSource(**h) for h in args.hf], args.max_duration, False,
                                      cuts=args.cuts, cuts_root=args.cuts_root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files, left_out = make_shards(utts, args.out, args.shard_size)
    for line in problems + left_out:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{len(utts) - len(left_out)} utterances in {len(files)} shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
