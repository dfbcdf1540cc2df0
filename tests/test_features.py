"""Features in the loader and on the device (``data.features_on``) on real utterances: the same features, the
same masks, and each key of a readied batch where the trainer reads it."""
import pytest
import torch
import torchaudio

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
