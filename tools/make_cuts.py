"""A NeMo manifest as a Lhotse cut set laid out like Libriheavy: utterances joined into long recordings (as
LibriLight's chapter files are), one cut per utterance at its offset into them, written by Lhotse itself. It is
the local stand-in of Libriheavy for trying the --train_cuts path without downloading 50k hours:

    python -m tools.make_cuts --manifest ~/.cache/omni-router/demo-corpus/train.jsonl --out cuts/train.jsonl.gz
    deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json --train_cuts cuts/train.jsonl.gz \\
        --dev_cuts cuts/dev.jsonl.gz --set data.cuts_root=cuts

Audio paths in the cut set are relative to the output folder (Libriheavy's are relative to its recipe folder),
hence ``data.cuts_root``. ``--whole`` keeps one cut per long recording, holding all its supervisions.
"""
import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from trainer.data.audio import SAMPLE_RATE, load_audio
from trainer.data.sources import read_manifest, set_name

GAP = 0.25  # seconds of silence between joined utterances


def make_cuts(manifest: str, out: str, join: int = 4, whole: bool = False) -> Path:
    """Write ``out`` (.jsonl.gz) and its recordings (``<out folder>/recordings/``); return the cut set's path."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
    utts, _ = read_manifest(manifest, float("inf"))
    out = Path(out)
    folder = out.parent / "recordings"
    folder.mkdir(parents=True, exist_ok=True)
    name = set_name(str(out))
    recordings, supervisions = [], []
    for k in range(0, len(utts), join):
        waves, start = [], 0.0
        rec_id = f"{name}-{k // join:05d}"
        for j, u in enumerate(utts[k:k + join]):
            wave = load_audio(u.audio).numpy()
            supervisions.append(SupervisionSegment(f"{rec_id}-{j}", rec_id, start, len(wave) / SAMPLE_RATE,
                                                   channel=0, text=u.text))
            waves += [wave, np.zeros(int(GAP * SAMPLE_RATE), dtype=np.float32)]
            start += (len(wave) + len(waves[-1])) / SAMPLE_RATE
        path = folder / f"{rec_id}.flac"
        sf.write(path, np.concatenate(waves), SAMPLE_RATE)
        recordings.append(Recording.from_file(path, recording_id=rec_id, relative_path_depth=2))
    cuts = CutSet.from_manifests(RecordingSet.from_recordings(recordings),
                                 SupervisionSet.from_segments(supervisions))
    if not whole:
        cuts = cuts.trim_to_supervisions(keep_overlapping=False)
    cuts.to_file(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="NeMo JSON-lines manifest")
    p.add_argument("--out", required=True, help="cut set to write (.jsonl.gz)")
    p.add_argument("--join", type=int, default=4, help="utterances per long recording")
    p.add_argument("--whole", action="store_true", help="one cut per recording, with all its supervisions")
    args = p.parse_args(argv)
    print(make_cuts(args.manifest, args.out, args.join, args.whole))


if __name__ == "__main__":
    main()
