"""Synthesise the embedded English corpus offline (espeak-ng, flite, festival; WordNet sentences).

    python tools/make_demo_corpus.py --out ~/.cache/omni-router/demo-corpus

Writes train/dev/test/test_ood manifests, those of the out-of-domain suite (ood_*: one condition changed each,
``trainer.data.corpus``) and 16 kHz FLAC. The trainer builds the same corpus on first use
from the config's data section; this tool builds one ahead of time or a larger one (its defaults are the
shipped configs' values, so the main job reuses what it builds).
"""
import argparse
import sys

from trainer.data.corpus import build_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train_sentences", type=int, default=8000)
    p.add_argument("--words", type=int, default=500,
                   help="speak only texts of the N most frequent words (0: all; phrases need a list)")
    p.add_argument("--text", choices=("sentences", "phrases"), default="phrases",
                   help="whole usage examples, or the runs of --words words within them")
    p.add_argument("--seed", type=int, default=1234, help="the trainer's default data.corpus.seed, so it reuses this")
    p.add_argument("--workers", type=int, default=0, help="0: one per core")
    args = p.parse_args(argv)
    try:
        manifests = build_corpus(args.out, args.train_sentences, args.seed, args.workers, args.words, args.text)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, path in manifests.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
