"""The embedded default corpus: English texts from WordNet spoken by Debian's offline speech engines.

1. Texts (``texts``): WordNet's usage examples, whole or, many more, the phrases of a word list within them.
2. A word list (the N most frequent words of the examples) makes spelling learnable: errors measure hearing.
3. Splits: train/dev/test by a hash of the normalised text, so no text is in two splits.
4. Voices (``speech``): espeak-ng's three main English accents in 42 variants, flite and festival, drawn wide.
5. Voice, speed and pitch are drawn from the seed and the text: a rebuild is the same audio.
6. test_ood is held out twice over: other voices speaking another text source (WordNet's glosses).
7. The out-of-domain suite (``suite``, ``OOD_SUITE``) changes one thing from the test split in each set.
8. The engines' silence beyond 0.1 s either side of a text is cut (``speech.trim_silence``).
9. Written as 16 kHz FLAC and NeMo-style JSON-lines manifests, one per split (``SPLITS``).
10. The build (``build``) runs each task in a fresh process, in a temporary folder renamed into place, under a
    lock (``trainer.runtime.locks``): an interrupted build leaves no half corpus.

Versions (``build.VERSION``; a new one rebuilds):

1: WordNet's usage examples spoken by espeak-ng
2: flite and festival beside espeak-ng; test_ood held out (other voices, the glosses)
3: espeak-ng through its library; phrases of a word list
4: the engines' silence beyond 0.1 s a side trimmed
5: the out-of-domain suite
6: wide voices (3 accents x 42 espeak-ng variants, wide speeds and pitches; flite and festival shifted)
7: narrower voice ranges (130-200 words a minute, pitch 30-70; stretch 0.9-1.15, shift 0.94-1.06)
"""
from trainer.data.corpus.build import VERSION, build_corpus
from trainer.data.corpus.speech import (EDGE_S, HELD_OUT_VOICES, TRAIN_VARIANTS, TRAIN_VOICES, check_engines,
                                        trim_silence)
from trainer.data.corpus.suite import (CHANGED, OOD_SUITE, SPLITS, SPOKEN, SUITE, UNSEEN_ACCENTS, UNSEEN_VARIANTS,
                                       OodSet)
from trainer.data.corpus.texts import split_of, within, word_list, wordnet_phrases, wordnet_sentences

__all__ = ["VERSION", "build_corpus", "EDGE_S", "HELD_OUT_VOICES", "TRAIN_VARIANTS", "TRAIN_VOICES",
           "check_engines", "trim_silence", "CHANGED", "OOD_SUITE", "SPLITS", "SPOKEN", "SUITE", "UNSEEN_ACCENTS",
           "UNSEEN_VARIANTS", "OodSet", "split_of", "within", "word_list", "wordnet_phrases", "wordnet_sentences"]
