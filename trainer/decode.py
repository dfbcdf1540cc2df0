"""Greedy CTC decoding, and WER and CER scored with jiwer on normalised text."""
import jiwer
import torch

from trainer.data.text import normalize
from trainer.model.ctc import BLANK


def greedy_labels(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best label per frame, repeats merged, blanks removed."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(row[:n]).tolist()
        out.append([t for t in seq if t != BLANK])
    return out


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    """Corpus-level {"wer", "cer"} in percent; an empty hypothesis counts every reference word (character) as
    deleted. CER counts spaces as characters, as jiwer does: at small scale it shows what WER hides."""
    refs = [normalize(r) for r in refs]
    hyps = [normalize(h) for h in hyps]
    return {"wer": 100.0 * jiwer.wer(refs, hyps), "cer": 100.0 * jiwer.cer(refs, hyps)}


def utterance_errors(refs: list[str], hyps: list[str]) -> list[tuple[int, int]]:
    """Per utterance, (word errors, reference words) on normalised text: their sums give ``error_rates``' WER,
    and a paired bootstrap resamples them (``tools/paired_bootstrap.py``)."""
    out = []
    for ref, hyp in zip(refs, hyps):
        o = jiwer.process_words(normalize(ref), normalize(hyp))
        out.append((o.substitutions + o.deletions + o.insertions, o.substitutions + o.deletions + o.hits))
    return out
