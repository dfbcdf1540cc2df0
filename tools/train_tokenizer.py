"""Train the sentencepiece word-piece model on the text of training manifests.

    python tools/train_tokenizer.py --manifest data/train.jsonl --vocab_size 4096 --out runs/x/tokenizer.model

The text goes through the same normaliser that prepares training targets and WER scoring. The trainer does
this itself on first use (into OUTPUT_DIR/tokenizer.model); use this tool to share one tokenizer between runs.
"""
import argparse
import sys

from trainer.data.sources import DataError, read_sources
from trainer.data.text import Tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", required=True, help="training manifest (repeatable)")
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--model_type", choices=["unigram", "bpe"], default="unigram")
    p.add_argument("--out", required=True, help="output path ending in .model")
    args = p.parse_args(argv)
    if not args.out.endswith(".model"):
        p.error("--out must end in .model")
    try:
        texts = [u.text for u in read_sources(args.manifest, [], float("inf"), strict=False)[0]]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = Tokenizer.train(texts, args.out, args.vocab_size, args.model_type)
    print(f"{args.out}: {tok.vocab_size} pieces from {len(texts)} transcripts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
