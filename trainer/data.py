"""Utterances -> features -> length-bucketed padded batches, the same number on every rank.

Every rank must run the same number of steps (each MoE layer is an all-to-all over the expert group), so
training drops the batches that do not divide evenly, evaluation repeats a batch marked as filler, and a batch
whose every audio file fails to decode becomes a silent stand-in that carries no loss.
"""
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.config import DataConfig
from trainer.features import Normalizer, SpecAugment, log_mel, speed_perturb
from trainer.sources import Utterance, load_utterance
from trainer.text import Tokenizer

STAND_IN_FRAMES = 8


class SpeechDataset(Dataset):
    """Features and labels of utterances. Features are cached when the data config allows (small corpora,
    no speed perturbation); SpecAugment and speed perturbation apply to training sets only."""

    def __init__(self, utts: list[Utterance], tokenizer: Tokenizer, data: DataConfig, n_mels: int, train: bool,
                 seed: int = 0):
        self.utts, self.tokenizer, self.n_mels = utts, tokenizer, n_mels
        self.seed, self.epoch = seed, 0  # augmentation is a function of (seed, epoch, utterance) alone
        self.normalize = Normalizer(data.global_cmvn)
        self.augment = SpecAugment(data.specaugment) if train else None
        self.speeds = list(data.speed_perturb) if train else []
        self.cache = {} if data.cache_features and not self.speeds else None

    def __len__(self):
        return len(self.utts)

    def features(self, i: int) -> torch.Tensor:
        wave = load_utterance(self.utts[i])
        if self.speeds:
            wave = speed_perturb(wave, random.Random(f"{self.seed}:{self.epoch}:{i}").choice(self.speeds))
        return self.normalize(log_mel(wave, self.n_mels))

    def __getitem__(self, i):
        try:
            feats = self.cache[i] if self.cache is not None and i in self.cache else self.features(i)
        except Exception as e:  # any decoding failure skips the utterance; the run goes on
            print(f"skipping {self.utts[i].origin}: audio {self.utts[i].audio} unreadable ({e})",
                  file=sys.stderr, flush=True)
            return None
        if self.cache is not None:
            self.cache[i] = feats
        if self.augment is not None:
            # Its own seed, not the global stream: the same masks whatever the worker count or a resume.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
                feats = self.augment(feats)
        return feats, torch.tensor(self.tokenizer.encode(self.utts[i].text), dtype=torch.long), i

    def collate(self, items) -> dict:
        """Pad to the longest member. ``weight`` is 0 for the stand-in of an all-failed batch."""
        good = [it for it in items if it is not None]
        weight = 1.0
        if not good:
            good, weight = [(torch.zeros(STAND_IN_FRAMES, self.n_mels), torch.tensor([1]), -1)], 0.0
        pad = torch.nn.utils.rnn.pad_sequence
        return {"feats": pad([f for f, _, _ in good], batch_first=True),
                "lengths": torch.tensor([len(f) for f, _, _ in good]),
                "targets": pad([t for _, t, _ in good], batch_first=True),
                "target_lengths": torch.tensor([len(t) for _, t, _ in good]),
                "index": torch.tensor([i for _, _, i in good]),
                "weight": torch.full((len(good),), weight),
                "skipped": len(items) - (len(good) if weight else 0)}


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
    real = sum(utts[i].frames for b in batches for i in b)
    padded = sum(max(utts[i].frames for i in b) * len(b) for b in batches)
    return 1.0 - real / max(padded, 1)


def shard(batches: list, rank: int, world: int, fill: bool) -> list:
    """This rank's share; every rank gets the same count. fill=False drops the remainder (training);
    fill=True pads with repeats of the last batch, returned as (batch, is_filler) pairs (evaluation)."""
    if not fill:
        n = len(batches) // world
        return batches[rank:n * world:world]
    n = -(-len(batches) // world)
    mine = batches[rank::world]
    return [(b, False) for b in mine] + [(batches[-1], True)] * (n - len(mine))


@dataclass
class SamplerState:
    """Where training stands in the data: a resumed run continues with exactly the next batch."""
    epoch: int = 0
    position: int = 0  # batches of this epoch already taken by this rank


def train_batches(utts, max_frames: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """The batches of one epoch for one rank, shuffled deterministically from (seed, epoch)."""
    if any(u.member for u in utts):
        return shard_batches(utts, max_frames, seed, epoch, rank, world)
    batches = length_batches(utts, max_frames)
    random.Random(seed * 1000003 + epoch).shuffle(batches)
    return shard(batches, rank, world, fill=False)


def shard_batches(utts, max_frames: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Sharded audio (Shar tars): the shards in an order drawn from (seed, epoch) are dealt round-robin to the
    ranks; a rank reads its shards one after another, each shard's batches in a shuffled order, so its reads
    stay within one tar at a time. Every rank gets the count of the poorest (none waits at the all-to-all);
    a resume position indexes this list, which is a function of (seed, epoch, rank, world) alone."""
    members: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        members.setdefault(u.audio, []).append(i)
    shards = sorted(members)
    random.Random(seed * 1000003 + epoch).shuffle(shards)
    per_rank = []
    for r in range(world):
        batches = []
        for tar in shards[r::world]:
            idx = members[tar]
            local = length_batches([utts[i] for i in idx], max_frames)
            random.Random(f"{seed}:{epoch}:{Path(tar).name}").shuffle(local)
            batches += [[idx[j] for j in b] for b in local]
        per_rank.append(batches)
    return per_rank[rank][:min(len(b) for b in per_rank)]


def _plain_signals(_worker_id: int):
    """A worker is forked with the rank's stop watcher set up (``trainer.stopping``): give it default signal
    actions and no wakeup fd, so a signal to the worker is not heard as a second one to the rank."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def loader(dataset: SpeechDataset, batches: list[list[int]], workers: int) -> DataLoader:
    # A generator of its own: creating an iterator must not draw from the global stream that dropout uses.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                      worker_init_fn=_plain_signals)
