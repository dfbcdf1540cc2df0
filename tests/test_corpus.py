"""The embedded corpus: its texts and the honesty of its splits (real WordNet, real speech engines)."""
import hashlib
import json
from pathlib import Path

from trainer.corpus import SPLITS, build_corpus, wordnet_phrases, wordnet_sentences, within, word_list


def test_phrases_are_runs_of_listed_words_and_outnumber_whole_sentences():
    known, phrases = word_list(300), wordnet_phrases(300)
    assert all(3 <= len(p.split()) <= 10 and set(p.split()) <= known for p in phrases)
    assert len(set(phrases)) == len(phrases)
    assert len(phrases) > 10 * len(within(wordnet_sentences(), 300))
    # "drive" is not among the 300 words: the example is spoken as the two runs either side of it
    assert "drive" not in known
    assert {"he took the family for a", "in his new car"} <= set(phrases)
    assert "he took the family for a drive in his new car" not in phrases


def test_a_phrase_corpus_puts_no_text_in_two_splits_its_test_ood_apart_and_a_rebuild_is_the_same(tmp_path):
    manifests = build_corpus(str(tmp_path / "c"), 40, seed=1234, words=300, text="phrases")
    texts = {s: [json.loads(line)["text"] for line in open(manifests[s])] for s in SPLITS}
    assert [len(texts[s]) for s in SPLITS] == [40, 50, 50, 50]
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            assert not set(texts[a]) & set(texts[b]), (a, b)
    known = word_list(300)
    assert all(set(t.split()) <= known for s in SPLITS for t in texts[s])
    voices = {s: {json.loads(line)["voice"] for line in open(manifests[s])} for s in SPLITS}
    assert not voices["test_ood"] & (voices["train"] | voices["dev"] | voices["test"])
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["text"] == "phrases"
    # every engine in the draw, and a second build (other workers, other order of tasks) is the same audio
    assert {v.split(":")[0] for v in voices["train"]} == {"espeak-ng", "flite", "festival"}
    again = build_corpus(str(tmp_path / "again"), 40, seed=1234, words=300, text="phrases", workers=1)
    assert [digests(manifests[s]) for s in SPLITS] == [digests(again[s]) for s in SPLITS]


def digests(manifest: str) -> list:
    folder = Path(manifest).parent
    return [hashlib.sha256((folder / json.loads(line)["audio_filepath"]).read_bytes()).hexdigest()
            for line in open(manifest)]
