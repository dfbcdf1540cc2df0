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
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)  # the same samples; a copy less
    finite = np.isfinite(mono)  # numpy's check: a tenth of torch's time, which was a tenth of a decode
    if not finite.all():  # float WAV can hold them; one such file would make every loss NaN
        raise ValueError(f"{int((~finite).sum())} samples are NaN or infinite")
    return resample(torch.from_numpy(np.ascontiguousarray(mono)), rate)


def resample(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """[samples] at ``rate`` -> [samples] at 16 kHz."""
    return wave if rate == SAMPLE_RATE else _resampler(rate)(wave)


@lru_cache(maxsize=8)
def _resampler(rate: int) -> torchaudio.transforms.Resample:
    """One per input rate: building the sinc kernel (22.05 -> 16 kHz: 320 x 441 taps x 13) costs more than
    applying it to a sentence, so it is built once."""
    return torchaudio.transforms.Resample(rate, SAMPLE_RATE)
