"""The out-of-domain suite as a table: one row a set, each changing one thing from the test split.

A row is one of two kinds:

1. spoken: its texts (the test phrases, or the glosses of test_ood) spoken by its voices;
2. changed: the test split's audio through its one change (``trainer.data.effects``), with that change's settings.

Adding a set is adding a row: ``OOD_SUITE``, ``SPOKEN``, ``CHANGED`` and ``SPLITS`` follow from the table.
"""
import random
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from trainer.data import effects
from trainer.data.audio import load_audio
from trainer.data.corpus.speech import SPLIT_VOICES, TRAIN_VOICES

# espeak-ng's variants never trained on (speech.TRAIN_VARIANTS), in the training accents, and flite's slt
UNSEEN_VARIANTS = [("espeak-ng", f"{accent}+{variant}", 0.8 / 18) for accent in ("en-us", "en-gb", "en-gb-x-rp")
                   for variant in ("m2", "m5", "m7", "f1", "f3", "f5")] + [("flite", "slt", 0.2)]
# espeak-ng's accents never trained on, in trained variants
UNSEEN_ACCENTS = [("espeak-ng", f"{accent}+{variant}", 1 / 20) for variant in ("m1", "m3", "f2", "f4")
                  for accent in ("en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")]


@dataclass(frozen=True)
class Noise:
    """Additive noise of one of ``kinds`` at an SNR drawn from ``snr_db`` (babble: four other test utterances)."""
    kinds: tuple
    snr_db: tuple

    def apply(self, wave: torch.Tensor, others: list[str], rng: random.Random, g: torch.Generator) -> tuple:
        """(noisy wave, condition): a noise and SNR drawn per utterance, so the set spans the range."""
        kind, snr = rng.choice(self.kinds), round(rng.uniform(*self.snr_db), 1)
        noise = effects.noise(kind, len(wave), g, [load_audio(f) for f in others] if kind == "babble" else [])
        return effects.add_noise(wave, noise, snr), f"{kind} noise, SNR {snr} dB"


@dataclass(frozen=True)
class Telephone:
    """A telephone channel (8 kHz, 300-3400 Hz, 8-bit mu-law): no setting to draw."""

    def apply(self, wave: torch.Tensor, others: list[str], rng: random.Random, g: torch.Generator) -> tuple:
        """(telephone wave, condition): the one band every call goes through."""
        return effects.telephone(wave), "telephone band, 8-bit mu-law"


@dataclass(frozen=True)
class Tempo:
    """Another tempo, one of ``factors``, the pitch kept."""
    factors: tuple

    def apply(self, wave: torch.Tensor, others: list[str], rng: random.Random, g: torch.Generator) -> tuple:
        """(stretched wave, condition): slower and faster speech than any voice's range."""
        factor = rng.choice(self.factors)
        return effects.tempo(wave, factor), f"tempo x{factor}"


@dataclass(frozen=True)
class Room:
    """A synthetic room with an RT60 drawn from ``rt60_s``."""
    rt60_s: tuple

    def apply(self, wave: torch.Tensor, others: list[str], rng: random.Random, g: torch.Generator) -> tuple:
        """(reverberant wave, condition): a room per utterance, so the set spans the range."""
        rt60 = round(rng.uniform(*self.rt60_s), 2)
        return effects.reverberate(wave, effects.room_response(rt60, g)), f"room, RT60 {rt60} s"


Change = Union[Noise, Telephone, Tempo, Room]


@dataclass(frozen=True)
class OodSet:
    """One set of the suite: spoken (``voices``) or changed (``change`` of the test audio), never both."""
    name: str
    texts: Literal["test", "glosses"]  # the test split's texts, or test_ood's (WordNet's glosses)
    voices: Optional[list] = None  # [(engine, voice, share)], as speech.TRAIN_VOICES
    change: Optional[Change] = None  # the test audio through .apply(wave, others, rng, g)

    def __post_init__(self):
        """Refuse a row that is not one of the two kinds: the build reads each kind one way."""
        if (self.voices is None) == (self.change is None) or self.texts not in ("test", "glosses") or \
                (self.change is not None and self.texts != "test"):
            raise ValueError(f"{self.name}: spoken texts (voices) or the test audio changed (change)")


SUITE = (
    OodSet("ood_voices", texts="test", voices=UNSEEN_VARIANTS),
    OodSet("ood_accents", texts="test", voices=UNSEEN_ACCENTS),
    OodSet("ood_text", texts="glosses", voices=TRAIN_VOICES),
    OodSet("ood_noise", texts="test", change=Noise(kinds=effects.NOISES, snr_db=(5.0, 15.0))),
    OodSet("ood_telephone", texts="test", change=Telephone()),
    OodSet("ood_tempo", texts="test", change=Tempo(factors=(0.75, 1.3))),
    OodSet("ood_reverb", texts="test", change=Room(rt60_s=(0.4, 1.0))),
)
OOD_SUITE = tuple(row.name for row in SUITE)
SPOKEN = {**SPLIT_VOICES, **{row.name: row.voices for row in SUITE if row.voices is not None}}  # split: voices
CHANGES = {row.name: row.change for row in SUITE if row.change is not None}  # split: its change of the test audio
CHANGED = tuple(CHANGES)
SPLITS = (*SPOKEN, *CHANGED)
