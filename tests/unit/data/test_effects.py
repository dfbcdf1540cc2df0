"""The waveform effects of the out-of-domain suite (trainer.data.effects), each on a signal whose answer is known."""
import math

import pytest
import torch
import torchaudio

from tests.support.audio import band_share, tone
from trainer.data import effects
from trainer.data.audio import SAMPLE_RATE
from trainer.data.features import speed_perturb


def peak_hz(wave: torch.Tensor) -> float:
    power = torch.fft.rfft(wave).abs()
    return float(torch.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)[power.argmax()])


def test_noise_is_added_at_the_snr_asked_for_and_its_colour_tilts_its_spectrum():
    g = torch.Generator().manual_seed(0)
    speech = tone(300)
    for exponent in (0, 1, 2):
        noise = effects.coloured_noise(SAMPLE_RATE, exponent, g)
        assert float(effects.rms(noise)) == pytest.approx(1.0, rel=1e-5)
        noisy = effects.add_noise(speech, noise, 7.5)
        snr = 20 * math.log10(effects.rms(speech) / effects.rms(noisy - speech))
        assert snr == pytest.approx(7.5, abs=1e-3)
    low = [band_share(effects.coloured_noise(SAMPLE_RATE, e, torch.Generator().manual_seed(1)), 0, 500)
           for e in (0, 1, 2)]
    assert low[0] < 0.1 < low[1] < low[2]  # white: 500 of 8000 Hz, 6%; pink and brown put more below 500 Hz


def test_babble_is_other_voices_summed_to_unit_rms_and_looped_to_length():
    mix = effects.babble([tone(200)[:4000], tone(330)], SAMPLE_RATE)
    assert len(mix) == SAMPLE_RATE and float(effects.rms(mix)) == pytest.approx(1.0, rel=1e-5)
    assert band_share(mix, 190, 210) > 0.3 and band_share(mix, 320, 340) > 0.3


def test_the_telephone_channel_keeps_300_to_3400_hz_only():
    g = torch.Generator().manual_seed(2)
    wide = effects.coloured_noise(SAMPLE_RATE, 0, g) * 0.1
    phone = effects.telephone(wide)
    assert len(phone) == len(wide)
    assert band_share(wide, 3800, 8000) > 0.5 and band_share(phone, 3800, 8000) < 0.002
    assert band_share(phone, 0, 150) < 0.01 < band_share(wide, 0, 150)


def test_tempo_changes_the_duration_and_keeps_the_pitch_where_speed_moves_both():
    for factor in (0.75, 1.3):
        slower_or_faster = effects.tempo(tone(220), factor)
        assert len(slower_or_faster) == round(SAMPLE_RATE / factor)
        assert peak_hz(slower_or_faster) == pytest.approx(220, abs=3)
        assert peak_hz(speed_perturb(tone(220), factor)) == pytest.approx(220 * factor, abs=3)


def test_a_room_response_decays_60_db_in_its_rt60_and_reverberation_keeps_length_and_level():
    response = effects.room_response(0.6, torch.Generator().manual_seed(3))
    assert len(response) == int(1.2 * 0.6 * SAMPLE_RATE) and float(response[0]) == 1.0
    window = int(0.05 * SAMPLE_RATE)
    early, late = (float(response[a:a + window].pow(2).mean()) for a in (1, int(0.55 * SAMPLE_RATE)))
    assert 10 * math.log10(early / late) == pytest.approx(55, abs=3)  # 0.55 s of a 60 dB / 0.6 s decay
    speech = tone(300)
    wet = effects.reverberate(speech, response)
    assert len(wet) == len(speech) and float(effects.rms(wet)) == pytest.approx(float(effects.rms(speech)), rel=1e-4)
    assert not torch.allclose(wet, speech, atol=0.05)
    direct = torchaudio.functional.convolve(speech, response)[:len(speech)]  # the convolution, computed directly
    assert torch.allclose(wet, direct * effects.rms(speech) / effects.rms(direct), atol=1e-5)


def test_every_draw_is_a_function_of_the_generator_seed():
    a, b = (effects.room_response(0.5, torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(a, b)
    a, b = (effects.coloured_noise(1000, 1, torch.Generator().manual_seed(9)) for _ in range(2))
    assert torch.equal(a, b)
