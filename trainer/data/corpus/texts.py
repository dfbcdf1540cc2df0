"""The corpus's texts: WordNet's usage examples (whole, or the phrases of a word list within them) and its
glosses, and the split of each text by a hash of it, so no text is in two splits."""
import hashlib
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

from trainer.data.text import normalize

WORDNET = Path("/usr/share/wordnet")
_CLEAN = re.compile(r"^[A-Za-z][A-Za-z ,.;:'?!]*$")  # plain words: the transcript is exactly what is spoken
_CLAUSE_END = re.compile(r"[^A-Za-z' -]+|\b[A-Z]{2,}\b")  # punctuation, digits, abbreviations


def wordnet_sentences(kind: str = "examples", min_words: int = 3, max_words: int = 10) -> list[str]:
    """WordNet's usage examples or glosses in plain words only, normalised, so the transcript is what is spoken."""
    seen, out = set(), []
    for text in _wordnet_texts(kind):
        if not _CLEAN.match(text) or re.search(r"\b[A-Z]{2,}\b", text):
            continue
        norm = normalize(text)
        if min_words <= len(norm.split()) <= max_words and norm not in seen:
            seen.add(norm)
            out.append(norm)
    return out


def _wordnet_texts(kind: str) -> list[str]:
    """Every quoted usage example, or the first clause of every gloss, as written: the raw material."""
    if not WORDNET.exists():
        raise FileNotFoundError(f"{WORDNET} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(errors="replace").splitlines():
            if "|" in line:
                gloss = line.split("|", 1)[1]
                out += re.findall(r'"([^"]+)"', gloss) if kind == "examples" else [gloss.split(";")[0].strip()]
    return out


@lru_cache(maxsize=4)
def word_list(words: int) -> frozenset[str]:
    """The ``words`` most frequent words of the usage examples, once per process (a build asks twice)."""
    counts = Counter(w for s in wordnet_sentences() for w in s.split())
    return frozenset(w for w, _ in counts.most_common(words))


def within(sentences: list[str], words: int) -> list[str]:
    """The sentences made only of the word list's words (0: all), so errors measure hearing, not spelling."""
    if not words:
        return sentences
    known = word_list(words)
    return [s for s in sentences if all(w in known for w in s.split())]


def wordnet_phrases(words: int, min_words: int = 3, max_words: int = 10) -> list[str]:
    """The runs of listed words in the usage examples, cut at ``max_words``: many more texts of one word list."""
    # "he took the family for a drive in his new car" without "drive": "he took the family for a", "in his new car"
    known, out = word_list(words), {}
    for example in _wordnet_texts("examples"):
        for clause in _CLAUSE_END.split(example):
            for run in _runs(normalize(clause).split(), known):
                for i in range(0, len(run), max_words):
                    if len(run[i:i + max_words]) >= min_words:
                        out.setdefault(" ".join(run[i:i + max_words]))
    return list(out)


def _runs(words: list[str], known: frozenset[str]) -> list[list[str]]:
    """The longest runs of ``known`` words, as an unlisted word ends a phrase."""
    runs = [[]]
    for word in words:
        if word in known:
            runs[-1].append(word)
        else:
            runs.append([])
    return runs


def _digest(text: str) -> int:
    """A stable 64-bit hash (Python's own changes per process): splits and draws must rebuild the same."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """1 in 20 texts to dev, 1 in 20 to test, by hash: a text always lands in the same split."""
    return {0: "dev", 1: "test"}.get(_digest(sentence) % 20, "train")
