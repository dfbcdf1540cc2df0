"""One text normaliser for training targets and WER scoring, and the sentencepiece word-piece vocabulary."""
import re
from pathlib import Path

import sentencepiece as spm

_DROP = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, letters and apostrophes only, single spaces: what is scored is what is trained."""
    text = _DROP.sub(" ", text.lower().replace("-", " "))
    return _SPACES.sub(" ", text).strip()


def tokenizer_problem(path) -> str:
    """Why ``path`` cannot serve as the tokenizer ('' when sentencepiece reads it)."""
    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        return f"not a readable sentencepiece model ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return ""


class Tokenizer:
    """Sentencepiece pieces shifted by one: label 0 is the CTC blank."""

    def __init__(self, model_path: str):
        self.path = str(model_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)

    @property
    def vocab_size(self) -> int:
        """Sentencepiece pieces; the model has one output more, the CTC blank (label 0)."""
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Normalised text -> labels (pieces shifted by one: 0 is the blank)."""
        return [i + 1 for i in self.sp.encode(normalize(text))]

    def decode(self, labels: list[int]) -> str:
        """Labels without blanks -> text."""
        return self.sp.decode([i - 1 for i in labels])

    @staticmethod
    def train(texts: list[str], model_path: str, vocab_size: int, model_type: str = "unigram") -> "Tokenizer":
        """Unigram or BPE model over normalised texts; the vocabulary shrinks if the text cannot fill it."""
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([normalize(t) for t in texts]), model_prefix=str(model_path)[:-len(".model")],
            vocab_size=vocab_size, model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
            bos_id=-1, eos_id=-1, unk_id=0, minloglevel=2)
        return Tokenizer(model_path)
