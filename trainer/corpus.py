"""The embedded default corpus: English sentences from WordNet's examples spoken by espeak-ng, offline.

Sentences are split train/dev/test by a hash of their normalised text, so no sentence is in two splits;
each utterance gets a voice, variant, speed and pitch drawn from a seed and the sentence, so a rebuild is
bit-for-bit the same. Written as 16 kHz FLAC plus NeMo-style JSON-lines manifests, built in a temporary
folder and renamed into place, so an interrupted build never leaves a half corpus behind.
"""
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from trainer.audio import SAMPLE_RATE
from trainer.text import normalize

WORDNET = Path("/usr/share/wordnet")
VERSION = 1
VOICES = ["en-us", "en-gb", "en-gb-x-rp"]
VARIANTS = ["m1", "m3", "f2", "f4"]
SPLITS = ("train", "dev", "test")
_CLEAN = re.compile(r"^[A-Za-z][A-Za-z ,.;:'?!]*$")


def wordnet_sentences(min_words: int = 3, max_words: int = 10) -> list[str]:
    """WordNet's quoted usage examples that are plain words only (no digits, symbols or abbreviations)."""
    if not WORDNET.exists():
        raise FileNotFoundError(f"{WORDNET} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
    seen, out = set(), []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(errors="replace").splitlines():
            for quote in re.findall(r'"([^"]+)"', line):
                if not _CLEAN.match(quote) or re.search(r"\b[A-Z]{2,}\b", quote):
                    continue
                norm = normalize(quote)
                if min_words <= len(norm.split()) <= max_words and norm not in seen:
                    seen.add(norm)
                    out.append(norm)
    return out


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
    """1 in 20 sentences to dev, 1 in 20 to test, by hash: a sentence always lands in the same split."""
    return {0: "dev", 1: "test"}.get(_digest(sentence) % 20, "train")


def _synthesize(job: tuple) -> dict:
    """Speak one sentence to FLAC; return its manifest row."""
    root, name, text, seed = job
    rng = random.Random(f"{seed}:{text}")
    voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
    cmd = ["espeak-ng", "-v", voice, "-s", str(rng.randint(145, 185)), "-p", str(rng.randint(35, 65)),
           "--stdout", text]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    wave = torchaudio.functional.resample(torch.from_numpy(data), rate, SAMPLE_RATE).numpy()
    rel = f"audio/{name}.flac"
    sf.write(os.path.join(root, rel), wave, SAMPLE_RATE)
    return {"audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3), "text": text, "voice": voice}


def build_corpus(out_dir: str, train_sentences: int, seed: int = 0, workers: int = 0) -> dict:
    """Build (or reuse, if the same recipe is there) the corpus; return {split: manifest path}."""
    out = Path(out_dir).expanduser()
    recipe = {"version": VERSION, "train_sentences": train_sentences, "seed": seed}
    manifests = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    stamp = out / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return manifests
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng not found: install Debian's espeak-ng (apt-get install espeak-ng)")
    by_split = {s: [] for s in SPLITS}
    for text in sorted(wordnet_sentences(), key=_digest):
        by_split[split_of(text)].append(text)
    held_out = max(50, train_sentences // 15)
    chosen = {"train": by_split["train"][:train_sentences], "dev": by_split["dev"][:held_out],
              "test": by_split["test"][:held_out]}
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    jobs = [(str(tmp), f"{split}-{i:06d}", text, seed) for split in SPLITS for i, text in enumerate(chosen[split])]
    # One torch thread per worker: the pool already uses every core, and oversubscription costs 4x.
    with Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        rows = list(tqdm(pool.imap(_synthesize, jobs, chunksize=16), total=len(jobs), desc="synthesising corpus",
                         mininterval=5))
    for split in SPLITS:
        with open(tmp / f"{split}.jsonl", "w") as f:
            for (_, name, _, _), row in zip(jobs, rows):
                if name.startswith(split + "-"):
                    f.write(json.dumps(row) + "\n")
    (tmp / "corpus.json").write_text(json.dumps(recipe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifests
