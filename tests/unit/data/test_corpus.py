"""The embedded corpus: its texts and the honesty of its splits (real WordNet, real speech engines)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from trainer.data.audio import SAMPLE_RATE, load_audio
from trainer.data.corpus import (CHANGED, EDGE_S, OOD_SUITE, SPLITS, SPOKEN, SUITE, TRAIN_VARIANTS, TRAIN_VOICES,
                                 UNSEEN_ACCENTS, UNSEEN_VARIANTS, OodSet, build_corpus, trim_silence, wordnet_phrases,
                                 wordnet_sentences, within, word_list)
from trainer.data.corpus.speech import SPLIT_VOICES, _voice_of
from trainer.data.corpus.suite import Room, Tempo


def test_phrases_are_runs_of_listed_words_and_outnumber_whole_sentences():
    known, phrases = word_list(300), wordnet_phrases(300)
    assert all(3 <= len(p.split()) <= 10 and set(p.split()) <= known for p in phrases)
    assert len(set(phrases)) == len(phrases)
    assert len(phrases) > 10 * len(within(wordnet_sentences(), 300))
    # "drive" is not among the 300 words: the example is spoken as the two runs either side of it
    assert "drive" not in known
    assert {"he took the family for a", "in his new car"} <= set(phrases)
    assert "he took the family for a drive in his new car" not in phrases


def test_a_phrase_corpus_holds_its_texts_and_voices_apart_changes_one_thing_per_ood_set_and_rebuilds_the_same(
        tmp_path):
    manifests = build_corpus(str(tmp_path / "c"), 40, seed=1234, words=300, text="phrases")
    rows = {s: [json.loads(line) for line in open(manifests[s])] for s in SPLITS}
    texts = {s: [r["text"] for r in rows[s]] for s in SPLITS}
    voices = {s: {r["voice"] for r in rows[s]} for s in SPLITS}
    assert [len(texts[s]) for s in SPLITS] == [40] + [50] * (len(SPLITS) - 1)
    for i, a in enumerate(("train", "dev", "test", "test_ood")):  # four splits of four text sets
        for b in ("train", "dev", "test", "test_ood")[i + 1:]:
            assert not set(texts[a]) & set(texts[b]), (a, b)
    known = word_list(300)
    assert all(set(t.split()) <= known for s in SPLITS for t in texts[s])
    assert not voices["test_ood"] & (voices["train"] | voices["dev"] | voices["test"])
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["text"] == "phrases"
    # the suite: one change each from the test split (ood_text: from test_ood's texts, in the training voices)
    trained = {f"{engine}:{voice}" for engine, voice, _ in TRAIN_VOICES}
    accents = {accent(v) for v in trained}  # espeak-ng's accents, and flite's and festival's voices
    assert texts["ood_voices"] == texts["ood_accents"] == texts["test"] and texts["ood_text"] == texts["test_ood"]
    assert not voices["ood_voices"] & trained and {accent(v) for v in voices["ood_voices"]} <= accents | {"slt"}
    assert not {accent(v) for v in voices["ood_accents"]} & accents
    assert voices["ood_text"] <= trained and voices["test"] <= trained
    for split in CHANGED:
        assert [(r["text"], r["voice"]) for r in rows[split]] == [(r["text"], r["voice"]) for r in rows["test"]]
        assert all(r["condition"] for r in rows[split])
    tempo = [r["duration"] / t["duration"] for r, t in zip(rows["ood_tempo"], rows["test"])]
    assert all(min(abs(x - 1 / 0.75), abs(x - 1 / 1.3)) < 0.01 for x in tempo)
    assert {r["condition"].split(",")[0] for r in rows["ood_noise"]} <= {"white noise", "pink noise", "brown noise",
                                                                         "babble noise"}
    assert set(OOD_SUITE) == set(SPLITS) - {"train", "dev", "test", "test_ood"}
    # every engine in the draw; no engine's lead-in or end pause beyond EDGE_S (a 10 ms frame of slack)
    assert {v.split(":")[0] for v in voices["train"]} == {"espeak-ng", "flite", "festival"}
    edges = [silent_edges(Path(manifests[s]).parent / r["audio_filepath"]) for s in SPLITS if s not in CHANGED
             for r in rows[s]]
    assert max(max(e) for e in edges) <= EDGE_S + 0.01
    # a second build (other workers, other order of tasks) is the same audio
    again = build_corpus(str(tmp_path / "again"), 40, seed=1234, words=300, text="phrases", workers=1)
    assert [digests(manifests[s]) for s in SPLITS] == [digests(again[s]) for s in SPLITS]


def test_training_draws_span_many_voices_speeds_and_shifts_and_never_the_suites_variants_or_accents():
    draws = [_voice_of(f"phrase {i}", 1234, TRAIN_VOICES) for i in range(3000)]
    espeak = [(voice, setting) for engine, voice, setting in draws if engine == "espeak-ng"]
    assert len({voice for voice, _ in espeak}) >= 100  # of 3 accents x 42 variants
    assert min(s[0] for _, s in espeak) <= 135 and max(s[0] for _, s in espeak) >= 195  # words a minute
    assert min(s[1] for _, s in espeak) <= 35 and max(s[1] for _, s in espeak) >= 65  # pitch
    shifts = [setting[1] for engine, _, setting in draws if engine != "espeak-ng"]
    assert min(shifts) <= 0.95 and max(shifts) >= 1.05
    held_out = {voice.split("+")[1] for engine, voice, _ in UNSEEN_VARIANTS if engine == "espeak-ng"}
    assert held_out and not held_out & set(TRAIN_VARIANTS)
    assert not {accent(f"e:{v}") for _, v, _ in UNSEEN_ACCENTS} & {accent(f"e:{v}") for _, v, _ in TRAIN_VOICES}


def test_the_suite_is_its_table_each_row_spoken_or_one_change_of_the_test_audio_and_the_splits_follow_from_it():
    assert OOD_SUITE == tuple(row.name for row in SUITE) == ("ood_voices", "ood_accents", "ood_text", "ood_noise",
                                                              "ood_telephone", "ood_tempo", "ood_reverb")
    assert len(set(OOD_SUITE)) == len(OOD_SUITE) and not set(OOD_SUITE) & set(SPLIT_VOICES)
    spoken = [row for row in SUITE if row.voices is not None]
    changed = [row for row in SUITE if row.change is not None]
    assert len(spoken) + len(changed) == len(SUITE)  # each row one kind, never both
    assert all(row.texts == "test" for row in changed) and {row.texts for row in spoken} <= {"test", "glosses"}
    assert SPOKEN == {**SPLIT_VOICES, **{row.name: row.voices for row in spoken}}
    assert CHANGED == tuple(row.name for row in changed) and SPLITS == (*SPOKEN, *CHANGED)
    with pytest.raises(ValueError, match="ood_both"):
        OodSet("ood_both", texts="test", voices=TRAIN_VOICES, change=Tempo(factors=(0.75,)))
    with pytest.raises(ValueError, match="ood_neither"):
        OodSet("ood_neither", texts="test")
    with pytest.raises(ValueError, match="ood_changed_glosses"):
        OodSet("ood_changed_glosses", texts="glosses", change=Room(rt60_s=(0.4, 1.0)))


def test_trim_silence_keeps_the_sound_and_a_margin_either_side():
    t = torch.arange(int(0.4 * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.5 * torch.sin(2 * torch.pi * 220 * t)
    hiss = 1e-4 * torch.randn(int(0.5 * SAMPLE_RATE), generator=torch.Generator().manual_seed(0))
    wave = torch.cat([hiss, tone, hiss[:int(0.3 * SAMPLE_RATE)]])
    trimmed = trim_silence(wave, keep_s=0.1)
    start = int(0.4 * SAMPLE_RATE)  # 0.5 s of hiss, less the 0.1 s kept
    assert torch.equal(trimmed, wave[start:start + int(0.6 * SAMPLE_RATE)])
    assert torch.equal(trim_silence(tone), tone)  # nothing to cut


def accent(voice: str) -> str:
    """"espeak-ng:en-gb+f4" -> "en-gb"; "flite:slt" -> "slt"."""
    return voice.split(":")[1].split("+")[0]


def silent_edges(path) -> tuple:
    """Seconds of silence (10 ms frames 40 dB under the loudest) before the first and after the last sound."""
    wave = load_audio(path)
    frames = wave[:len(wave) // 160 * 160].reshape(-1, 160)
    level = 10 * torch.log10(frames.pow(2).mean(1) + 1e-10)
    sounding = torch.nonzero(level > level.max() - 40).squeeze(1)
    return int(sounding[0]) / 100, (len(frames) - 1 - int(sounding[-1])) / 100


def digests(manifest: str) -> list:
    folder = Path(manifest).parent
    return [hashlib.sha256((folder / json.loads(line)["audio_filepath"]).read_bytes()).hexdigest()
            for line in open(manifest)]
