"""Audio to 16 kHz mono float32 with soundfile and torchaudio (no torchcodec, no ffmpeg)."""
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000


def load_audio(source, offset: float = 0.0, duration: float = 0.0) -> torch.Tensor:
    """A path or file object soundfile reads (wav, flac, ogg, any rate and channel count) -> [samples]."""
    with sf.SoundFile(source) as f:
        rate = f.samplerate
        if offset > 0:
            f.seek(int(round(offset * rate)))
        data = f.read(int(round(duration * rate)) if duration > 0 else -1, dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("no samples")
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if not torch.isfinite(wave).all():  # float WAV can hold them; one such file would make every loss NaN
        raise ValueError(f"{int((~torch.isfinite(wave)).sum())} samples are NaN or infinite")
    return resample(wave, rate)


def resample(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """[samples] at ``rate`` -> [samples] at 16 kHz."""
    return wave if rate == SAMPLE_RATE else _resampler(rate)(wave)


@lru_cache(maxsize=8)
def _resampler(rate: int) -> torchaudio.transforms.Resample:
    """One per input rate: building the sinc kernel (22.05 -> 16 kHz: 320 x 441 taps x 13) costs more than
    applying it to a sentence, so it is built once."""
    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)
