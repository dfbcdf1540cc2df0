"""Loading audio (trainer.data.audio): formats, rates and channels become 16 kHz mono; NaN or infinite
samples are bad audio."""
import numpy as np
import soundfile as sf
import torch

from tests.support.audio import tone_samples, write_manifest
from trainer.config import DataConfig
from trainer.data.batches import SpeechDataset
from trainer.data.sources import read_manifest


def test_formats_rates_and_channels_become_16k_mono(tmp_path, tokenizer):
    sf.write(tmp_path / "a.wav", tone_samples(1.0, 8000, 2), 8000)
    sf.write(tmp_path / "b.flac", tone_samples(0.5, 16000), 16000)
    sf.write(tmp_path / "c.ogg", tone_samples(0.8, 22050), 22050)
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


def test_audio_with_nan_or_inf_samples_is_bad_audio(tmp_path, tokenizer, capsys):
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        wave = tone_samples()
        wave[100:103] = value
        sf.write(tmp_path / f"{name}.wav", wave, 16000, subtype="FLOAT")  # float WAV keeps them
    sf.write(tmp_path / "ok.wav", tone_samples(), 16000, subtype="FLOAT")
    rows = [{"audio_filepath": f"{n}.wav", "duration": 1.0, "text": "hello"} for n in ("nan", "ok", "inf")]
    utts, _ = read_manifest(write_manifest(tmp_path / "m.jsonl", rows), 20.0)
    batch = SpeechDataset(utts, tokenizer, DataConfig(), 80, train=True).collate(
        [SpeechDataset(utts, tokenizer, DataConfig(), 80, train=True)[i] for i in range(3)])
    assert batch["skipped"] == 2 and batch["index"].tolist() == [1] and torch.isfinite(batch["feats"]).all()
    err = capsys.readouterr().err
    assert "m.jsonl:1" in err and "3 samples are NaN or infinite" in err and "m.jsonl:3" in err
