"""The embedded default corpus: English sentences from WordNet spoken by Debian's offline speech engines.

Training voices (espeak-ng's three main English accents in 42 voice variants, its Klatt synthesisers among them,
at 130-200 words a minute and pitch 30-70; flite kal16/awb/rms and festival kal_diphone stretched in duration and
shifted in pitch and formants) speak WordNet's usage examples, split train/dev/test by a hash of their normalised
text, so no sentence is in two splits. A fourth split, ``test_ood``, is held out twice over: other voices (flite
slt, espeak-ng's Scottish and Caribbean accents) speaking another text source (WordNet's glosses). The
out-of-domain suite (``OOD_SUITE``) changes one thing each: the test phrases in espeak-ng variants never trained
on (``ood_voices``), in accents never trained on (``ood_accents``), the glosses in the training voices
(``ood_text``), and the test audio itself with noise, through a telephone channel, at another tempo, in a room
(``CHANGED``, ``trainer.data.effects``). With a word list (the N most frequent words of the usage examples), every
split speaks only texts made of those words: spelling can then be learnt from a few thousand sentences, and
errors measure hearing rather than orthography. The texts are whole usage examples or, many more of them, the
phrases of listed words within the examples (``wordnet_phrases``). Voice, speed and pitch are drawn from the seed
and the text, and every task of the build runs in a fresh process, so a rebuild is the same audio. The engines'
silence beyond 0.1 s either side of a sentence is cut (``trim_silence``). Written as 16 kHz FLAC plus NeMo-style
JSON-lines manifests, built in a temporary folder and renamed into place (one builder at a time, under a lock,
``trainer.runtime.locks``): an interrupted build leaves no half corpus.
"""
import ctypes
import ctypes.util
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections import Counter
from functools import lru_cache
import tempfile
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from trainer.data import effects
from trainer.runtime import locks
from trainer.data.audio import SAMPLE_RATE, load_audio, resample
from trainer.data.features import speed_perturb
from trainer.data.text import normalize

WORDNET = Path("/usr/share/wordnet")
VERSION = 7  # 3: espeak-ng by its library; 4: edges trimmed; 5: OOD suite; 6: wide voices; 7: narrower ranges
EDGE_S, SILENCE_DB = 0.1, 40.0  # silence kept either side of a sentence; silence: this far under the loudest
# espeak-ng's voice variants heard in training: its own m/f sets, its Klatt synthesisers, and the named variants
# that sound like speech (not whisper, croak or the robots); the variants of UNSEEN_VARIANTS are never among them.
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
# The out-of-domain suite: the test phrases (ood_text: WordNet's glosses) with one condition changed in each.
UNSEEN_VARIANTS = [("espeak-ng", f"{accent}+{variant}", 0.8 / 18) for accent in ("en-us", "en-gb", "en-gb-x-rp")
                   for variant in ("m2", "m5", "m7", "f1", "f3", "f5")] + [("flite", "slt", 0.2)]
UNSEEN_ACCENTS = [("espeak-ng", f"{accent}+{variant}", 1 / 20) for variant in ("m1", "m3", "f2", "f4")
                  for accent in ("en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc")]
SPOKEN = {"train": TRAIN_VOICES, "dev": TRAIN_VOICES, "test": TRAIN_VOICES, "test_ood": HELD_OUT_VOICES,
          "ood_voices": UNSEEN_VARIANTS, "ood_accents": UNSEEN_ACCENTS, "ood_text": TRAIN_VOICES}
CHANGED = ("ood_noise", "ood_telephone", "ood_tempo", "ood_reverb")  # the test split's audio, through an effect
OOD_SUITE = ("ood_voices", "ood_accents", "ood_text", *CHANGED)
ESPEAK_LIBRARY = "libespeak-ng.so.1"  # Debian's libespeak-ng1, which espeak-ng depends on
ENGINE_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival festvox-kallpc16k"}
SPLITS = (*SPOKEN, *CHANGED)
_CLEAN = re.compile(r"^[A-Za-z][A-Za-z ,.;:'?!]*$")


def wordnet_sentences(kind: str = "examples", min_words: int = 3, max_words: int = 10) -> list[str]:
    """WordNet's quoted usage examples, or its glosses (definitions), that are plain words only:
    no digits, symbols or abbreviations, so the transcript is exactly what is spoken."""
    seen, out = set(), []
    for text in _wordnet_texts(kind):
        if not _CLEAN.match(text) or re.search(r"\b[A-Z]{2,}\b", text):
            continue
        norm = normalize(text)
        if min_words <= len(norm.split()) <= max_words and norm not in seen:
            seen.add(norm)
            out.append(norm)
    return out


def _wordnet_texts(kind: str) -> list[str]:
    """Every quoted usage example, or the first clause of every gloss, as written."""
    if not WORDNET.exists():
        raise FileNotFoundError(f"{WORDNET} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(errors="replace").splitlines():
            if "|" in line:
                gloss = line.split("|", 1)[1]
                out += re.findall(r'"([^"]+)"', gloss) if kind == "examples" else [gloss.split(";")[0].strip()]
    return out


@lru_cache(maxsize=4)
def word_list(words: int) -> frozenset[str]:
    """The ``words`` most frequent words of WordNet's usage examples (once per process: a build asks for it
    for the phrases and again for test_ood's glosses)."""
    counts = Counter(w for s in wordnet_sentences() for w in s.split())
    return frozenset(w for w, _ in counts.most_common(words))


def within(sentences: list[str], words: int) -> list[str]:
    """The sentences made only of the ``words`` most frequent words of WordNet's usage examples (0: all)."""
    if not words:
        return sentences
    known = word_list(words)
    return [s for s in sentences if all(w in known for w in s.split())]


def wordnet_phrases(words: int, min_words: int = 3, max_words: int = 10) -> list[str]:
    """The longest runs of word-list words in WordNet's usage examples ("he took the family for a" and "in
    his new car" from "he took the family for a drive in his new car" when "drive" is not listed): many more
    texts than whole sentences of the same words, so each listed word is heard in many contexts and voices. A
    run ends at punctuation, digits and abbreviations as at an unlisted word; one longer than ``max_words``
    is cut."""
    known, seen, out = word_list(words), set(), []
    for example in _wordnet_texts("examples"):
        for clause in re.split(r"[^A-Za-z' -]+|\b[A-Z]{2,}\b", example):
            run = []
            for word in normalize(clause).split() + [None]:
                if word in known:
                    run.append(word)
                    continue
                for i in range(0, len(run), max_words):
                    text = " ".join(run[i:i + max_words])
                    if len(run[i:i + max_words]) >= min_words and text not in seen:
                        seen.add(text)
                        out.append(text)
                run = []
    return out


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """1 in 20 sentences to dev, 1 in 20 to test, by hash: a sentence always lands in the same split."""
    return {0: "dev", 1: "test"}.get(_digest(sentence) % 20, "train")


def _pick(voices: list, rng: random.Random) -> tuple:
    return rng.choices(voices, weights=[w for _, _, w in voices])[0][:2]


def _voice_of(text: str, seed: int, voices: list) -> tuple:
    """(engine, voice, setting) of a sentence, drawn from ``voices`` by the seed and the sentence alone. The
    setting: espeak-ng's words a minute and pitch; flite's and festival's duration stretch and a shift of pitch
    and formants together (resampled as speed perturbation is: a smaller or larger speaker), the variety these
    engines' few voices lack."""
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
        if n > 0:
            _Espeak.chunks.append(np.ctypeslib.as_array(samples, (n,)).copy())
        return 0  # go on

    @classmethod
    def speak(cls, voice: str, text: str, speed: int, pitch: int) -> torch.Tensor:
        if cls.lib is None:
            cls.lib = ctypes.CDLL(ESPEAK_LIBRARY)
            cls.rate = cls.lib.espeak_Initialize(2, 0, None, 0)  # AUDIO_OUTPUT_SYNCHRONOUS: samples to a callback
            cls.lib.espeak_SetSynthCallback(cls._collect)
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
    """[samples] -> [samples] without the silence the engines put around a sentence beyond ``keep_s`` a side
    (espeak-ng's end pause, flite's and festival's lead-in: 0.3 s of a 1.35 s phrase, frames that cost compute
    and teach nothing). Silent: a 10 ms frame ``below_db`` or more under the loudest frame."""
    hop = SAMPLE_RATE // 100
    frames = wave[:len(wave) // hop * hop].reshape(-1, hop)
    if len(frames) == 0:
        return wave
    level = 10 * torch.log10(frames.pow(2).mean(1) + 1e-10)
    sounding = torch.nonzero(level > level.max() - below_db).squeeze(1)
    keep = int(keep_s * SAMPLE_RATE)
    return wave[max(0, int(sounding[0]) * hop - keep):(int(sounding[-1]) + 1) * hop + keep]


def _speak_files(engine: str, voice: str, items: list, tmp: str) -> list:
    """flite or festival: [(text, setting)] -> waves. Festival speaks the whole list in one process (it takes
    0.5 s to start)."""
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


def _synthesize(task: tuple) -> list:
    """Speak sentences of one engine and voice to FLAC; return their manifest rows."""
    root, engine, voice, jobs = task  # jobs: [(name, text, setting)]
    if engine == "espeak-ng":
        waves = [_Espeak.speak(voice, text, *setting) for _, text, setting in jobs]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            waves = _speak_files(engine, voice, [(text, setting) for _, text, setting in jobs], tmp)
    rows = []
    for (name, text, _), wave in zip(jobs, waves):
        wave = trim_silence(wave)
        rel = f"audio/{name}.flac"
        sf.write(os.path.join(root, rel), wave.numpy(), SAMPLE_RATE)
        rows.append({"audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3), "text": text,
                     "voice": f"{engine}:{voice}"})
    return rows


def _condition(split: str, wave: torch.Tensor, others: list[str], rng: random.Random,
               g: torch.Generator) -> tuple[torch.Tensor, str]:
    """(a test utterance under the condition of ``split``, one of CHANGED, drawn from ``rng`` and ``g``; the
    condition in words). ``others``: files of four other test utterances, the voices of babble noise."""
    if split == "ood_noise":
        kind, snr = rng.choice(effects.NOISES), round(rng.uniform(5.0, 15.0), 1)
        noise = effects.noise(kind, len(wave), g, [load_audio(f) for f in others] if kind == "babble" else [])
        return effects.add_noise(wave, noise, snr), f"{kind} noise, SNR {snr} dB"
    if split == "ood_telephone":
        return effects.telephone(wave), "telephone band, 8-bit mu-law"
    if split == "ood_tempo":
        factor = rng.choice([0.75, 1.3])
        return effects.tempo(wave, factor), f"tempo x{factor}"
    rt60 = round(rng.uniform(0.4, 1.0), 2)
    return effects.reverberate(wave, effects.room_response(rt60, g)), f"room, RT60 {rt60} s"


def _change(task: tuple) -> list:
    """Write the test utterances ``items`` through the condition of ``split``; return their manifest rows."""
    root, split, seed, items, test_rows = task  # items: [(index, test row)]
    rows = []
    for i, row in items:
        rng = random.Random(f"{seed}:{split}:{i}")
        g = torch.Generator().manual_seed(_digest(f"{seed}:{split}:{i}") % 2 ** 63)
        others = [os.path.join(root, test_rows[j]["audio_filepath"])
                  for j in rng.sample([j for j in range(len(test_rows)) if j != i], 4)]
        wave, condition = _condition(split, load_audio(os.path.join(root, row["audio_filepath"])), others, rng, g)
        wave = wave / max(1.0, float(wave.abs().max()) / 0.99)  # no clipping in FLAC
        rel = f"audio/{split}-{i:06d}.flac"
        sf.write(os.path.join(root, rel), wave.numpy(), SAMPLE_RATE)
        rows.append({**row, "audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3),
                     "condition": condition})
    return rows


def _tasks(root: str, chosen: dict, seed: int, size: int = 48) -> list:
    """The sentences grouped by voice, in tasks of ``size`` (festival's in two halves: one per core). The suite's
    sentences are tasks of their own, so adding it left every task of the other splits, and their audio, as it was
    (an engine's output may depend on what its process spoke before)."""
    by_voice = {}
    for split, voices in SPOKEN.items():
        for i, text in enumerate(chosen[split]):
            engine, voice, setting = _voice_of(text, seed, voices)
            by_voice.setdefault((split in OOD_SUITE, engine, voice), []).append((f"{split}-{i:06d}", text, setting))
    tasks = []
    for (_, engine, voice), jobs in by_voice.items():
        step = -(-len(jobs) // 2) if engine == "festival" else size
        tasks += [(root, engine, voice, jobs[i:i + step]) for i in range(0, len(jobs), step)]
    return tasks


def check_engines():
    found = {"espeak-ng": ctypes.util.find_library("espeak-ng"), "flite": shutil.which("flite"),
             "festival": shutil.which("festival")}
    missing = [ENGINE_PACKAGES[engine] for engine, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"speech engines missing: apt-get install {' '.join(missing)}")


def build_corpus(out_dir: str, train_sentences: int, seed: int = 0, workers: int = 0, words: int = 0,
                 text: str = "sentences") -> dict:
    """Build (or reuse, if the same recipe is there) the corpus; return {split: manifest path}.
    ``text``: "sentences" (whole usage examples) or "phrases" (``wordnet_phrases``, needs ``words``)."""
    if text == "phrases" and words <= 0:
        raise ValueError("phrases are runs of a word list's words: give a word list (words > 0)")
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.acquire(out.with_name(out.name + ".lock"), wait=True):  # one builder at a time; others reuse
        return _build(out, train_sentences, seed, workers, words, text)


def _build(out: Path, train_sentences: int, seed: int, workers: int, words: int, text: str) -> dict:
    recipe = {"version": VERSION, "train_sentences": train_sentences, "seed": seed, "words": words, "text": text}
    manifests = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    stamp = out / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return manifests
    check_engines()
    by_split = {s: [] for s in SPLITS}
    texts = wordnet_phrases(words) if text == "phrases" else within(wordnet_sentences(), words)
    for sentence in sorted(texts, key=_digest):
        by_split[split_of(sentence)].append(sentence)
    held = max(50, train_sentences // 15)
    examples = set(by_split["train"] + by_split["dev"] + by_split["test"])
    glosses = [t for t in sorted(within(wordnet_sentences("glosses"), words), key=_digest) if t not in examples]
    chosen = {"train": by_split["train"][:train_sentences], "dev": by_split["dev"][:held],
              "test": by_split["test"][:held], "test_ood": glosses[:held]}
    chosen.update(ood_voices=chosen["test"], ood_accents=chosen["test"], ood_text=glosses[:held])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    tasks = _tasks(str(tmp), chosen, seed)
    tasks.sort(key=lambda t: t[1] != "festival")  # the longest tasks first, so no core idles at the end
    rows = {}
    # One torch thread per worker: the pool already uses every core, and oversubscription costs 4x. A fresh
    # worker per task: a rebuild is the same whichever worker takes which task (see _Espeak).
    pool = Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,), maxtasksperchild=1)
    with pool, tqdm(total=sum(len(t[3]) for t in tasks), desc="synthesising corpus", mininterval=5) as bar:
        for done in pool.imap_unordered(_synthesize, tasks):
            rows.update((row["audio_filepath"], row) for row in done)
            bar.update(len(done))
        test = [rows[f"audio/test-{i:06d}.flac"] for i in range(len(chosen["test"]))]
        changes = [(str(tmp), split, seed, list(enumerate(test))[i:i + 48], test)
                   for split in CHANGED for i in range(0, len(test), 48)]
        for done in pool.imap_unordered(_change, changes):
            rows.update((row["audio_filepath"], row) for row in done)
    for split in CHANGED:
        chosen[split] = chosen["test"]
    for split in SPLITS:
        with open(tmp / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(rows[f"audio/{split}-{i:06d}.flac"]) + "\n" for i in range(len(chosen[split])))
    (tmp / "corpus.json").write_text(json.dumps(recipe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifests
