"""Waveform augmentation of training utterances (``data.augment``, trainer.data.augment): each effect on its share,
every draw a function of (seed, epoch, utterance), dev sets untouched."""
import math

import pytest
import torch

from tests.support.audio import band_share, tone
from trainer.config import AugmentConfig, DataConfig
from trainer.data import effects
from trainer.data.augment import WaveAugment
from trainer.data.batches import SpeechDataset
from trainer.data.sources import read_manifest
from trainer.data.text import Tokenizer

EVERYTHING = AugmentConfig(noise_prob=1.0, reverb_prob=1.0, telephone_prob=1.0)


def test_nothing_drawn_is_the_waveform_itself():
    wave = tone(200)
    assert WaveAugment(AugmentConfig(), None)(wave, "1:0:7:augment") is wave


def test_the_same_key_gives_the_same_audio_and_another_key_other_audio():
    augment, wave = WaveAugment(EVERYTHING, None), tone(200)
    a, b, c = augment(wave, "1:0:7"), augment(wave, "1:0:7"), augment(wave, "1:1:7")
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_noise_lands_at_a_drawn_snr_and_the_telephone_channel_cuts_the_high_band():
    wave = tone(300) + 0.1 * tone(5000)
    noisy = WaveAugment(AugmentConfig(noise_prob=1.0, noise_snr_db=[12.0, 12.0]), None)(wave, "k")
    assert 20 * math.log10(effects.rms(wave) / effects.rms(noisy - wave)) == pytest.approx(12.0, abs=1e-3)
    phone = WaveAugment(AugmentConfig(telephone_prob=1.0), None)(wave, "k")
    assert band_share(wave, 3800, 8000) > 0.005 and band_share(phone, 3800, 8000) < 1e-4


def test_each_effect_falls_on_its_share_of_the_utterances():
    wave = tone(300)
    for cfg in (AugmentConfig(noise_prob=0.3), AugmentConfig(reverb_prob=0.3), AugmentConfig(telephone_prob=0.3)):
        augment = WaveAugment(cfg, None)
        changed = sum(not torch.equal(augment(wave, f"5:0:{i}"), wave) for i in range(400)) / 400
        assert changed == pytest.approx(0.3, abs=0.07)


@pytest.fixture(scope="module")
def dev(corpus, tmp_path_factory):
    utts, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    tok = Tokenizer.train([u.text for u in utts], str(tmp_path_factory.mktemp("augment") / "t.model"), 40)
    return utts[:12], tok


def test_a_training_set_augments_each_epoch_anew_and_repeatably_and_a_dev_set_never(dev):
    utts, tok = dev
    data = DataConfig(augment=EVERYTHING.model_dump(), specaugment={"freq_masks": 0, "time_masks": 0})
    train, again = (SpeechDataset(utts, tok, data, 80, train=True, seed=5) for _ in range(2))
    first = [train[i][0] for i in range(4)]
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))  # a fresh loader, a resume: the same
    train.epoch = 1
    assert not any(torch.allclose(a, train[i][0]) for i, a in enumerate(first))
    plain = SpeechDataset(utts, tok, DataConfig(), 80, train=False)
    assert all(torch.equal(plain[i][0], SpeechDataset(utts, tok, data, 80, train=False)[i][0]) for i in range(4))


def test_the_cache_holds_what_an_epoch_leaves_as_recorded_and_gives_it_back_as_computed(dev):
    utts, tok = dev
    data = DataConfig(augment={"noise_prob": 0.5}, speed_perturb=[1.0, 1.1],
                      specaugment={"freq_masks": 0, "time_masks": 0})
    train, uncached = SpeechDataset(utts, tok, data, 80, True, seed=5), \
        SpeechDataset(utts, tok, data.model_copy(update={"cache_features": False}), 80, True, seed=5)
    plain = []
    for epoch in (0, 1):
        train.epoch = uncached.epoch = epoch
        plain.append({i for i in range(len(utts)) if train.plain(i)})
        for _ in range(2):  # the second pass reads this epoch's plain utterances from the cache
            assert all(torch.equal(train[i][0], uncached[i][0]) for i in range(len(utts)))
    assert 0 < len(plain[0]) < len(utts) and set(train.cache) == plain[0] | plain[1]
