"""Waveforms to normalised 80-bin log-mel frames (25 ms window, 10 ms hop), and SpecAugment for training.

``data.features_on`` says where they are computed: in the loader, per utterance on the CPU (torchaudio's Kaldi
fbank), or on the rank's device from a batch of padded waveforms (``batched_log_mel``, the same computation), so
that CPU loader processes only decode. The two share the normalisation (``Normalizer``) and the mask application
(``apply_masks``); the masks are drawn in the loader in both (``SpecAugment.draw``).
"""
import json
import struct
from functools import lru_cache

import torch
import torchaudio

from trainer.config import DataConfig, SpecAugmentConfig
from trainer.data.audio import SAMPLE_RATE

WINDOW, HOP, FFT = 400, 160, 512  # samples: 25 ms, 10 ms at 16 kHz; the FFT of a window zero-padded to 2^9
NO_MASKS = SpecAugmentConfig(freq_masks=0, time_masks=0)


def frame_count(samples):
    """Frames of ``samples`` samples (an int, or a tensor of them) under Kaldi's snip_edges framing: whole
    windows only, 0 under one window."""
    frames = (samples - WINDOW) // HOP + 1
    return frames.clamp(min=0) if isinstance(frames, torch.Tensor) else max(frames, 0)


def log_mel(wave: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[T, n_mels] Kaldi-compatible log-mel filterbank of a 16 kHz waveform."""
    return torchaudio.compliance.kaldi.fbank(wave.unsqueeze(0) * 32768.0, num_mel_bins=n_mels,
                                             sample_frequency=SAMPLE_RATE, dither=0.0)


@lru_cache(maxsize=8)
def _kaldi_constants(n_mels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The povey window [WINDOW] and the mel banks [FFT // 2 + 1, n_mels] that torchaudio's fbank uses, made on
    the CPU as it makes them (so the device's differ from the loader's by nothing), then moved once per device."""
    window = torch.hann_window(WINDOW, periodic=False).pow(0.85)
    banks, _ = torchaudio.compliance.kaldi.get_mel_banks(n_mels, FFT, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0,
                                                         1.0)
    banks = torch.nn.functional.pad(banks, (0, 1)).t().contiguous()  # the Nyquist bin has no weight
    return window.to(device, non_blocking=True), banks.to(device, non_blocking=True)


def batched_log_mel(waves: torch.Tensor, wave_lengths: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """[B, N] padded 16 kHz waveforms and their [B] sample counts -> [B, T, n_mels] log-mel, T the frames of N;
    an utterance's frames past its own count are 0. The computation of ``log_mel`` (Kaldi: DC offset removed per
    frame, pre-emphasis 0.97, povey window, power spectrum of a 512-point FFT, mel banks, log floored at float
    epsilon) on the whole batch, on the waveforms' device. A real frame reads real samples only, so padding
    changes none."""
    T = frame_count(waves.shape[1])
    if T == 0:
        return waves.new_zeros(waves.shape[0], 0, n_mels)
    window, banks = _kaldi_constants(n_mels, waves.device)
    frames = (waves * 32768.0).unfold(1, WINDOW, HOP)  # [B, T, WINDOW], overlapping views
    frames = frames - frames.mean(dim=2, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)  # x[j - 1], x[0] before the first
    frames = (frames - 0.97 * previous) * window
    power = torch.fft.rfft(frames, n=FFT).abs().pow(2.0)  # [B, T, FFT // 2 + 1]
    mel = (power @ banks).clamp(min=torch.finfo(torch.float32).eps).log()
    return torch.where(_real(frame_count(wave_lengths.to(waves.device)), T), mel, 0.0)


def _real(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T, 1]: True at each utterance's real frames, of [B] counts."""
    return (torch.arange(T, device=lengths.device) < lengths[:, None])[..., None]


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

    def __call__(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B, T, F] features with [B] real-frame counts -> normalised, padded frames 0. Per utterance, the
        mean and unbiased std of its real frames, std clamped at 1e-5. The mean is summed as torch.mean sums it
        and the variance in float64, which gives torch.std's float32 result: an utterance alone (the loader's
        case) comes out exactly as ``(x - x.mean(0)) / x.std(0).clamp(min=1e-5)``; padded batch-mates change
        the summation order, so the device's results differ in the last bits."""
        real = _real(lengths.to(feats.device), feats.shape[1])
        if self.mean is not None:
            if self.mean.device != feats.device:  # moved once: a copy per batch would wait for the device
                self.mean, self.std = self.mean.to(feats.device), self.std.to(feats.device)
            return torch.where(real, (feats - self.mean) / self.std, 0.0)
        n = lengths.to(feats.device).view(-1, 1, 1)
        x = torch.where(real, feats, 0.0)
        mean = x.sum(1, keepdim=True) / n
        wide = x.double()
        centred = torch.where(real, wide - wide.sum(1, keepdim=True) / n, 0.0)
        std = (centred.square().sum(1, keepdim=True) / (n - 1)).sqrt().float()
        return torch.where(real, (feats - mean) / std.clamp(min=1e-5), 0.0)


class SpecAugment:
    """Frequency and time masks (mask value 0, the normalised mean); a time mask covers at most a fifth of the
    utterance, so short utterances keep most of their frames. Drawn on the host as torchaudio's
    FrequencyMasking and TimeMasking(p=0.2) draw them, and kept as integer (start, width) pairs, so that the
    loader and the device apply the same masks (``apply_masks``)."""

    def __init__(self, cfg: SpecAugmentConfig, n_mels: int):
        self.cfg, self.n_mels = cfg, n_mels
        self.count = cfg.freq_masks + cfg.time_masks

    def draw(self, frames: int, seed: int) -> list[tuple[int, int]]:
        """(start, width) of the frequency masks, then of the time masks, of an utterance of ``frames`` frames,
        from a generator of their own seeded with ``seed``: the same masks whatever the worker count or a
        resume, and neither the global stream (dropout's) drawn from nor any GPU's reseeded. torchaudio draws a
        width U * widest, then a start U * (size - width), in float32, truncated; a mask whose widest width is
        under 1 (time masks of an utterance under 5 frames) draws nothing and is (0, 0). Here the uniforms come
        in one call (the CPU generator gives rand(n) as n calls of rand(1)) and the arithmetic is Python's: a
        float64 result rounded to float32 is float32's own for these operations, at a fraction of the cost of
        a tensor operation per step."""
        cfg = self.cfg
        widest = [cfg.freq_width] * cfg.freq_masks + [min(cfg.time_width, int(frames * 0.2))] * cfg.time_masks
        size = [self.n_mels] * cfg.freq_masks + [frames] * cfg.time_masks
        live = sum(w >= 1 for w in widest)
        u = iter(torch.rand(2 * live, generator=torch.Generator().manual_seed(seed)).tolist() if live else [])
        masks = []
        for w, n in zip(widest, size):
            if w < 1:
                masks.append((0, 0))
                continue
            width = _f32(next(u) * w)
            masks.append((int(_f32(next(u) * _f32(n - width))), int(width)))
        return masks

    def none(self) -> list[tuple[int, int]]:
        """Masks of width 0, as many as ``draw`` gives."""
        return [(0, 0)] * self.count

    def tensors(self, masks: list[list]) -> tuple[torch.Tensor, torch.Tensor]:
        """B utterances' ``draw`` results -> [B, freq_masks, 2] and [B, time_masks, 2] (start, width)."""
        t = torch.tensor(masks, dtype=torch.long).view(len(masks), self.count, 2)
        return t[:, :self.cfg.freq_masks], t[:, self.cfg.freq_masks:]


def _f32(x: float) -> float:
    """x rounded to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def apply_masks(feats: torch.Tensor, freq: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """[B, T, F] features with [B, Mf, 2] frequency and [B, Mt, 2] time masks (start, width) -> masked to 0,
    on the features' device."""
    def covered(masks: torch.Tensor, size: int) -> torch.Tensor:  # [B, size]: under some mask
        masks = masks.to(feats.device)
        pos = torch.arange(size, device=feats.device)
        start = masks[..., :1]
        return ((pos >= start) & (pos < start + masks[..., 1:])).any(dim=1)

    _, T, F = feats.shape
    return feats.masked_fill(covered(freq, F)[:, None, :] | covered(time, T)[:, :, None], 0.0)


class Features:
    """What a dataset makes of a decoded waveform, and where (``data.features_on``).

    "loader": the loader computes the normalised log-mel of each utterance and applies its masks; a batch holds
    "feats" [B, T, n_mels]. "device": the loader ships the waveforms, "waves" [B, N] (float32, padded) and
    "wave_lengths" [B] (samples), and ``on_device`` computes the features of the whole batch on the rank's
    device. In both a batch holds "lengths" [B] (frames, known on the host from the samples) and the masks,
    "freq_masks" [B, Mf, 2] and "time_masks" [B, Mt, 2] (already applied in loader mode)."""

    def __init__(self, data: DataConfig, n_mels: int, train: bool):
        self.device_mode, self.n_mels = data.features_on == "device", n_mels
        self.normalize = Normalizer(data.global_cmvn)
        self.augment = SpecAugment(data.specaugment if train else NO_MASKS, n_mels)

    def host(self, wave: torch.Tensor) -> torch.Tensor:
        """[samples] -> what the loader keeps of it: [T, n_mels] normalised log-mel, or the waveform itself."""
        if self.device_mode:
            return wave
        feats = log_mel(wave, self.n_mels)
        return self.normalize(feats[None], torch.tensor([len(feats)]))[0]

    def frames(self, signal: torch.Tensor) -> int:
        """Frames of what ``host`` made."""
        return frame_count(len(signal)) if self.device_mode else len(signal)

    def masked(self, signal: torch.Tensor, seed: int) -> tuple[torch.Tensor, list]:
        """(signal, its masks drawn from ``seed``); in loader mode the masks are applied here, on the CPU."""
        masks = self.augment.draw(self.frames(signal), seed)
        if self.device_mode or not masks:
            return signal, masks
        return apply_masks(signal[None], *self.augment.tensors([masks]))[0], masks

    def silence(self, frames: int) -> tuple[torch.Tensor, list]:
        """A silent signal of ``frames`` frames and no masks (the stand-in of an all-failed batch)."""
        if self.device_mode:
            return torch.zeros(WINDOW + HOP * (frames - 1)), self.augment.none()
        return torch.zeros(frames, self.n_mels), self.augment.none()

    def pad(self, signals: list, masks: list) -> dict:
        """The feature keys of a batch from its members' signals and masks, padded to the longest."""
        pad = torch.nn.utils.rnn.pad_sequence
        sizes = torch.tensor([len(s) for s in signals])
        batch = dict(zip(("freq_masks", "time_masks"), self.augment.tensors(masks)))
        if self.device_mode:
            return {**batch, "waves": pad(signals, batch_first=True), "wave_lengths": sizes,
                    "lengths": frame_count(sizes)}
        return {**batch, "feats": pad(signals, batch_first=True), "lengths": sizes}

    def on_device(self, batch: dict, device) -> dict:
        """The batch ready for the model: "feats" [B, T, n_mels] float32 on ``device`` (computed there in device
        mode: log-mel, normalisation, masks), "targets" moved there; "lengths", "target_lengths", "weight" and
        "index" stay on the CPU, where the trainer reads them. Every copy is asynchronous (the loader pins
        batches on GPU machines) and nothing is read back, so the host does not wait for the device here."""
        def move(key: str) -> torch.Tensor:
            return batch[key].to(device, non_blocking=True)

        out = {k: v for k, v in batch.items() if k not in ("waves", "wave_lengths")}
        out["targets"] = move("targets")
        if not self.device_mode:
            return {**out, "feats": move("feats")}
        feats = self.normalize(batched_log_mel(move("waves"), move("wave_lengths"), self.n_mels), move("lengths"))
        return {**out, "feats": apply_masks(feats, move("freq_masks"), move("time_masks"))}
