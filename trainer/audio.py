"""Audio files to 80-bin log-mel frames (25 ms window, 10 ms hop), with soundfile and torchaudio."""
import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000


def load_audio(path: str, offset: float = 0.0, duration: float = 0.0) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz; any rate and channel count soundfile reads (wav, flac, ogg)."""
    info = sf.info(path)
    start = int(round(offset * info.samplerate))
    frames = int(round(duration * info.samplerate)) if duration > 0 else -1
    data, rate = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    return wave


def log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[T, n_mels] Kaldi-compatible log-mel filterbank, mean and variance normalised per utterance."""
    feats = torchaudio.compliance.kaldi.fbank(wave.unsqueeze(0) * 32768.0, num_mel_bins=n_mels,
                                              sample_frequency=SAMPLE_RATE, dither=0.0)
    return (feats - feats.mean(0)) / feats.std(0).clamp(min=1e-5)
