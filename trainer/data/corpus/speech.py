"""The corpus's speakers: Debian's offline engines (espeak-ng through its library, flite and festival as
commands), their voices and the draw of a voice, speed and pitch per text, and the trimming of their silences."""
import ctypes
import ctypes.util
import os
import random
import shutil
import subprocess
import tempfile

import numpy as np
import torch

from trainer.data.audio import SAMPLE_RATE, load_audio, resample
from trainer.data.features import speed_perturb

EDGE_S, SILENCE_DB = 0.1, 40.0  # silence kept either side of a sentence; silence: this far under the loudest
# espeak-ng's voice variants heard in training: its own m/f sets, its Klatt synthesisers, and the named variants
# that sound like speech (not whisper, croak or the robots); the suite's UNSEEN_VARIANTS are never among them.
TRAIN_VARIANTS = ("m1", "m3", "m4", "m6", "m8", "f2", "f4", "klatt", "klatt2", "klatt3", "klatt4", "Alex", "Alicia",
                  "Andy", "Annie", "anika", "announcer", "aunty", "belinda", "benjamin", "caleb", "david", "ed",
                  "edward", "grandma", "grandpa", "john", "Lee", "linda", "max", "michel", "Michael", "Mike", "paul",
                  "quincy", "rob", "robert", "shelby", "steph", "travis", "victor", "zac")
# (engine, voice, share of utterances). festival starts slowly (0.5 s a process) and flite's awb and rms take
# 90 ms a sentence against 3-30 ms for the others, so they speak smaller shares.
TRAIN_VOICES = [("espeak-ng", f"{accent}+{variant}", 0.77 / 3 / len(TRAIN_VARIANTS))
                for accent in ("en-us", "en-gb", "en-gb-x-rp") for variant in TRAIN_VARIANTS] + \
               [("flite", "kal16", 0.1), ("flite", "awb", 0.05), ("flite", "rms", 0.05),
                ("festival", "voice_kal_diphone", 0.03)]
HELD_OUT_VOICES = [("flite", "slt", 0.5), ("espeak-ng", "en-gb-scotland+m2", 0.25), ("espeak-ng", "en-029+f3", 0.25)]
# Who speaks the four main splits; the out-of-domain suite adds its spoken sets (``suite.SPOKEN``).
SPLIT_VOICES = {"train": TRAIN_VOICES, "dev": TRAIN_VOICES, "test": TRAIN_VOICES, "test_ood": HELD_OUT_VOICES}
ESPEAK_LIBRARY = "libespeak-ng.so.1"  # Debian's libespeak-ng1, which espeak-ng depends on
ENGINE_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival festvox-kallpc16k"}


def _pick(voices: list, rng: random.Random) -> tuple:
    """(engine, voice) drawn by the voices' shares: slow engines speak less."""
    return rng.choices(voices, weights=[w for _, _, w in voices])[0][:2]


def _voice_of(text: str, seed: int, voices: list) -> tuple:
    """(engine, voice, setting) of a text from the seed and the text alone, so a rebuild draws the same."""
    # The setting: espeak-ng's words a minute and pitch; flite's and festival's duration stretch and a shift of
    # pitch and formants together (resampled as speed perturbation is), the variety their few voices lack.
    rng = random.Random(f"{seed}:{text}")
    engine, voice = _pick(voices, rng)
    if engine == "espeak-ng":
        return engine, voice, (rng.randint(130, 200), rng.randint(30, 70))
    return engine, voice, (round(rng.uniform(0.9, 1.15), 2), round(rng.uniform(0.94, 1.06), 2))


_ESPEAK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    """speak_lib.h's espeak_VOICE."""
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


class _Espeak:
    """libespeak-ng in this process: the command would start a process and load its voice data for every
    sentence (30 ms against 3 ms a phrase). A sentence's samples depend on what the library spoke before in
    the process (a length of +-40 samples, other phase), so each task runs in a fresh process."""
    lib, rate, chunks = None, 0, []

    @staticmethod
    @_ESPEAK_CALLBACK
    def _collect(samples, n, events) -> int:
        """The library's callback: keep the samples it hands over, as synchronous output has no other way."""
        if n > 0:
            _Espeak.chunks.append(np.ctypeslib.as_array(samples, (n,)).copy())
        return 0  # go on

    @classmethod
    def _load(cls):
        """Load and initialise the library once per process: its voice data is what costs."""
        cls.lib = ctypes.CDLL(ESPEAK_LIBRARY)
        cls.rate = cls.lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS: samples to a callback
        cls.lib.espeak_SetSynthCallback(cls._collect)

    @classmethod
    def speak(cls, voice: str, text: str, speed: int, pitch: int) -> torch.Tensor:
        """[samples] at 16 kHz of ``text`` in ``voice``: one sentence without a process of its own."""
        if cls.lib is None:
            cls._load()
        cls.chunks.clear()
        # as the espeak-ng command does: a voice name, else a language ("en-gb+f4")
        if cls.lib.espeak_SetVoiceByName(voice.encode()) != 0 and \
                cls.lib.espeak_SetVoiceByProperties(ctypes.byref(_EspeakVoice(languages=voice.encode()))) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        cls.lib.espeak_SetParameter(1, speed, 0)  # espeakRATE
        cls.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH
        data = text.encode()
        if cls.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0x1000, None, None) != 0:  # POS_CHARACTER, ENDPAUSE
            raise RuntimeError(f"espeak-ng failed to speak {text!r}")
        cls.lib.espeak_Synchronize()
        return resample(torch.from_numpy(np.concatenate(cls.chunks).astype(np.float32) / 32768), cls.rate)


def trim_silence(wave: torch.Tensor, keep_s: float = EDGE_S, below_db: float = SILENCE_DB) -> torch.Tensor:
    """[samples] -> [samples] without the engines' silence beyond ``keep_s`` a side: frames that teach nothing."""
    # espeak-ng's end pause, flite's and festival's lead-in: 0.3 s of a 1.35 s phrase. Silent: a 10 ms frame
    # ``below_db`` or more under the loudest frame.
    hop = SAMPLE_RATE // 100
    frames = wave[:len(wave) // hop * hop].reshape(-1, hop)
    if len(frames) == 0:
        return wave
    level = 10 * torch.log10(frames.pow(2).mean(1) + 1e-10)
    sounding = torch.nonzero(level > level.max() - below_db).squeeze(1)
    keep = int(keep_s * SAMPLE_RATE)
    return wave[max(0, int(sounding[0]) * hop - keep):(int(sounding[-1]) + 1) * hop + keep]


def speak(engine: str, voice: str, items: list) -> list:
    """[(text, setting)] -> [samples] waves of one engine and voice: one call per task, whatever the engine."""
    if engine == "espeak-ng":
        return [_Espeak.speak(voice, text, *setting) for text, setting in items]
    with tempfile.TemporaryDirectory() as tmp:
        return _speak_files(engine, voice, items, tmp)


def _speak_files(engine: str, voice: str, items: list, tmp: str) -> list:
    """flite or festival: [(text, setting)] -> waves; festival in one process for all, as it takes 0.5 s to start."""
    wavs = [os.path.join(tmp, f"{i}.wav") for i in range(len(items))]
    if engine == "flite":
        for (text, (stretch, _)), wav in zip(items, wavs):
            subprocess.run(["flite", "-voice", voice, "--setf", f"duration_stretch={stretch:.2f}", "-t", text,
                            "-o", wav], check=True, capture_output=True)
    else:
        script = os.path.join(tmp, "speak.scm")
        with open(script, "w") as f:
            f.write(f"({voice})\n" + "".join(f"(Parameter.set 'Duration_Stretch {stretch:.2f})\n"
                                              f'(utt.save.wave (SynthText "{text}") "{wav}" \'riff)\n'
                                              for (text, (stretch, _)), wav in zip(items, wavs)))
        subprocess.run(["festival", "-b", script], check=True, capture_output=True)
    return [speed_perturb(load_audio(wav), shift) for (_, (_, shift)), wav in zip(items, wavs)]


def check_engines():
    """Name the Debian packages of missing engines before a build starts, not after minutes of it."""
    found = {"espeak-ng": ctypes.util.find_library("espeak-ng"), "flite": shutil.which("flite"),
             "festival": shutil.which("festival")}
    missing = [ENGINE_PACKAGES[engine] for engine, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"speech engines missing: apt-get install {' '.join(missing)}")
