"""A consolidated model at work without DeepSpeed's engine, launcher or process group: batched CTC decoding,
optionally over a roster of experts.

The features are made by the training pipeline itself (``SpeechDataset`` in evaluation mode, with the run's
CMVN statistics when it had them), so what is decoded here is what the trainer scored.
"""
import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import soundfile as sf
import torch

from trainer import checkpoint
from trainer.beam import BeamDecoder, BeamSpec
from trainer.config import ProjectConfig, with_overrides
from trainer.data.batches import SpeechDataset, length_batches, loader
from trainer.data.sources import Utterance
from trainer.data.text import Tokenizer
from trainer.decode import greedy_labels
from trainer.export import load_consolidated
from trainer.model.routing import Roster
from trainer.plan import plan_run


@dataclass(frozen=True)
class RosterSpec:
    """Inference over K routes per utterance (``trainer.model.routing.Roster``): K copies in one batch, their
    frame posteriors averaged in probability space; K=1 is plain inference."""
    k: int = 1
    temperature: float = 1.0
    seed: int = 0


def audio_utterances(paths: list[str]) -> list[Utterance]:
    """Utterances (without transcripts) of audio files; an unreadable file is an error naming it."""
    utts = []
    for p in paths:
        try:
            duration = sf.info(p).duration
        except (RuntimeError, sf.LibsndfileError) as e:
            raise ValueError(f"{p}: not a readable audio file ({e})") from None
        utts.append(Utterance(audio=str(p), duration=duration, text="", origin=str(p)))
    return utts


class Recognizer:
    """A consolidated model folder on a device, with its tokenizer and feature settings."""

    def __init__(self, model_dir: str, device: str = "cpu", roster: RosterSpec = RosterSpec(),
                 beam: Optional[BeamSpec] = None):
        self.model, self.meta = load_consolidated(model_dir)
        if roster.k < 1 or roster.temperature <= 0:
            raise ValueError(f"--roster {roster.k} --roster_temperature {roster.temperature}: K must be at least 1 "
                             "and the temperature above 0")
        if roster.k > 1 and not self.model.routers():
            raise ValueError(f"{model_dir}: a dense model has no router, so no roster of experts (--roster)")
        self.roster = roster
        self.device = torch.device(device)
        self.model.to(self.device)
        folder = Path(model_dir)
        cmvn = str(folder / checkpoint.CMVN) if self.meta.get("cmvn") else ""
        self.project = with_overrides(ProjectConfig.model_validate(self.meta["project_config"]),
                                      {"data.global_cmvn": cmvn}, origin=f"{model_dir}: project_config")
        self.tokenizer = Tokenizer(str(folder / checkpoint.TOKENIZER))
        self.decode = BeamDecoder(self.tokenizer, **asdict(beam)) if beam else greedy_labels

    @torch.no_grad()
    def outputs(self, utts: list[Utterance], max_frames: Optional[int] = None, workers: int = 0):
        """(utterance indices, ModelOutput) per length-bucketed batch; unreadable audio is skipped and named
        on stderr by the dataset. Nothing is dropped at inference, so the output does not depend on the batch; its
        size defaults to one rank's micro-batch of the run (shared by the K copies of a roster)."""
        dataset = SpeechDataset(utts, self.tokenizer, self.project.data, self.project.model.n_mels, train=False)
        max_frames = max_frames or plan_run({}, self.project, 0, 1).batch.micro_frames
        for batch in loader(dataset, length_batches(utts, max(max_frames // self.roster.k, 1)), workers):
            if not batch["weight"].any():  # every file of this batch failed to decode
                continue
            batch = dataset.on_device(batch, self.device)
            index = batch["index"].tolist()
            if not self.model.routers():
                yield index, self.model(batch["feats"], batch["lengths"])
                continue
            yield index, self.roster_output(batch["feats"], batch["lengths"], index)

    def roster_output(self, feats: torch.Tensor, lengths: torch.Tensor, index: list[int]):
        """The model's output with log-probabilities averaged over the roster's K copies in probability space
        (K=1: the model's own); the K copies run as one batch of K * B rows, copy-major."""
        spec, k = self.roster, self.roster.k
        roster = Roster(spec.seed, index * k, [c for c in range(k) for _ in index], spec.temperature)
        out = self.model(feats.repeat(k, 1, 1), lengths.repeat(k), roster=roster)
        B = len(index)
        mean = out.log_probs.view(k, B, *out.log_probs.shape[1:]).logsumexp(0) - math.log(k)
        return out._replace(log_probs=mean, lengths=out.lengths[:B])

    def transcribe(self, utts: list[Utterance], max_frames: Optional[int] = None, workers: int = 0) -> dict:
        """{utterance index: text} for every utterance whose audio could be read."""
        texts = {}
        for index, out in self.outputs(utts, max_frames, workers):
            hyps = self.decode(out.log_probs, out.lengths)
            texts.update({i: self.tokenizer.decode(h) for i, h in zip(index, hyps)})
        return texts


def decoding_arguments(p: argparse.ArgumentParser):
    """The decoding flags of tools/transcribe.py and tools/evaluate.py."""
    p.add_argument("--decoder", choices=("greedy", "beam"), default="greedy", help="CTC decoding (default greedy)")
    p.add_argument("--beam", type=int, default=50, help="beam size of --decoder beam")
    p.add_argument("--lm", help="word n-gram for --decoder beam: ARPA (.arpa, .arpa.gz) or KenLM binary")
    p.add_argument("--lm_words", help="the words of a binary --lm, one per line (an ARPA file lists its own)")
    p.add_argument("--lm_weight", type=float, default=2.0, help="weight of the --lm log-probability")
    p.add_argument("--word_score", type=float, default=0.0, help="score added per word with --lm")
    p.add_argument("--roster", type=int, default=1, metavar="K", help="routes per utterance (roster of experts)")
    p.add_argument("--roster_temperature", type=float, default=1.0, metavar="T",
                   help="temperature of the roster's Gumbel-max draws (router logits / T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the roster's draws")


def decoding_settings(args) -> tuple[RosterSpec, Optional[BeamSpec]]:
    """(roster, beam search or None for greedy) from ``decoding_arguments``' flags; an LM flag without the beam
    is an error worded for the user."""
    if args.decoder == "greedy" and (args.lm or args.lm_words):
        raise ValueError("--lm decodes with the beam: add --decoder beam")
    beam = BeamSpec(args.beam, args.lm, args.lm_weight, args.word_score, args.lm_words) \
        if args.decoder == "beam" else None
    return RosterSpec(args.roster, args.roster_temperature, args.seed), beam
