"""Greedy CTC decoding and WER scored with jiwer on normalised text."""
import jiwer
import torch

from trainer.model import BLANK
from trainer.text import normalize


def greedy_labels(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best label per frame, repeats merged, blanks removed."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(row[:n]).tolist()
        out.append([t for t in seq if t != BLANK])
    return out


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus-level WER in percent; an empty hypothesis counts every reference word as deleted."""
    refs = [normalize(r) for r in refs]
    hyps = [normalize(h) for h in hyps]
    return 100.0 * jiwer.wer(refs, hyps)
