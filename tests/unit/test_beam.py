"""Beam search (trainer.beam) through torchaudio's decoder on constructed posteriors: without an LM it agrees
with greedy where one path dominates, and a word n-gram written here moves a transcript as its probabilities say."""
import pytest
import torch

from trainer.beam import BeamDecoder, DecoderError, arpa_words
from trainer.data.text import Tokenizer
from trainer.decode import greedy_labels

TEXTS = [f"the {w} sat on the mat with a {v}" for w in ("cat", "dog", "bird", "fish") for v in ("hat", "bat", "cap")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.train(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer.model"), 30)


def posteriors(frames: list[dict], vocab: int) -> torch.Tensor:
    """[1, T, vocab + 1] log-probs: each frame {label: probability}, the rest of the mass spread evenly."""
    out = torch.empty(len(frames), vocab + 1)
    for t, probs in enumerate(frames):
        rest = (1 - sum(probs.values())) / (vocab + 1 - len(probs))
        out[t] = rest
        for label, p in probs.items():
            out[t, label] = p
    return out.log().unsqueeze(0)


def spoken(tokenizer, text: str, p: float = 0.9) -> list[dict]:
    """Frames of ``text``: each label held one frame with probability ``p``, a blank frame after it."""
    frames = []
    for label in tokenizer.encode(text):
        frames += [{label: p}, {0: p}]
    return frames


def test_without_an_lm_the_beam_equals_greedy_where_one_path_dominates_every_frame(tokenizer):
    g = torch.Generator().manual_seed(0)
    V = tokenizer.vocab_size
    batch = torch.full((3, 40, V + 1), -30.0)
    lengths = torch.tensor([40, 31, 17])
    for b in range(3):
        best = torch.randint(0, V + 1, (40,), generator=g)  # blanks and repeats included
        best[best == 1] = 2  # not the unknown piece (label 1): the beam's silence, never a target of normalised text
        probs = torch.rand(40, V + 1, generator=g) * 0.1 / V
        probs[torch.arange(40), best] = 0.9
        batch[b] = (probs / probs.sum(-1, keepdim=True)).log()
    beam = BeamDecoder(tokenizer, beam=8)(batch, lengths)
    assert beam == greedy_labels(batch, lengths) and all(beam)


ARPA = "\n".join([  # fields separated by tabs, as KenLM reads them
    "\\data\\", "ngram 1=6", "ngram 2=5", "",
    "\\1-grams:", "-99\t<s>\t-0.3", "-1.0\t</s>\t0", "-2.0\t<unk>\t0", "-0.7\tthe\t-0.3", "-1.0\tcat\t-0.3",
    "-1.0\that\t-0.3", "",
    "\\2-grams:", "-0.01\t<s> the", "{cat}\tthe cat", "{hat}\tthe hat", "-0.05\tcat </s>", "-0.05\that </s>", "",
    "\\end\\", ""])


def test_a_word_ngram_changes_a_transcript_the_way_its_probabilities_say(tokenizer, tmp_path):
    # "the cat" and "the hat" differ in one piece; the model leans to "c" (0.55 against 0.45).
    frames = spoken(tokenizer, "the")
    cat, hat = tokenizer.encode("cat"), tokenizer.encode("hat")
    assert len(cat) == len(hat) and sum(a != b for a, b in zip(cat, hat)) == 1, (cat, hat)
    for a, b in zip(cat, hat):
        frames += [{a: 0.55, b: 0.45} if a != b else {a: 0.9}, {0: 0.9}]
    lp, lengths = posteriors(frames, tokenizer.vocab_size), torch.tensor([len(frames)])
    decode = lambda beam: tokenizer.decode(beam(lp, lengths)[0])  # noqa: E731
    assert tokenizer.decode(greedy_labels(lp, lengths)[0]) == "the cat"
    assert decode(BeamDecoder(tokenizer, beam=8)) == "the cat"
    for likely, unlikely in (("hat", "cat"), ("cat", "hat")):  # P(likely | the) = 0.9, P(unlikely | the) = 0.01
        lm = tmp_path / f"{likely}.arpa"
        lm.write_text(ARPA.format(**{likely: "-0.046", unlikely: "-2.0"}))
        assert arpa_words(lm) == ["the", "cat", "hat"]
        assert decode(BeamDecoder(tokenizer, beam=8, lm=str(lm), lm_weight=1.0)) == f"the {likely}"


def test_bad_lm_settings_are_errors_that_name_what_to_give(tokenizer, tmp_path):
    with pytest.raises(DecoderError, match="no such file"):
        BeamDecoder(tokenizer, 8, lm=str(tmp_path / "missing.arpa"))
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code\0\x01\x02")
    with pytest.raises(DecoderError, match="give --lm_words FILE"):
        BeamDecoder(tokenizer, 8, lm=str(binary))
    broken = tmp_path / "broken.arpa"
    broken.write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\n")
    with pytest.raises(DecoderError, match=r"broken.arpa:5: not an ARPA unigram line"):
        BeamDecoder(tokenizer, 8, lm=str(broken))
