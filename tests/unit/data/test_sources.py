"""Reading the data sources (trainer.data.sources): manifests, Lhotse cut sets and Shar shards, Hugging Face
datasets; bad rows, cuts and shard members named, then skipped or refused."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.support.audio import tone_samples, write_manifest
from tools.make_cuts import make_cuts
from tools.make_shards import make_shards
from trainer.config import DataConfig, HFSource
from trainer.data.audio import load_audio
from trainer.data.batches import ShardSet, SpeechDataset
from trainer.data.sources import DataError, read_cuts, read_manifest, read_shards, read_sources, tar_index


def test_bad_rows_are_named_skipped_or_refused_in_strict_mode(tmp_path):
    sf.write(tmp_path / "ok.wav", tone_samples(), 16000)
    (tmp_path / "empty.wav").write_bytes(b"")
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio_filepath": "ok.wav", "duration": 1.0, "text": "fine"},
        "{not json",
        {"audio_filepath": "ok.wav", "text": "no duration"},
        {"audio_filepath": "ok.wav", "duration": 0, "text": "zero"},
        {"audio_filepath": "ok.wav", "duration": 9999, "text": "absurd"},
        {"audio_filepath": "ok.wav", "duration": 1.0, "text": "123 %%"},
        {"audio_filepath": "gone.wav", "duration": 1.0, "text": "missing"},
        {"audio_filepath": "empty.wav", "duration": 1.0, "text": "empty file"}])
    utts, problems = read_sources([m], [], 20.0, strict=False)
    assert [u.text for u in utts] == ["fine", "missing", "empty file"]  # audio is checked when it is loaded
    for line, words in [(2, "not JSON"), (3, "missing key 'duration'"), (4, "not positive"), (5, "exceeds"),
                        (6, "no letter")]:
        assert any(p.startswith(f"{m}:{line}: ") and words in p for p in problems), (line, problems)
    assert len(problems) == 5
    with pytest.raises(DataError) as e:
        read_sources([m], [], 20.0, strict=True)
    assert f"{m}:7: audio {tmp_path / 'gone.wav'} does not exist" in str(e.value)
    assert f"{m}:8: audio" in str(e.value) and "7 unusable rows" in str(e.value)


def test_a_manifest_line_that_is_not_utf8_is_named_and_skipped_or_refused(tmp_path):
    sf.write(tmp_path / "ok.wav", tone_samples(), 16000)
    good = json.dumps({"audio_filepath": "ok.wav", "duration": 1.0, "text": "fine"}).encode()
    m = tmp_path / "m.jsonl"
    m.write_bytes(good + b"\n" + b'{"audio_filepath": "ok.wav", "duration": 1.0, "text": "caf\xe9"}\n' + good + b"\n")
    utts, problems = read_sources([str(m)], [], 20.0, strict=False)
    assert [u.origin for u in utts] == [f"{m}:1", f"{m}:3"]
    assert problems == [f"{m}:2: not UTF-8 (byte 0xe9 at column 59)"]
    with pytest.raises(DataError, match="1 unusable rows"):
        read_sources([str(m)], [], 20.0, strict=True)


def test_hugging_face_saved_audiofolder_and_parquet(tmp_path, tokenizer):
    import datasets
    for i, secs in enumerate((0.6, 1.1)):
        sf.write(tmp_path / f"u{i}.wav", tone_samples(secs), 16000)
    blobs = [(tmp_path / f"u{i}.wav").read_bytes() for i in range(2)]
    table = {"speech": [{"bytes": b, "path": None} for b in blobs], "sentence": ["hello world", "the fox"]}
    plain = datasets.Features({"speech": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                               "sentence": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(table, features=plain).cast_column("speech", datasets.Audio(decode=False))
    assert isinstance(ds.features["speech"], datasets.Audio)
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part0.parquet"))
    folder = tmp_path / "af"
    folder.mkdir()
    for i in range(2):
        (folder / f"u{i}.wav").write_bytes(blobs[i])
    (folder / "metadata.csv").write_text("file_name,sentence\nu0.wav,hello world\nu1.wav,the fox\n")
    for kind, path in (("saved", "saved"), ("parquet", "pq"), ("audiofolder", "af")):
        src = HFSource(path=str(tmp_path / path), kind=kind, audio_column="speech" if kind != "audiofolder"
                       else "audio", text_column="sentence")
        utts, problems = read_sources([], [src], 20.0, strict=True)
        assert problems == [] and sorted(u.text for u in utts) == ["hello world", "the fox"], kind
        assert sorted(round(u.duration, 2) for u in utts) == [0.6, 1.1]
        feats = SpeechDataset(utts, tokenizer, DataConfig(), 80, train=False)[0][0]
        assert feats.shape[1] == 80 and feats.shape[0] in (58, 108)
    with pytest.raises(DataError, match=r"no column 'audio' \(columns: speech, sentence\)"):
        read_sources([], [HFSource(path=str(tmp_path / "saved"))], 20.0, strict=False)
    # Durations are read from the headers once, then from the cache of this dataset's fingerprint.
    src, cache = HFSource(path=str(tmp_path / "saved"), audio_column="speech", text_column="sentence"), tmp_path / "d"
    first = read_sources([], [src], 20.0, strict=True, duration_cache=str(cache))[0]
    [stored] = cache.glob("*.json")
    stored.write_text(json.dumps([0.25, "audio unreadable (planted)"]))
    second, problems = read_sources([], [src], 20.0, strict=False, duration_cache=str(cache))
    assert [round(u.duration, 2) for u in first] == [0.6, 1.1] and [u.duration for u in second] == [0.25]
    assert problems == [f"{src.path}[1]: audio unreadable (planted)"]


def test_lhotse_cut_sets_one_utterance_per_supervision_at_its_offset(tmp_path, corpus):
    manifest = str(corpus / "dev.jsonl")
    plain, _ = read_manifest(manifest, 20.0)
    # Libriheavy's layout (one cut per supervision, offsets into long recordings) and whole-recording cuts with
    # several supervisions each; audio paths relative to the cut set's folder.
    for whole in (False, True):
        cuts = make_cuts(manifest, str(tmp_path / f"{whole}.jsonl.gz"), join=3, whole=whole)
        utts, problems = read_cuts(str(cuts), 20.0, root=str(tmp_path), deep=True)
        assert problems == [] and [u.text for u in utts] == [u.text for u in plain]
        for u, p in list(zip(utts, plain))[:7]:  # each segment is exactly its utterance's audio
            a, b = load_audio(u.audio, u.offset, u.duration), load_audio(p.audio)
            assert u.segment and torch.equal(a, b)
    assert utts[1].offset > 0 and "supervision" in utts[1].origin


def test_bad_cuts_are_named_and_skipped_or_refused_and_channels_mixed(tmp_path):
    from lhotse import CutSet, Recording
    wave = tone_samples(1.0)
    sf.write(tmp_path / "stereo.flac", np.stack([wave, 0.5 * wave], 1), 16000)
    good = Recording.from_file(tmp_path / "stereo.flac").to_cut()
    rows = [good.to_dict() for _ in range(5)]
    for row, text in zip(rows, ("", "x", "", "y", "z")):
        row["supervisions"] = [{"id": "s", "recording_id": row["recording"]["id"], "start": 0.0, "duration": 1.0,
                                "channel": [0, 1], "text": text}]
    rows[0]["supervisions"][0].update(text=None, custom={"texts": ["A stereo tone!", "A STEREO TONE"]})  # Libriheavy
    rows[1]["recording"]["sources"][0]["source"] = str(tmp_path / "gone.flac")
    rows[3]["start"] = 2.5  # past the end of the 1 s recording
    del rows[4]["supervisions"]
    path = write_manifest(tmp_path / "cuts.jsonl", rows + ["{not json"])
    assert list(CutSet.from_file(write_manifest(tmp_path / "ok.jsonl", rows[:1])).ids) == [good.id]  # as Lhotse
    utts, problems = read_cuts(path, 20.0, deep=True)  # strict: audio checked at start-up
    assert [u.text for u in utts] == ["A stereo tone!"]  # normalised as every text is, when tokenised
    assert torch.allclose(load_audio(utts[0].audio, 0.0, 1.0), torch.from_numpy(0.75 * wave), atol=1e-4)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{n} (cut {good.id})" for n in (2, 3, 4, 5)] + \
        [f"{path}:6"]
    assert f"audio {tmp_path / 'gone.flac'} does not exist" in problems[0] and "has no letter" in problems[1]
    assert "2.50-3.50 s lies past the end of recording" in problems[2] and "no supervision" in problems[3]
    assert "not a Lhotse cut" in problems[4]
    with pytest.raises(DataError, match="5 unusable rows"):
        read_sources([], [], 20.0, strict=True, cuts=[path])


def test_damaged_shard_members_are_skipped_and_named(tmp_path, corpus, tokenizer, capsys):
    plain, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    make_shards(plain[:6], str(tmp_path / "s"), shard_size=6)
    tar = str(tmp_path / "s" / "recording.000000.tar")
    offset, size = tar_index(tar)[sorted(tar_index(tar))[1]]
    with open(tar, "r+b") as f:  # the second member's FLAC header overwritten, same size
        f.seek(offset)
        f.write(b"\0" * 64)
    with open(tar, "r+b") as f:  # the last member cut short
        f.truncate(tar_index(tar)[sorted(tar_index(tar))[-1]][0] + 100)
    tar_index.cache_clear()
    utts, problems = read_shards(str(tmp_path / "s"), 20.0)
    ds = SpeechDataset(utts, tokenizer, DataConfig(), 80, train=False)
    assert [ds[i] is None for i in range(6)] == [False, True, False, False, False, True]
    err = capsys.readouterr().err
    assert f"cuts.000000.jsonl.gz:2 (cut {sorted(tar_index(tar))[1]})" in err and "truncated" in err
    make_shards(plain[:4], str(tmp_path / "t"), shard_size=2)
    os.remove(tmp_path / "t" / "recording.000001.tar")  # a shard's audio gone: skipped, or refused when strict
    assert ShardSet([str(tmp_path / "t")], 20.0).problems == [f"{tmp_path / 't' / 'cuts.000001.jsonl.gz'}: no "
                                                             "recording.000001.tar beside it"]
    with pytest.raises(DataError, match="1 unusable rows"):
        read_sources([], [], 20.0, strict=True, shards=[str(tmp_path / "t")])
