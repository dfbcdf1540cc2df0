"""Manifests -> utterances -> features -> length-bucketed padded batches, the same count on every rank.

Every rank must run the same number of steps (each MoE layer is an all-to-all over the expert group), so
training drops the batches that do not divide evenly and evaluation repeats a batch, marked as filler.
"""
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trainer.audio import load_audio, log_mel
from trainer.text import Tokenizer, normalize

FRAMES_PER_SECOND = 100  # 10 ms hop


class DataError(ValueError):
    """A data problem, worded for the user: file, line, what is wrong."""


@dataclass(frozen=True)
class Utterance:
    audio: str
    duration: float
    text: str
    offset: float = 0.0

    @property
    def frames(self) -> int:
        return int(self.duration * FRAMES_PER_SECOND)


def read_manifest(path: str, max_duration: float = float("inf")) -> list[Utterance]:
    """NeMo JSON lines: audio_filepath (absolute or relative to the manifest), duration, text, offset."""
    base = Path(path).parent
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such manifest") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            audio, duration, text = row["audio_filepath"], float(row["duration"]), str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}:{n}: not a manifest row with audio_filepath, duration and text ({e})") from None
        if 0 < duration <= max_duration and normalize(text):
            out.append(Utterance(str(base / audio), duration, text, float(row.get("offset", 0.0))))
    return out


class SpeechDataset(Dataset):
    """Features and label ids of utterances; small corpora keep their features in memory after one pass."""

    def __init__(self, utterances: list[Utterance], tokenizer: Tokenizer, n_mels: int = 80, cache: bool = True):
        self.utts, self.tokenizer, self.n_mels = utterances, tokenizer, n_mels
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.utts)

    def __getitem__(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        u = self.utts[i]
        item = (log_mel(load_audio(u.audio, u.offset, u.duration if u.offset else 0.0), self.n_mels),
                torch.tensor(self.tokenizer.encode(u.text), dtype=torch.long), i)
        if self.cache is not None:
            self.cache[i] = item
        return item


def collate(items):
    """Pad to the longest member; return feats [B,T,F], lengths, targets [B,L], target lengths, indices."""
    feats = torch.nn.utils.rnn.pad_sequence([f for f, _, _ in items], batch_first=True)
    targets = torch.nn.utils.rnn.pad_sequence([t for _, t, _ in items], batch_first=True)
    return {"feats": feats, "lengths": torch.tensor([len(f) for f, _, _ in items]),
            "targets": targets, "target_lengths": torch.tensor([len(t) for _, t, _ in items]),
            "index": torch.tensor([i for _, _, i in items])}


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


def shard(batches: list, rank: int, world: int, fill: bool) -> list:
    """This rank's share; every rank gets the same count. fill=False drops the remainder (training);
    fill=True pads with repeats of the last batch, returned as (batch, is_filler) pairs (evaluation)."""
    if not fill:
        n = len(batches) // world
        return batches[rank:n * world:world]
    n = -(-len(batches) // world)
    mine = batches[rank::world]
    return [(b, False) for b in mine] + [(batches[-1], True)] * (n - len(mine))


def train_batches(utts, max_frames, seed, epoch, rank, world) -> list[list[int]]:
    """The batches of one epoch for one rank, shuffled deterministically from (seed, epoch)."""
    batches = length_batches(utts, max_frames)
    random.Random(seed * 1000003 + epoch).shuffle(batches)
    return shard(batches, rank, world, fill=False)


def loader(dataset: SpeechDataset, batches: list[list[int]]) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0)
