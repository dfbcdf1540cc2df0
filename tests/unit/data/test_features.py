"""Features (trainer.data.features) on real utterances: in the loader and on the device (``data.features_on``)
the same features, the same masks, and each key of a readied batch where the trainer reads it; SpecAugment,
speed perturbation and global CMVN."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from tests.support.audio import tone_samples, write_manifest
from tests.support.builders import queued_gpu_seed
from tools.compute_cmvn import main as compute_cmvn
from trainer.config import DataConfig, SpecAugmentConfig
from trainer.data.batches import SpeechDataset
from trainer.data.features import SpecAugment, frame_count
from trainer.data.sources import read_manifest
from trainer.data.text import Tokenizer

TOLERANCE = 1e-3  # max abs difference of normalised features; measured on this CPU: 1.5e-6 (per utterance), 0
MASKS = {"freq_masks": 2, "time_masks": 4}


@pytest.fixture(scope="module")
def dev(corpus, tmp_path_factory):
    """The corpus's dev utterances, a tokenizer, and global CMVN statistics of them."""
    utts, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    folder = tmp_path_factory.mktemp("features")
    tok = Tokenizer.train([u.text for u in utts], str(folder / "t.model"), 40)
    assert compute_cmvn(["--manifest", str(corpus / "dev.jsonl"), "--out", str(folder / "cmvn.json")]) == 0
    return utts, tok, str(folder / "cmvn.json")


@pytest.mark.parametrize("cmvn", [False, True])
def test_device_features_equal_loader_features_on_padded_batches(dev, cmvn):
    """Batches of mixed lengths (the shortest utterance beside the longest), per-utterance or global
    normalisation, SpecAugment on, two epochs: the device's features are the loader's within TOLERANCE, zero past
    each utterance's frames, and masked at the same positions by the same masks."""
    utts, tok, stats = dev
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration)
    batches = [order[k::6] for k in range(6)]  # each spans the whole range of lengths
    data = {"specaugment": MASKS, "global_cmvn": stats if cmvn else ""}
    loader_ds, device_ds = (SpeechDataset(utts, tok, DataConfig(features_on=on, **data), 80, train=True, seed=3)
                            for on in ("loader", "device"))
    worst, masked = 0.0, 0
    for epoch in (0, 1):
        loader_ds.epoch = device_ds.epoch = epoch
        for ids in batches:
            a, b = (ds.on_device(ds.collate([ds[i] for i in ids]), "cpu") for ds in (loader_ds, device_ds))
            lengths = b["lengths"]
            assert torch.equal(a["lengths"], lengths) and a["feats"].shape == b["feats"].shape
            assert lengths.min() < 0.5 * lengths.max()
            assert all(not b["feats"][k, n:].any() for k, n in enumerate(lengths.tolist()))
            worst = max(worst, float((a["feats"] - b["feats"]).abs().max()))
            assert torch.equal(a["freq_masks"], b["freq_masks"]) and torch.equal(a["time_masks"], b["time_masks"])
            assert torch.equal(a["feats"] == 0, b["feats"] == 0)  # the same masked positions (and padding)
            masked += int((b["time_masks"][..., 1] > 0).sum() + (b["freq_masks"][..., 1] > 0).sum())
    assert worst <= TOLERANCE and masked > 100


def test_masks_are_torchaudios_draws_from_the_utterances_own_seed():
    """What torchaudio's FrequencyMasking and TimeMasking(p=0.2) drew from the seeded global stream, whatever the
    length (under 5 frames a time mask draws nothing; torchaudio fails on 0 frames), drawn without touching the
    global stream."""
    cfg = SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=3, time_width=40)
    masks = [torchaudio.transforms.FrequencyMasking(27)] * 2 + [torchaudio.transforms.TimeMasking(40, p=0.2)] * 3
    augment, state = SpecAugment(cfg, 80), torch.get_rng_state()
    for frames in (1, 3, 4, 5, 9, 57, 203, 1500):
        for seed in range(50):
            freq, time = (m[0] for m in augment.tensors([augment.draw(frames, seed)]))
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                x = torch.ones(1, 80, frames)
                for m in masks:
                    x = m(x)
            expected = torch.ones(1, 80, frames)
            for start, width in freq.tolist():
                expected[:, start:start + width] = 0
            for start, width in time.tolist():
                expected[..., start:start + width] = 0
            assert torch.equal(x, expected), (frames, seed)
            assert time[:, 1].max() <= frames // 5
    assert torch.equal(torch.get_rng_state(), state)
    assert augment.draw(0, 1)[2:] == [(0, 0)] * 3


@pytest.mark.parametrize("on", ["loader", "device"])
def test_a_readied_batch_has_feats_on_the_device_and_host_keys_on_the_host(dev, on):
    """On the meta device (no GPU here): features and targets go there; the frame and target counts, the
    weights and the utterance indices stay on the CPU, where the trainer reads them."""
    utts, tok, _ = dev
    ds = SpeechDataset(utts, tok, DataConfig(features_on=on), 80, train=False)
    batch = ds.collate([ds[i] for i in range(5)])
    assert ("waves" in batch) == (on == "device") and ("feats" in batch) == (on == "loader")
    if on == "device":
        assert batch["waves"].dtype == torch.float32 and batch["waves"].shape[1] == batch["wave_lengths"].max()
        assert torch.equal(batch["lengths"], frame_count(batch["wave_lengths"]))
    ready = ds.on_device(batch, torch.device("meta"))
    assert ready["feats"].shape == (5, int(batch["lengths"].max()), 80) and ready["feats"].dtype == torch.float32
    assert {k for k, v in ready.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"} == \
        {"feats", "targets"}
    assert all(ready[k] is batch[k] for k in ("lengths", "target_lengths", "weight", "index"))


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
    sf.write(tmp_path / "a.wav", tone_samples(2.0) * np.linspace(0.1, 1.0, 32000, dtype="float32"), 16000)
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
