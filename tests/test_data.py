"""The data pipeline on real audio files: manifests, Lhotse cut sets, Hugging Face datasets, LibriSpeech layout,
bad input."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.common import queued_gpu_seed
from tools.make_cuts import make_cuts
from tools.make_shards import make_shards
from tools.prepare_librispeech import main as prepare_librispeech
from trainer.config import DataConfig, HFSource
from trainer.data.batches import (STAND_IN_FRAMES, ShardSet, SpeechDataset, epoch_batches, length_batches, loader,
                          padding_fraction, shard, tokenizer_sample, train_batches)
from trainer.data.audio import load_audio
from trainer.data.sources import DataError, load_utterance, read_cuts, read_manifest, read_shards, read_sources, tar_index
from trainer.data.text import Tokenizer


def tone(seconds=1.0, rate=16000, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t).astype("float32")
    return np.stack([wave] * channels, 1) if channels > 1 else wave


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer.train(["hello world", "a tone for testing", "the quick brown fox"] * 5, str(path), 30)


def write_manifest(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_formats_rates_and_channels_become_16k_mono(tmp_path, tokenizer):
    sf.write(tmp_path / "a.wav", tone(1.0, 8000, 2), 8000)
    sf.write(tmp_path / "b.flac", tone(0.5, 16000), 16000)
    sf.write(tmp_path / "c.ogg", tone(0.8, 22050), 22050)
    m = write_manifest(tmp_path / "m.jsonl", [
        {"audio_filepath": "a.wav", "duration": 1.0, "text": "hello world"},
        {"audio_filepath": str(tmp_path / "b.flac"), "duration": 0.5, "text": "a tone"},
        {"audio_filepath": "c.ogg", "duration": 0.8, "text": "the fox"},
        {"audio_filepath": "a.wav", "duration": 0.4, "offset": 0.5, "text": "hello"}])
    utts, problems = read_manifest(m, 20.0)
    assert problems == [] and len(utts) == 4
    ds = SpeechDataset(utts, tokenizer, DataConfig(), 80, train=False)
    frames = [ds[i][0].shape for i in range(4)]
    assert [f[1] for f in frames] == [80] * 4
    assert [f[0] for f in frames] == [98, 48, 78, 38]  # 25 ms windows every 10 ms at 16 kHz


def test_bad_rows_are_named_skipped_or_refused_in_strict_mode(tmp_path):
    sf.write(tmp_path / "ok.wav", tone(), 16000)
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
    sf.write(tmp_path / "ok.wav", tone(), 16000)
    good = json.dumps({"audio_filepath": "ok.wav", "duration": 1.0, "text": "fine"}).encode()
    m = tmp_path / "m.jsonl"
    m.write_bytes(good + b"\n" + b'{"audio_filepath": "ok.wav", "duration": 1.0, "text": "caf\xe9"}\n' + good + b"\n")
    utts, problems = read_sources([str(m)], [], 20.0, strict=False)
    assert [u.origin for u in utts] == [f"{m}:1", f"{m}:3"]
    assert problems == [f"{m}:2: not UTF-8 (byte 0xe9 at column 59)"]
    with pytest.raises(DataError, match="1 unusable rows"):
        read_sources([str(m)], [], 20.0, strict=True)


def test_audio_with_nan_or_inf_samples_is_bad_audio(tmp_path, tokenizer, capsys):
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = tone()
        wave[100:103] = value
        sf.write(tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT")  # float WAV keeps them
    sf.write(tmp_path / "ok.wav", tone(), 16000, subtype="FLOAT")
    rows = [{"audio_filepath": f"{n}.wav", "duration": 1.0, "text": "hello"} for n in ("nan", "ok", "inf")]
    utts, _ = read_manifest(write_manifest(tmp_path / "m.jsonl", rows), 20.0)
    batch = SpeechDataset(utts, tokenizer, DataConfig(), 80, train=True).collate(
        [SpeechDataset(utts, tokenizer, DataConfig(), 80, train=True)[i] for i in range(3)])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [1] and torch.isfinite(batch["feats"]).all()
    err = capsys.readouterr().err
    assert "m.jsonl:1" in err and "3 samples are NaN or infinite" in err and "m.jsonl:3" in err


@pytest.mark.parametrize("features_on", ["loader", "device"])
def test_undecodable_audio_is_skipped_and_an_all_bad_batch_carries_no_loss(tmp_path, tokenizer, capsys, features_on):
    sf.write(tmp_path / "ok.flac", tone(), 16000)
    (tmp_path / "trunc.flac").write_bytes((tmp_path / "ok.flac").read_bytes()[:200])
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk" * 10)
    rows = [{"audio_filepath": n, "duration": 1.0, "text": "hello"} for n in ("ok.flac", "trunc.flac", "junk.wav")]
    utts, _ = read_manifest(write_manifest(tmp_path / "m.jsonl", rows), 20.0)
    ds = SpeechDataset(utts, tokenizer, DataConfig(features_on=features_on), 80, train=True)
    batch = ds.collate([ds[0], ds[1], ds[2]])
    assert batch["skipped"] == 2 and batch["weight"].tolist() == [1.0]
    err = capsys.readouterr().err
    assert "m.jsonl:2" in err and "trunc.flac" in err and "m.jsonl:3" in err
    stand_in = ds.on_device(ds.collate([ds[1], ds[2]]), "cpu")  # silence of STAND_IN_FRAMES in either mode
    assert stand_in["skipped"] == 2 and stand_in["weight"].tolist() == [0.0]
    assert stand_in["feats"].shape == (1, STAND_IN_FRAMES, 80) and stand_in["lengths"].tolist() == [STAND_IN_FRAMES]
    assert torch.isfinite(stand_in["feats"]).all()


def test_hugging_face_saved_audiofolder_and_parquet(tmp_path, tokenizer):
    import datasets
    for i, secs in enumerate((0.6, 1.1)):
        sf.write(tmp_path / f"u{i}.wav", tone(secs), 16000)
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
    wave = tone(1.0)
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


def test_shar_shards_hold_the_audio_and_each_rank_reads_its_own_shards_in_turn(tmp_path, corpus, tokenizer):
    plain, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    files, left_out = make_shards(plain, str(tmp_path / "shards"), shard_size=8)
    utts, problems = read_shards(str(tmp_path / "shards"), 20.0, deep=True)
    assert len(files) == 7 and left_out == problems == [] and [u.text for u in utts] == [u.text for u in plain]
    assert all(torch.equal(load_utterance(u), load_utterance(p)) for u, p in list(zip(utts, plain))[:9])
    shards = ShardSet([str(tmp_path / "shards")], 20.0)
    lazy = SpeechDataset([], tokenizer, DataConfig(), 80, train=True, shards=shards)
    for epoch in (0, 1):
        ranks = [list(shards.batches(600, 1234, epoch, r, 2)) for r in range(2)]
        tars = [[b[0][1].audio for b in batches] for batches in ranks]
        assert not set(tars[0]) & set(tars[1])  # a shard belongs to one rank per epoch
        for seq in tars:  # read in turn: a shard left is not come back to within the epoch
            runs = [t for i, t in enumerate(seq) if i == 0 or t != seq[i - 1]]
            assert len(runs) == len(set(runs))
        assert all(len({u.audio for _, u in b}) == 1 for b in ranks[0] + ranks[1])
        assert sorted(u.origin for b in ranks[0] + ranks[1] for _, u in b) == sorted(u.origin for u in utts)
        assert list(epoch_batches(lazy, 600, 1234, epoch, 1, 2, start=3)) == ranks[1][3:]  # a resume position
    assert list(shards.batches(600, 1234, 0, 0, 2)) != list(shards.batches(600, 1234, 1, 0, 2))
    assert lazy[ranks[0][0][0]][2] == ranks[0][0][0][0]  # an item carries its key and utterance
    plan = ranks[0][:3]  # items cross to DataLoader workers whole; augmentation follows the key, not the worker
    alone, workers = (list(loader(lazy, plan, w)) for w in (0, 2))
    assert all(torch.equal(a["feats"], w["feats"]) and torch.equal(a["index"], w["index"])
               for a, w in zip(alone, workers, strict=True))


def test_shards_are_read_lazily_as_a_rank_reaches_them(tmp_path, corpus):
    """Start-up lists the shard files only: a shard's records are read when its rank reaches it (here one
    removed after start-up is missed only at its turn), and the tokenizer's sample stops at its bound."""
    plain, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    make_shards(plain, str(tmp_path / "shards"), shard_size=8)
    shards = ShardSet([str(tmp_path / "shards")], 20.0)
    assert len(shards.shards) == 7 and shards.problems == []
    batches = shards.batches(600, 1234, 0, 0, 1)
    first = next(batches)
    later = next(c for c, t in shards.shards if t != first[0][1].audio)
    os.remove(later)
    with pytest.raises(FileNotFoundError, match=Path(later).name):
        list(batches)
    texts = ShardSet([str(tmp_path / "shards")], 20.0).texts(10, seed=3)
    assert len(texts) == 10 and set(texts) <= {u.text for u in plain}
    assert tokenizer_sample(plain, None, 10, 3) == tokenizer_sample(plain, None, 10, 3) != tokenizer_sample(
        plain, None, 10, 4)
    assert len(tokenizer_sample(plain, None, 10, 3)) == 10
    assert tokenizer_sample(plain, None, 10 ** 6, 3) == [u.text for u in plain]


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


def test_prepare_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, chap, n in (("84", "121123", 2), ("1272", "128104", 1)):
        d = root / spk / chap
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(d / f"{uid}.flac", tone(0.5 + i), 16000)
            lines.append(f"{uid} GO DO YOU HEAR")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data" / "dev-clean.jsonl"
    assert prepare_librispeech([str(root), str(out)]) == 0
    utts, problems = read_manifest(str(out), 20.0, deep=True)
    assert problems == [] and len(utts) == 3
    assert sorted(u.duration for u in utts) == [0.5, 0.5, 1.5]
    assert prepare_librispeech([str(tmp_path), str(tmp_path / "x.jsonl")]) == 2


def test_batches_are_bounded_and_deterministic_and_each_rank_reads_its_share_of_the_rows(corpus):
    utts, _ = read_manifest(str(corpus / "train.jsonl"), 20.0)
    batches = length_batches(utts, 3000)
    assert all(max(utts[i].frames for i in b) * len(b) <= 3000 or len(b) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(utts)))
    unsorted = [list(range(i, min(i + 12, len(utts)))) for i in range(0, len(utts), 12)]
    assert padding_fraction(utts, batches) < 0.5 * padding_fraction(utts, unsorted)
    a = train_batches(utts, 3000, 7, epoch=1, rank=0)
    assert a == train_batches(utts, 3000, 7, epoch=1, rank=0) != train_batches(utts, 3000, 7, epoch=2, rank=0)
    assert sorted(map(sorted, a)) == sorted(map(sorted, batches))
    shares = [read_manifest(str(corpus / "train.jsonl"), 20.0, share=(r, 3))[0] for r in range(3)]
    assert all([u.origin for u in shares[r]] == [u.origin for u in utts[r::3]] for r in range(3))  # every third
    filled = [shard(batches[:5], r, 2) for r in (0, 1)]
    assert len(filled[0]) == len(filled[1]) == 3 and filled[1][-1][1] is True


def test_specaugment_on_training_sets_only_and_a_function_of_seed_epoch_utterance(corpus, tokenizer):
    utts, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    train, dev = (SpeechDataset(utts[:2], tokenizer, DataConfig(), 80, train=t, seed=5) for t in (True, False))
    assert torch.equal(dev[0][0], dev[0][0])
    state, gpu_seed = torch.get_rng_state(), queued_gpu_seed()
    masked = train[0][0]
    assert torch.equal(torch.get_rng_state(), state)  # dropout's stream is not consumed
    assert queued_gpu_seed() == gpu_seed  # nor the GPUs' streams reseeded (fork_rng(devices=[]) restores the CPU's)
    assert not torch.equal(masked, dev[0][0]) and (masked == 0).all(dim=0).any()
    assert torch.equal(masked, train[0][0])
    train.epoch = 1
    assert not torch.equal(masked, train[0][0])
    plain = SpeechDataset(utts[:2], tokenizer, DataConfig(specaugment={"freq_masks": 0, "time_masks": 0}), 80, True)
    assert torch.equal(plain[0][0], dev[0][0])


def test_speed_perturbation_and_global_cmvn_tool(tmp_path, tokenizer):
    from tools.compute_cmvn import main as compute_cmvn
    sf.write(tmp_path / "a.wav", tone(2.0) * np.linspace(0.1, 1.0, 32000, dtype="float32"), 16000)
    m = write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": "a.wav", "duration": 2.0, "text": "hello"}])
    utts, _ = read_manifest(m, 20.0)
    fast = SpeechDataset(utts, tokenizer, DataConfig(speed_perturb=[1.25], specaugment={"freq_masks": 0,
                                                                                        "time_masks": 0}), 80, True)
    assert fast[0][0].shape[0] == 158 and not fast.cache  # 1.6 s of audio; sped up, so not cached
    assert compute_cmvn(["--manifest", m, "--out", str(tmp_path / "cmvn.json")]) == 0
    stats = json.loads((tmp_path / "cmvn.json").read_text())
    assert stats["frames"] == 198 and len(stats["mean"]) == 80
    feats = SpeechDataset(utts, tokenizer, DataConfig(global_cmvn=str(tmp_path / "cmvn.json")), 80, False)[0][0]
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-3, rtol=0)
    torch.testing.assert_close(feats.std(0, unbiased=False), torch.ones(80), atol=1e-2, rtol=0)


def test_tokenizer_tool_and_workers_give_the_same_batches(tmp_path, corpus):
    from tools.train_tokenizer import main as train_tokenizer
    out = tmp_path / "sp.model"
    assert train_tokenizer(["--manifest", str(corpus / "train.jsonl"), "--vocab_size", "40", "--out", str(out)]) == 0
    tok = Tokenizer(str(out))
    assert tok.decode(tok.encode("The Crosswise, dimension!")) == "the crosswise dimension"
    assert train_tokenizer(["--manifest", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    utts, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    ds = SpeechDataset(utts, tok, DataConfig(cache_features=False), 80, train=False)
    batches = length_batches(utts, 3000)
    from trainer.data.batches import loader
    serial = [b["feats"] for b in loader(ds, batches, 0)]
    parallel = [b["feats"] for b in loader(ds, batches, 2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == len(parallel)
