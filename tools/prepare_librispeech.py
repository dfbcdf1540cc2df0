"""A LibriSpeech-layout directory (SPEAKER/CHAPTER/*.trans.txt + .flac) to a NeMo JSON-lines manifest.

    python tools/prepare_librispeech.py /data/LibriSpeech/dev-clean data/dev-clean.jsonl

Audio paths are written relative to the manifest's folder when the audio lies below it, absolute otherwise;
durations are read from the FLAC headers, so nothing is decoded.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import soundfile as sf


def transcripts(root: Path):
    """(utterance id, text, audio path) for every line of every *.trans.txt below root, in sorted order."""
    files = sorted(root.glob("*/*/*.trans.txt"))
    if not files:
        raise FileNotFoundError(f"{root}: no SPEAKER/CHAPTER/*.trans.txt files; is this a LibriSpeech split folder?")
    for trans in files:
        for n, line in enumerate(trans.read_text().splitlines(), 1):
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            if not text.strip():
                raise ValueError(f"{trans}:{n}: expected 'UTTERANCE-ID TRANSCRIPT'")
            yield utt, text.strip(), trans.parent / f"{utt}.flac"


def prepare(root: str, manifest: str) -> int:
    out = Path(manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    rows = []
    for utt, text, audio in transcripts(Path(root)):
        if not audio.exists():
            raise FileNotFoundError(f"{audio}: listed in its .trans.txt but missing")
        path = audio.resolve()
        rel = os.path.relpath(path, base) if path.is_relative_to(base) else str(path)
        rows.append({"audio_filepath": rel, "duration": round(sf.info(str(path)).duration, 3), "text": text, "id": utt})
    tmp = out.with_suffix(out.suffix + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(out)  # a reader never sees half a manifest
    return len(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a LibriSpeech split folder, e.g. LibriSpeech/dev-clean")
    p.add_argument("manifest", help="output JSON-lines manifest")
    args = p.parse_args(argv)
    try:
        n = prepare(args.root, args.manifest)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.manifest}: {n} utterances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
