"""Utterances -> features -> length-bucketed padded batches, the same number on every rank.

Every rank must run the same number of steps (each MoE layer is an all-to-all over the expert group), so
training ends an epoch when the first rank runs out of batches (the ranks agree on it at each step: sharded
sets are read lazily, and no rank knows the others' counts), evaluation repeats a batch marked as filler, and a
batch whose every audio file fails to decode becomes a silent stand-in that carries no loss.
"""
import random
import signal
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.config import AugmentConfig, DataConfig
from trainer.data.augment import BABBLE_VOICES, WaveAugment
from trainer.data.features import Features, speed_perturb
from trainer.data.sources import Utterance, load_utterance, read_shard, shard_files
from trainer.data.text import Tokenizer

STAND_IN_FRAMES = 8


class SpeechDataset(Dataset):
    """Features and labels of utterances. Features computed in the loader are cached when the data config
    allows (small corpora), for the utterances an epoch's draws leave as recorded (``plain``): with speed
    perturbation or waveform augmentation on a share of the utterances, the rest still cost nothing to load
    again. SpecAugment (masks drawn after the cache), speed perturbation and waveform augmentation
    (``trainer.data.augment``) apply to training sets only. Where the features are computed, in the loader or on the
    rank's device, is up to ``self.features`` (``trainer.data.features.Features``); ``on_device`` readies a batch for
    the model.

    An item is named by its index into ``utts``, or, for a training set read lazily from shards (``shards``),
    carried whole as (key, utterance); the key seeds its augmentation."""

    def __init__(self, utts: list[Utterance], tokenizer: Tokenizer, data: DataConfig, n_mels: int, train: bool,
                 seed: int = 0, shards: Optional["ShardSet"] = None):
        self.utts, self.shards, self.tokenizer, self.n_mels = utts, shards, tokenizer, n_mels
        self.seed, self.epoch = seed, 0  # augmentation is a function of (seed, epoch, utterance) alone
        self.features = Features(data, n_mels, train)
        self.speeds = list(data.speed_perturb) if train else []
        self.augment = WaveAugment(data.augment if train else AugmentConfig(), self.voices if utts else None)
        self.cache = {} if data.cache_features and data.features_on == "loader" else None

    def __len__(self):
        return len(self.utts)

    def load(self, i: int, utt: Utterance) -> torch.Tensor:
        """What the loader makes of an utterance (``Features.host``). Speed perturbation and waveform
        augmentation stay in the loader whatever ``data.features_on`` says: speed changes the length, which the
        host needs for the frame counts and the time masks, and each is cheap on one decoded waveform."""
        wave = speed_perturb(load_utterance(utt), self.speed(i))
        return self.features.host(self.augment(wave, self.augment_key(i)))

    def speed(self, i) -> float:
        """Utterance ``i``'s speed factor this epoch (1.0 without speed perturbation)."""
        return random.Random(f"{self.seed}:{self.epoch}:{i}").choice(self.speeds) if self.speeds else 1.0

    def augment_key(self, i) -> str:
        """The key of utterance ``i``'s augmentation draws this epoch."""
        return f"{self.seed}:{self.epoch}:{i}:augment"

    def plain(self, i) -> bool:
        """Whether this epoch leaves utterance ``i`` as recorded (no speed change, no effect drawn)."""
        return self.speed(i) == 1.0 and not self.augment.changes(self.augment_key(i))

    def voices(self, rng: random.Random) -> list[torch.Tensor]:
        """Babble's voices: the readable ones of BABBLE_VOICES training utterances drawn by ``rng``."""
        waves = []
        for j in rng.sample(range(len(self.utts)), min(BABBLE_VOICES, len(self.utts))):
            try:
                waves.append(load_utterance(self.utts[j]))
            except Exception:  # an unreadable voice is left out; the utterance itself is not at fault
                continue
        return waves

    def __getitem__(self, item):
        """(signal, targets, key, (freq masks, time masks)): the signal as ``Features.host`` makes it, masked in
        loader mode; None when the audio cannot be decoded."""
        i, utt = item if isinstance(item, tuple) else (item, self.utts[item])
        cached = self.cache is not None and self.plain(i)
        try:
            x = self.cache[i] if cached and i in self.cache else self.load(i, utt)
        except Exception as e:  # any decoding failure skips the utterance; the run goes on
            print(f"skipping {utt.origin}: audio {utt.audio} unreadable ({e})", file=sys.stderr, flush=True)
            return None
        if cached:
            self.cache[i] = x
        x, masks = self.features.masked(x, hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        return x, torch.tensor(self.tokenizer.encode(utt.text), dtype=torch.long), i, masks

    def collate(self, items) -> dict:
        """Pad to the longest member (the feature keys: ``Features``). ``weight`` is 0 for the stand-in of an
        all-failed batch."""
        good = [it for it in items if it is not None]
        weight = 1.0
        if not good:
            silence, masks = self.features.silence(STAND_IN_FRAMES)
            good, weight = [(silence, torch.tensor([1]), -1, masks)], 0.0
        pad = torch.nn.utils.rnn.pad_sequence
        return {**self.features.pad([s for s, _, _, _ in good], [m for _, _, _, m in good]),
                "targets": pad([t for _, t, _, _ in good], batch_first=True),
                "target_lengths": torch.tensor([len(t) for _, t, _, _ in good]),
                "index": torch.tensor([i for _, _, i, _ in good]),
                "weight": torch.full((len(good),), weight),
                "skipped": len(items) - (len(good) if weight else 0)}

    def on_device(self, batch: dict, device) -> dict:
        """The batch ready for the model on ``device`` (``Features.on_device``)."""
        return self.features.on_device(batch, device)


def length_batches(utts: list[Utterance], max_frames: int) -> list[list[int]]:
    """Sort by length and cut batches whose padded size (longest x count) stays within max_frames."""
    order = sorted(range(len(utts)), key=lambda i: utts[i].frames)
    batches, current = [], []
    for i in order:
        if current and utts[i].frames * (len(current) + 1) > max_frames:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(utts: list[Utterance], batches: list[list[int]]) -> float:
    """The share of the batches' padded frames that are padding."""
    real = sum(utts[i].frames for b in batches for i in b)
    padded = sum(max(utts[i].frames for i in b) * len(b) for b in batches)
    return 1.0 - real / max(padded, 1)


def shard(batches: list, rank: int, world: int) -> list:
    """This rank's share of an evaluation's batches as (batch, is_filler) pairs: every rank gets the same
    count, the shorter shares padded with repeats of the last batch."""
    n = -(-len(batches) // world)
    mine = batches[rank::world]
    return [(b, False) for b in mine] + [(batches[-1], True)] * (n - len(mine))


@dataclass
class SamplerState:
    """Where training stands in the data: a resumed run continues with exactly the next batch."""
    epoch: int = 0
    position: int = 0  # batches of this epoch already taken by this rank


def train_batches(utts, max_frames: int, seed: int, epoch: int, rank: int) -> list[list[int]]:
    """The batches of one epoch of a rank's own utterances (each rank reads its share of the rows:
    ``sources.in_share``), shuffled deterministically from (seed, epoch, rank)."""
    batches = length_batches(utts, max_frames)
    random.Random(seed * 1000003 + epoch + 100003 * rank).shuffle(batches)
    return batches


class ShardSet:
    """A training set in Lhotse Shar shards, read lazily: start-up lists the shard files only, and a rank reads
    the cut records of a shard when it reaches it, so neither start-up time nor memory grows with the corpus
    (the bucketing buffer is one shard, ``tools/make_shards.py --shard_size``)."""

    def __init__(self, folders: list[str], max_duration: float):
        self.shards, self.problems = [], []  # (cut records, tar), sorted by tar; cut files without their tar
        for folder in folders:
            shards, problems = shard_files(folder)
            self.shards += shards
            self.problems += problems
        self.shards.sort(key=lambda s: s[1])
        self.max_duration = max_duration
        self.reported = set()  # shards whose unusable rows this process has named

    def read(self, n: int) -> list[Utterance]:
        """The usable utterances of shard n; the others are named once per process."""
        utts, problems = read_shard(*self.shards[n], self.max_duration)
        if problems and n not in self.reported:
            self.reported.add(n)
            print(f"{self.shards[n][0]}: skipping {len(problems)} unusable rows:\n  " + "\n  ".join(problems[:20]),
                  file=sys.stderr, flush=True)
        return utts

    def batches(self, max_frames: int, seed: int, epoch: int, rank: int, world: int) -> Iterator[list]:
        """This rank's batches of one epoch, as (key, utterance) lists. The shards, in an order drawn from (seed,
        epoch), are dealt round-robin to the ranks; a rank reads its shards one after another, each shard's
        batches in a shuffled order, so its reads stay within one tar at a time. The sequence is a function of
        (seed, epoch, rank, world) alone: a resume position indexes it."""
        order = list(range(len(self.shards)))
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for n in order[rank::world]:
            utts = self.read(n)
            local = length_batches(utts, max_frames)
            random.Random(f"{seed}:{epoch}:{Path(self.shards[n][1]).name}").shuffle(local)
            for b in local:
                yield [(n << 24 | j, utts[j]) for j in b]

    def texts(self, limit: int, seed: int) -> list[str]:
        """At most ``limit`` texts, from whole shards in an order drawn from the seed (a tokenizer's sample)."""
        order = list(range(len(self.shards)))
        random.Random(seed).shuffle(order)
        texts = []
        for n in order:
            if len(texts) >= limit:
                break
            texts += [u.text for u in self.read(n)]
        return texts[:limit]


def epoch_batches(dataset: SpeechDataset, max_frames: int, seed: int, epoch: int, rank: int, world: int,
                  start: int = 0) -> Iterator[list]:
    """This rank's batches of an epoch from batch ``start`` on (a resume position): lazily from shards, or
    planned in memory. Skipping reads no audio."""
    if dataset.shards:
        return islice(dataset.shards.batches(max_frames, seed, epoch, rank, world), start, None)
    return iter(train_batches(dataset.utts, max_frames, seed, epoch, rank)[start:])


def tokenizer_sample(utts: list[Utterance], shards: Optional[ShardSet], limit: int, seed: int) -> list[str]:
    """The texts a tokenizer is trained on: all of them up to ``limit``, else a seeded sample of that size."""
    if shards:
        return shards.texts(limit, seed)
    texts = [u.text for u in utts]
    return texts if len(texts) <= limit else random.Random(seed).sample(texts, limit)


def describe(utts: list[Utterance], shards: Optional[ShardSet]) -> str:
    """A training set in a few words, for the log."""
    if shards:
        return f"{len(shards.shards):,} shards, read lazily"
    return f"{len(utts):,} utterances, {sum(u.duration for u in utts) / 3600:.2f} h"


def with_last(items: Iterable) -> Iterator[tuple]:
    """(item, is_last) pairs: the next item is fetched before the current one is handed out."""
    it = iter(items)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        yield current, following is None
        current = following


def _plain_signals(_worker_id: int):
    """A worker is forked with the rank's stop watcher set up (``trainer.runtime.stopping``): give it default signal
    actions and no wakeup fd, so a signal to the worker is not heard as a second one to the rank."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def loader(dataset: SpeechDataset, batches: Iterable[list], workers: int) -> DataLoader:
    # A generator of its own: creating an iterator must not draw from the global stream that dropout uses.
    """A DataLoader over ``batches`` (lists of utterance indices) with the dataset's collate."""
    return DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                      worker_init_fn=_plain_signals)
