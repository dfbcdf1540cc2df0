"""Waveforms to normalised 80-bin log-mel frames (25 ms window, 10 ms hop), and SpecAugment for training."""
import json

import torch
import torchaudio

from trainer.audio import SAMPLE_RATE
from trainer.config import SpecAugmentConfig


def log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[T, n_mels] Kaldi-compatible log-mel filterbank of a 16 kHz waveform."""
    return torchaudio.compliance.kaldi.fbank(wave.unsqueeze(0) * 32768.0, num_mel_bins=n_mels,
                                             sample_frequency=SAMPLE_RATE, dither=0.0)


def speed_perturb(wave: torch.Tensor, factor: float) -> torch.Tensor:
    """Play ``factor`` times faster (pitch moves too, as Kaldi's speed perturbation does)."""
    if factor == 1.0:
        return wave
    return torchaudio.functional.resample(wave, int(round(SAMPLE_RATE * factor)), SAMPLE_RATE)


class Normalizer:
    """Global mean/variance from a stats file (tools/compute_cmvn.py), else per utterance."""

    def __init__(self, stats_path: str = ""):
        self.mean = self.std = None
        if stats_path:
            stats = json.loads(open(stats_path).read())
            self.mean, self.std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return (feats - feats.mean(0)) / feats.std(0).clamp(min=1e-5)
        return (feats - self.mean) / self.std


class SpecAugment:
    """torchaudio's frequency and time masks (mask value 0, the normalised mean); a time mask covers at
    most a fifth of the utterance, so short utterances keep most of their frames."""

    def __init__(self, cfg: SpecAugmentConfig):
        self.masks = [torchaudio.transforms.FrequencyMasking(cfg.freq_width)] * cfg.freq_masks + \
                     [torchaudio.transforms.TimeMasking(cfg.time_width, p=0.2)] * cfg.time_masks

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.t().unsqueeze(0)  # [1, F, T], the layout torchaudio's masks expect
        for mask in self.masks:
            x = mask(x)
        return x[0].t()
