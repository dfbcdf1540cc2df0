"""A consolidated model at work without DeepSpeed's engine, launcher or process group: batched greedy CTC.

The features are made by the training pipeline itself (``SpeechDataset`` in evaluation mode, with the run's
CMVN statistics when it had them), so what is decoded here is what the trainer scored.
"""
from pathlib import Path
from typing import Optional

import soundfile as sf
import torch

from trainer import checkpoint
from trainer.config import ProjectConfig, with_overrides
from trainer.data.batches import SpeechDataset, length_batches, loader
from trainer.data.sources import Utterance
from trainer.data.text import Tokenizer
from trainer.decode import greedy_labels
from trainer.export import load_consolidated
from trainer.plan import plan_run


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

    def __init__(self, model_dir: str, device: str = "cpu"):
        self.model, self.meta = load_consolidated(model_dir)
        self.device = torch.device(device)
        self.model.to(self.device)
        folder = Path(model_dir)
        cmvn = str(folder / checkpoint.CMVN) if self.meta.get("cmvn") else ""
        self.project = with_overrides(ProjectConfig.model_validate(self.meta["project_config"]),
                                      {"data.global_cmvn": cmvn}, origin=f"{model_dir}: project_config")
        self.tokenizer = Tokenizer(str(folder / checkpoint.TOKENIZER))

    @torch.no_grad()
    def outputs(self, utts: list[Utterance], max_frames: Optional[int] = None, workers: int = 0):
        """(utterance indices, ModelOutput) per length-bucketed batch; unreadable audio is skipped and named
        on stderr by the dataset. Nothing is dropped at inference, so the output does not depend on the batch; its
        size defaults to one rank's micro-batch of the run."""
        dataset = SpeechDataset(utts, self.tokenizer, self.project.data, self.project.model.n_mels, train=False)
        max_frames = max_frames or plan_run({}, self.project, 0, 1).batch.micro_frames
        for batch in loader(dataset, length_batches(utts, max_frames), workers):
            if not batch["weight"].any():  # every file of this batch failed to decode
                continue
            batch = dataset.on_device(batch, self.device)
            out = self.model(batch["feats"], batch["lengths"])
            yield batch["index"].tolist(), out

    def transcribe(self, utts: list[Utterance], max_frames: Optional[int] = None, workers: int = 0) -> dict:
        """{utterance index: text} for every utterance whose audio could be read."""
        texts = {}
        for index, out in self.outputs(utts, max_frames, workers):
            hyps = greedy_labels(out.log_probs, out.lengths)
            texts.update({i: self.tokenizer.decode(h) for i, h in zip(index, hyps)})
        return texts
