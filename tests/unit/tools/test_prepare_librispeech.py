"""tools/prepare_librispeech.py: LibriSpeech's folder layout as a manifest."""
import soundfile as sf

from tests.support.audio import tone_samples
from tools.prepare_librispeech import main as prepare_librispeech
from trainer.data.sources import read_manifest


def test_prepare_librispeech_layout(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for spk, chap, n in (("84", "121123", 2), ("1272", "128104", 1)):
        d = root / spk / chap
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            uid = f"{spk}-{chap}-{i:04d}"
            sf.write(d / f"{uid}.flac", tone_samples(0.5 + i), 16000)
            lines.append(f"{uid} GO DO YOU HEAR")
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "data" / "dev-clean.jsonl"
    assert prepare_librispeech([str(root), str(out)]) == 0
    utts, problems = read_manifest(str(out), 20.0, deep=True)
    assert problems == [] and len(utts) == 3
    assert sorted(u.duration for u in utts) == [0.5, 0.5, 1.5]
    assert prepare_librispeech([str(tmp_path), str(tmp_path / "x.jsonl")]) == 2
