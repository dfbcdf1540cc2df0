"""The embedded default corpus: English sentences from WordNet spoken by Debian's offline speech engines.

Training voices (espeak-ng accents and variants, flite kal16/awb/rms, festival kal_diphone) speak WordNet's
usage examples, split train/dev/test by a hash of their normalised text, so no sentence is in two splits. A
fourth split, ``test_ood``, is held out twice over: other voices (flite slt, espeak-ng's Scottish and
Caribbean accents) speaking another text source (WordNet's glosses). With a word list (the N most frequent
words of the usage examples), every split speaks only sentences made of those words: spelling can then be
learnt from a few thousand sentences, and errors measure hearing rather than orthography. Voice, speed and
pitch are drawn from the seed and the sentence, so a rebuild is the same. Written as 16 kHz FLAC plus
NeMo-style JSON-lines manifests, built in a temporary folder and renamed into place (one builder at a time,
under a file lock): an interrupted build leaves no half corpus.
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
from collections import Counter
import tempfile
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

from trainer.audio import SAMPLE_RATE, load_audio
from trainer.text import normalize

WORDNET = Path("/usr/share/wordnet")
VERSION = 2
# (engine, voice, share of utterances). festival starts slowly (0.5 s a call) and flite's awb and rms take
# 90 ms a sentence against 20-40 ms for the others, so they speak smaller shares.
TRAIN_VOICES = [("espeak-ng", f"{accent}+{variant}", 0.77 / 12) for accent in ("en-us", "en-gb", "en-gb-x-rp")
                for variant in ("m1", "m3", "f2", "f4")] + \
               [("flite", "kal16", 0.1), ("flite", "awb", 0.05), ("flite", "rms", 0.05),
                ("festival", "voice_kal_diphone", 0.03)]
HELD_OUT_VOICES = [("flite", "slt", 0.5), ("espeak-ng", "en-gb-scotland+m2", 0.25), ("espeak-ng", "en-029+f3", 0.25)]
ENGINE_PACKAGES = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival festvox-kallpc16k"}
SPLITS = ("train", "dev", "test", "test_ood")
_CLEAN = re.compile(r"^[A-Za-z][A-Za-z ,.;:'?!]*$")


def wordnet_sentences(kind: str = "examples", min_words: int = 3, max_words: int = 10) -> list[str]:
    """WordNet's quoted usage examples, or its glosses (definitions), that are plain words only:
    no digits, symbols or abbreviations, so the transcript is exactly what is spoken."""
    if not WORDNET.exists():
        raise FileNotFoundError(f"{WORDNET} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
    seen, out = set(), []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(errors="replace").splitlines():
            if "|" not in line:
                continue
            gloss = line.split("|", 1)[1]
            texts = re.findall(r'"([^"]+)"', gloss) if kind == "examples" else [gloss.split(";")[0].strip()]
            for text in texts:
                if not _CLEAN.match(text) or re.search(r"\b[A-Z]{2,}\b", text):
                    continue
                norm = normalize(text)
                if min_words <= len(norm.split()) <= max_words and norm not in seen:
                    seen.add(norm)
                    out.append(norm)
    return out


def within(sentences: list[str], words: int) -> list[str]:
    """The sentences made only of the ``words`` most frequent words of WordNet's usage examples (0: all)."""
    if not words:
        return sentences
    counts = Counter(w for s in wordnet_sentences() for w in s.split())
    known = {w for w, _ in counts.most_common(words)}
    return [s for s in sentences if all(w in known for w in s.split())]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """1 in 20 sentences to dev, 1 in 20 to test, by hash: a sentence always lands in the same split."""
    return {0: "dev", 1: "test"}.get(_digest(sentence) % 20, "train")


def _pick(voices: list, rng: random.Random) -> tuple:
    return rng.choices(voices, weights=[w for _, _, w in voices])[0][:2]


def _speak(engine: str, voice: str, text: str, rng: random.Random, wav: str):
    if engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice, "-s", str(rng.randint(145, 185)), "-p", str(rng.randint(35, 65)),
               "-w", wav, text]
        subprocess.run(cmd, check=True, capture_output=True)
    elif engine == "flite":
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={rng.uniform(0.9, 1.15):.2f}", "-t", text,
               "-o", wav]
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        subprocess.run(["text2wave", "-eval", f"({voice})", "-o", wav], input=text.encode(), check=True,
                       capture_output=True)


def _synthesize(job: tuple) -> dict:
    """Speak one sentence to FLAC; return its manifest row."""
    root, name, text, seed, held_out = job
    rng = random.Random(f"{seed}:{text}")
    engine, voice = _pick(HELD_OUT_VOICES if held_out else TRAIN_VOICES, rng)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "u.wav")
        _speak(engine, voice, text, rng, wav)
        wave = load_audio(wav).numpy()
    rel = f"audio/{name}.flac"
    sf.write(os.path.join(root, rel), wave, SAMPLE_RATE)
    return {"audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3), "text": text,
            "voice": f"{engine}:{voice}"}


def check_engines():
    missing = [pkg for exe, pkg in ENGINE_PACKAGES.items() if shutil.which("text2wave" if exe == "festival" else exe)
               is None]
    if missing:
        raise FileNotFoundError(f"speech engines missing: apt-get install {' '.join(missing)}")


def build_corpus(out_dir: str, train_sentences: int, seed: int = 0, workers: int = 0, words: int = 0) -> dict:
    """Build (or reuse, if the same recipe is there) the corpus; return {split: manifest path}."""
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:  # one builder at a time; others then reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(out, train_sentences, seed, workers, words)


def _build(out: Path, train_sentences: int, seed: int, workers: int, words: int) -> dict:
    recipe = {"version": VERSION, "train_sentences": train_sentences, "seed": seed, "words": words}
    manifests = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    stamp = out / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return manifests
    check_engines()
    by_split = {s: [] for s in SPLITS}
    for text in sorted(within(wordnet_sentences(), words), key=_digest):
        by_split[split_of(text)].append(text)
    held = max(50, train_sentences // 15)
    examples = set(by_split["train"] + by_split["dev"] + by_split["test"])
    glosses = [t for t in sorted(within(wordnet_sentences("glosses"), words), key=_digest) if t not in examples]
    chosen = {"train": by_split["train"][:train_sentences], "dev": by_split["dev"][:held],
              "test": by_split["test"][:held], "test_ood": glosses[:held]}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    jobs = [(str(tmp), f"{split}-{i:06d}", text, seed, split == "test_ood")
            for split in SPLITS for i, text in enumerate(chosen[split])]
    # One torch thread per worker: the pool already uses every core, and oversubscription costs 4x.
    with Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        rows = list(tqdm(pool.imap(_synthesize, jobs, chunksize=8), total=len(jobs), desc="synthesising corpus",
                         mininterval=5))
    for split in SPLITS:
        with open(tmp / f"{split}.jsonl", "w") as f:
            for job, row in zip(jobs, rows):
                if job[1].startswith(split + "-"):
                    f.write(json.dumps(row) + "\n")
    (tmp / "corpus.json").write_text(json.dumps(recipe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifests
