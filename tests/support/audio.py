"""Test audio: tones as tensors at the trainer's sample rate (for the effects), as samples to write into audio
files of any rate, their share of a frequency band, and manifests of such files."""
import json
import math
from pathlib import Path

import numpy as np
import torch

from trainer.data.audio import SAMPLE_RATE

SECOND = torch.arange(SAMPLE_RATE) / SAMPLE_RATE


def tone(hz: float) -> torch.Tensor:
    """One second of a sine of ``hz`` at 0.3 of full scale, at SAMPLE_RATE."""
    return 0.3 * torch.sin(2 * math.pi * hz * SECOND)


def band_share(wave: torch.Tensor, low: float, high: float) -> float:
    """The share of the wave's power between ``low`` and ``high`` Hz."""
    power = torch.fft.rfft(wave).abs().pow(2)
    f = torch.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    return float(power[(f >= low) & (f < high)].sum() / power.sum())


def tone_samples(seconds=1.0, rate=16000, channels=1) -> np.ndarray:
    """A 440 Hz sine at 0.3 of full scale as float32 samples to write into a file: [samples], or [samples,
    channels] with the same sine in each channel."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t).astype("float32")
    return np.stack([wave] * channels, 1) if channels > 1 else wave


def write_manifest(path: Path, rows) -> str:
    """A manifest at ``path``: each row a dict (written as JSON) or a line as it is."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)
