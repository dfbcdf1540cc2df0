"""CTC beam search over the model's sentencepiece pieces, alone or with a word n-gram, through torchaudio's
decoder (flashlight-text, which reads KenLM's ARPA and binary files).

Without a language model the search is lexicon-free over the pieces. A word n-gram needs words: the decoder then
runs over a lexicon that spells each word of the n-gram's vocabulary in the model's pieces (its first piece
carries sentencepiece's word marker ``▁``), so words outside that vocabulary cannot be output. An ARPA file lists
its vocabulary; a KenLM binary does not in a form read here, so it comes with ``words`` (a file, one per line).
"""
import gzip
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.data.text import Tokenizer, normalize
from trainer.model.ctc import BLANK

BLANK_TOKEN = "<ctc_blank>"  # label 0; every other label is a sentencepiece piece (label - 1)
SENTENCE_MARKS = ("<s>", "</s>", "<unk>")


class DecoderError(ValueError):
    """A beam-search setting or file that cannot be used; worded for the user (the tools exit 2)."""


@dataclass(frozen=True)
class BeamSpec:
    """What ``--decoder beam`` asks for: the beam, and a word n-gram with its weights (``lm`` None: no LM)."""
    beam: int = 50
    lm: Optional[str] = None
    lm_weight: float = 2.0
    word_score: float = 0.0
    words: Optional[str] = None


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def arpa_words(path: Path) -> list[str]:
    """The words of an ARPA file's unigram section (sentence marks left out)."""
    words, inside = [], False
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
            elif inside and (line.startswith("\\") or not line):
                return [w for w in words if w not in SENTENCE_MARKS]
            elif inside:
                fields = line.split()
                if len(fields) < 2:
                    raise DecoderError(f"{path}:{n}: not an ARPA unigram line: {line!r}")
                words.append(fields[1])
    raise DecoderError(f"{path}: no \\1-grams: section (is it an ARPA file?)")


def is_arpa(path: Path) -> bool:
    """ARPA text (plain or gzip) starts with a ``\\data\\`` line; a KenLM binary does not."""
    try:
        with _open_text(path) as f:
            return f.readline().strip() == "\\data\\"
    except (UnicodeDecodeError, OSError, EOFError):
        return False


class BeamDecoder:
    """Batched beam search: log-probs [B, T, V+1] (label 0 the blank) -> labels per utterance, blanks removed."""

    def __init__(self, tokenizer: Tokenizer, beam: int, lm: Optional[str] = None, lm_weight: float = 2.0,
                 word_score: float = 0.0, words: Optional[str] = None):
        try:
            from torchaudio.models.decoder import ctc_decoder
            import flashlight.lib.text.decoder  # noqa: F401  (torchaudio imports it only when a decoder is built)
        except ImportError:
            raise DecoderError("--decoder beam needs the flashlight-text package: pip install flashlight-text") \
                from None
        if beam < 1:
            raise DecoderError(f"--beam {beam}: the beam holds at least 1 hypothesis")
        sp = tokenizer.sp
        tokens = [BLANK_TOKEN] + [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self._lexicon_dir = tempfile.TemporaryDirectory(prefix="omni-router-lexicon-")
        lexicon = self._write_lexicon(tokenizer, Path(lm), words) if lm else None
        # The silence token must be a token: the unknown piece, which no word of a lexicon is spelled with.
        try:
            self.decoder = ctc_decoder(lexicon=lexicon, tokens=tokens, lm=lm, beam_size=beam, lm_weight=lm_weight,
                                       word_score=word_score, blank_token=BLANK_TOKEN,
                                       sil_token=sp.id_to_piece(sp.unk_id()), unk_word="<unk>")
        except RuntimeError as e:  # KenLM's reader: a damaged or foreign file
            raise DecoderError(f"--lm {lm}: KenLM cannot read it: {str(e).splitlines()[-1]}") from None
        self.silence = sp.unk_id() + 1

    def _write_lexicon(self, tokenizer: Tokenizer, lm: Path, words: Optional[str]) -> str:
        """A lexicon file for the n-gram's words, each spelled in the tokenizer's pieces."""
        if not lm.is_file():
            raise DecoderError(f"--lm {lm}: no such file")
        if words:
            vocab = [w for w in Path(words).read_text().split() if w not in SENTENCE_MARKS]
        elif is_arpa(lm):
            vocab = arpa_words(lm)
        else:
            raise DecoderError(f"--lm {lm}: a KenLM binary does not list its words here; give --lm_words FILE (one "
                               "word per line; tools/train_ngram.py writes words.txt beside the model)")
        path = Path(self._lexicon_dir.name) / "lexicon.txt"
        lines = []
        for word in vocab:
            if normalize(word) != word:
                continue  # a word the normaliser would change is never a reference word
            pieces = tokenizer.sp.encode(word, out_type=str)
            if pieces and tokenizer.sp.unk_id() not in tokenizer.sp.encode(word):
                lines.append(f"{word} {' '.join(pieces)}")
        if not lines:
            raise DecoderError(f"--lm {lm}: none of its {len(vocab)} words can be spelled in the model's pieces")
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """[B, T, V+1] log-probs and [B] frame counts -> the best hypothesis' labels per utterance."""
        emissions = log_probs.detach().float().cpu().contiguous()
        results = self.decoder(emissions, lengths.detach().cpu().to(torch.int32))
        return [[t for t in r[0].tokens.tolist() if t not in (BLANK, self.silence)] for r in results]
