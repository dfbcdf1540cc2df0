"""Batches (trainer.data.batches): bounded and deterministic, each rank's share of the rows and of the shards,
shards read lazily, and a batch whose audio is undecodable."""
import os
from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.support.audio import tone_samples, write_manifest
from tools.make_shards import make_shards
from trainer.config import DataConfig
from trainer.data.batches import (STAND_IN_FRAMES, ShardSet, SpeechDataset, epoch_batches, length_batches, loader,
                                  padding_fraction, shard, tokenizer_sample, train_batches)
from trainer.data.sources import load_utterance, read_manifest, read_shards


@pytest.mark.parametrize("features_on", ["loader", "device"])
def test_undecodable_audio_is_skipped_and_an_all_bad_batch_carries_no_loss(tmp_path, tokenizer, capsys, features_on):
    sf.write(tmp_path / "ok.flac", tone_samples(), 16000)
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
