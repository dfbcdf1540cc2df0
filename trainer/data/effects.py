"""Waveform effects that change one acoustic condition of 16 kHz speech: noise, a telephone channel, tempo,
a room. The embedded corpus builds its out-of-domain sets with them (``trainer.data.corpus``). Every random draw
comes from a ``torch.Generator`` passed in, so a result is a function of its seed alone.
"""
import math

import torch
import torchaudio.functional as AF

from trainer.data.audio import SAMPLE_RATE

TELEPHONE_RATE, TELEPHONE_BAND = 8000, (300.0, 3400.0)
NOISES = ("white", "pink", "brown", "babble")  # coloured noise by its spectral exponent (0, 1, 2), then voices


def rms(wave: torch.Tensor) -> torch.Tensor:
    """[samples] -> root mean square, floored above zero."""
    return wave.pow(2).mean().sqrt().clamp(min=1e-8)


def coloured_noise(samples: int, exponent: float, g: torch.Generator) -> torch.Tensor:
    """[samples] Gaussian noise whose power falls as 1 / f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = torch.fft.rfft(torch.randn(samples, generator=g))
    f = torch.arange(len(spectrum), dtype=torch.float32).clamp(min=1.0)
    noise = torch.fft.irfft(spectrum / f.pow(exponent / 2), n=samples)
    return noise / rms(noise)


def babble(others: list[torch.Tensor], samples: int) -> torch.Tensor:
    """[samples] of several other utterances spoken at once (each at unit RMS, looped to length), unit RMS."""
    mix = torch.zeros(samples)
    for wave in others:
        mix += (wave / rms(wave)).repeat(-(-samples // len(wave)))[:samples]
    return mix / rms(mix)


def noise(kind: str, samples: int, g: torch.Generator, voices: list[torch.Tensor]) -> torch.Tensor:
    """[samples] unit-RMS noise of ``kind`` (one of NOISES); babble of ``voices``, white where there are none."""
    if kind == "babble" and voices:
        return babble(voices, samples)
    return coloured_noise(samples, NOISES.index(kind) % 3, g)


def add_noise(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``wave`` plus ``noise`` (same length) scaled to ``snr_db`` dB under the speech's power."""
    return wave + noise * (rms(wave) / rms(noise) / 10 ** (snr_db / 20))


def telephone(wave: torch.Tensor) -> torch.Tensor:
    """A narrow-band telephone channel: 8 kHz, 300-3400 Hz, 8-bit mu-law, then back to 16 kHz."""
    low, high = TELEPHONE_BAND
    narrow = AF.resample(wave, SAMPLE_RATE, TELEPHONE_RATE)
    narrow = AF.lowpass_biquad(AF.highpass_biquad(narrow, TELEPHONE_RATE, low), TELEPHONE_RATE, high)
    peak = narrow.abs().max().clamp(min=1e-8)
    coded = AF.mu_law_decoding(AF.mu_law_encoding(narrow / peak, 256), 256) * peak
    return AF.resample(coded, TELEPHONE_RATE, SAMPLE_RATE)


def tempo(wave: torch.Tensor, factor: float, n_fft: int = 512, hop: int = 128) -> torch.Tensor:
    """Spoken ``factor`` times as fast at the same pitch (a phase vocoder's time stretch of the STFT). Unlike
    speed perturbation, the voice's pitch and formants stay where they were."""
    window = torch.hann_window(n_fft)
    spec = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    advance = torch.linspace(0, math.pi * hop, spec.shape[0])[..., None]
    stretched = AF.phase_vocoder(spec, factor, advance)
    return torch.istft(stretched, n_fft, hop, window=window, length=int(round(len(wave) / factor)))


def room_response(rt60: float, g: torch.Generator) -> torch.Tensor:
    """A synthetic room impulse response: the direct sound, then Gaussian reflections decaying 60 dB in
    ``rt60`` seconds (the exponential tail of a diffuse field), over 1.2 x rt60."""
    t = torch.arange(int(1.2 * rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = torch.randn(len(t), generator=g) * torch.exp(-3 * math.log(10) * t / rt60) * 0.3
    tail[0] = 1.0
    return tail


def reverberate(wave: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """``wave`` in the room of ``response`` (its first len(wave) samples), at the dry speech's RMS. The FFT is
    a power of two long: 3-4x faster than one of the convolution's own length, which may have large prime
    factors, and this runs in the loader for every reverberated training utterance."""
    n = 1 << (len(wave) + len(response) - 2).bit_length()
    wet = torch.fft.irfft(torch.fft.rfft(wave, n) * torch.fft.rfft(response, n), n)[:len(wave)]
    return wet * (rms(wave) / rms(wet))
