"""Waveform augmentation of training utterances: a room, additive noise, a telephone channel
(``trainer.data.effects``), each on a share of the utterances (``data.augment``).

Every draw comes from the utterance's key, (seed, epoch, utterance), so a resumed run hears the same audio
and the loader's worker count changes nothing. It runs in the loader in both feature modes, on the decoded
waveform after speed perturbation (a room, then noise in it, then the channel); SpecAugment follows on the
features, wherever they are computed (``trainer.data.features``).
"""
import random
from typing import Callable, Optional

import torch

from trainer.config import AugmentConfig
from trainer.data import effects

BABBLE_VOICES = 3


class WaveAugment:
    """``augment(wave, key)`` -> the waveform with this utterance's draws applied (the input itself when none is
    drawn: ``changes(key)`` is False). ``voices(rng)``: other utterances' waveforms for babble noise, None where
    there are none to draw (a set read lazily from shards: then the noise is coloured only)."""

    def __init__(self, cfg: AugmentConfig, voices: Optional[Callable[[random.Random], list[torch.Tensor]]]):
        self.cfg, self.voices = cfg, voices
        self.active = cfg.noise_prob > 0 or cfg.reverb_prob > 0 or cfg.telephone_prob > 0

    def _decide(self, key: str) -> tuple[random.Random, tuple[bool, bool, bool]]:
        """The utterance's stream and whether a room, noise and the channel fall on it: the stream's first
        draws, so whether anything changes is known before anything is computed."""
        cfg, rng = self.cfg, random.Random(key)
        return rng, tuple(rng.random() < p for p in (cfg.reverb_prob, cfg.noise_prob, cfg.telephone_prob))

    def changes(self, key: str) -> bool:
        """Whether any effect is drawn for the utterance of ``key`` (the feature cache skips it)."""
        return self.active and any(self._decide(key)[1])

    def __call__(self, wave: torch.Tensor, key: str) -> torch.Tensor:
        if not self.active:
            return wave
        cfg, (rng, (room, noisy, phone)) = self.cfg, self._decide(key)
        if not (room or noisy or phone):
            return wave
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        if room:
            wave = effects.reverberate(wave, effects.room_response(rng.uniform(*cfg.reverb_rt60), g))
        if noisy:
            kind = rng.choice(effects.NOISES if self.voices else effects.NOISES[:3])
            noise = effects.noise(kind, len(wave), g, self.voices(rng) if kind == "babble" else [])
            wave = effects.add_noise(wave, noise, rng.uniform(*cfg.noise_snr_db))
        if phone:
            wave = effects.telephone(wave)
        return wave
