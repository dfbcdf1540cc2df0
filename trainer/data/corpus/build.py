"""The corpus's build: texts drawn into splits, spoken task by task in fresh processes, the changed sets made
from the test audio, manifests written, all in a temporary folder renamed into place under a lock."""
import json
import os
import random
import shutil
from multiprocessing import Pool
from pathlib import Path

import soundfile as sf
import torch
from tqdm import tqdm

from trainer.data.audio import SAMPLE_RATE, load_audio
from trainer.data.corpus.speech import check_engines, speak, trim_silence, _voice_of
from trainer.data.corpus.suite import CHANGED, CHANGES, OOD_SUITE, SPLITS, SPOKEN, SUITE
from trainer.data.corpus.texts import _digest, split_of, wordnet_phrases, wordnet_sentences, within
from trainer.runtime import locks

VERSION = 7  # the recipe's version: a change of audio or texts rebuilds (the versions: trainer.data.corpus)
TASK_SIZE = 48  # utterances a task: one fresh process each


def build_corpus(out_dir: str, train_sentences: int, seed: int = 0, workers: int = 0, words: int = 0,
                 text: str = "sentences") -> dict:
    """Build (or reuse: one builder at a time, the others wait and reuse) the corpus; {split: manifest path}."""
    # text: "sentences" (whole usage examples) or "phrases" (texts.wordnet_phrases, needs words)
    if text == "phrases" and words <= 0:
        raise ValueError("phrases are runs of a word list's words: give a word list (words > 0)")
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with locks.acquire(out.with_name(out.name + ".lock"), wait=True):
        return _build(out, train_sentences, seed, workers, words, text)


def _build(out: Path, train_sentences: int, seed: int, workers: int, words: int, text: str) -> dict:
    """The corpus built into a temporary folder and renamed into place, so an interrupted build leaves none."""
    recipe = {"version": VERSION, "train_sentences": train_sentences, "seed": seed, "words": words, "text": text}
    manifests = {s: str(out / f"{s}.jsonl") for s in SPLITS}
    stamp = out / "corpus.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return manifests
    check_engines()
    chosen = _choose(train_sentences, words, text)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    rows = _make_audio(tmp, chosen, seed, workers)
    for split in SPLITS:
        with open(tmp / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(rows[f"audio/{split}-{i:06d}.flac"]) + "\n" for i in range(len(chosen[split])))
    (tmp / "corpus.json").write_text(json.dumps(recipe))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifests


def _choose(train_sentences: int, words: int, text: str) -> dict:
    """{split: texts}: the usage examples split by hash, the glosses not among them held out, the suite's rows."""
    by_split = {"train": [], "dev": [], "test": []}
    texts = wordnet_phrases(words) if text == "phrases" else within(wordnet_sentences(), words)
    for sentence in sorted(texts, key=_digest):
        by_split[split_of(sentence)].append(sentence)
    held = max(50, train_sentences // 15)
    examples = set(by_split["train"] + by_split["dev"] + by_split["test"])
    glosses = [t for t in sorted(within(wordnet_sentences("glosses"), words), key=_digest) if t not in examples]
    chosen = {"train": by_split["train"][:train_sentences], "dev": by_split["dev"][:held],
              "test": by_split["test"][:held], "test_ood": glosses[:held]}
    sources = {"test": chosen["test"], "glosses": chosen["test_ood"]}
    return {**chosen, **{row.name: sources[row.texts] for row in SUITE}}


def _make_audio(tmp: Path, chosen: dict, seed: int, workers: int) -> dict:
    """{audio path: manifest row} of every split: the spoken splits first, then the test audio changed."""
    tasks = _tasks(str(tmp), chosen, seed)
    tasks.sort(key=lambda t: t[1] != "festival")  # the longest tasks first, so no core idles at the end
    rows = {}
    # One torch thread per worker: the pool already uses every core, and oversubscription costs 4x. A fresh
    # worker per task: a rebuild is the same whichever worker takes which task (see speech._Espeak).
    pool = Pool(workers or os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,), maxtasksperchild=1)
    with pool, tqdm(total=sum(len(t[3]) for t in tasks), desc="synthesising corpus", mininterval=5) as bar:
        for done in pool.imap_unordered(_synthesize, tasks):
            rows.update((row["audio_filepath"], row) for row in done)
            bar.update(len(done))
        test = [rows[f"audio/test-{i:06d}.flac"] for i in range(len(chosen["test"]))]
        changes = [(str(tmp), split, seed, list(enumerate(test))[i:i + TASK_SIZE], test)
                   for split in CHANGED for i in range(0, len(test), TASK_SIZE)]
        for done in pool.imap_unordered(_change, changes):
            rows.update((row["audio_filepath"], row) for row in done)
    return rows


def _tasks(root: str, chosen: dict, seed: int, size: int = TASK_SIZE) -> list:
    """The texts grouped by voice in tasks of ``size``, so a process loads one voice and a rebuild is the same."""
    # An engine's output may depend on what its process spoke before: which texts share a task is the audio. The
    # suite's texts are tasks of their own, so adding it left the other splits' audio as it was; festival's
    # texts are two halves, one per core (it is the slowest).
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


def _synthesize(task: tuple) -> list:
    """Speak one task's texts to trimmed FLAC in a worker; return their manifest rows."""
    root, engine, voice, jobs = task  # jobs: [(name, text, setting)]
    waves = speak(engine, voice, [(text, setting) for _, text, setting in jobs])
    rows = []
    for (name, text, _), wave in zip(jobs, waves):
        wave = trim_silence(wave)
        rel = f"audio/{name}.flac"
        sf.write(os.path.join(root, rel), wave.numpy(), SAMPLE_RATE)
        rows.append({"audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3), "text": text,
                     "voice": f"{engine}:{voice}"})
    return rows


def _change(task: tuple) -> list:
    """Write test utterances through the change of ``split`` in a worker; return their manifest rows."""
    root, split, seed, items, test_rows = task  # items: [(index, test row)]
    rows = []
    for i, row in items:
        rng = random.Random(f"{seed}:{split}:{i}")
        g = torch.Generator().manual_seed(_digest(f"{seed}:{split}:{i}") % 2 ** 63)
        # four other test utterances, the voices of babble noise: drawn for every change, babble or not
        others = [os.path.join(root, test_rows[j]["audio_filepath"])
                  for j in rng.sample([j for j in range(len(test_rows)) if j != i], 4)]
        wave, condition = CHANGES[split].apply(load_audio(os.path.join(root, row["audio_filepath"])), others, rng, g)
        wave = wave / max(1.0, float(wave.abs().max()) / 0.99)  # no clipping in FLAC
        rel = f"audio/{split}-{i:06d}.flac"
        sf.write(os.path.join(root, rel), wave.numpy(), SAMPLE_RATE)
        rows.append({**row, "audio_filepath": rel, "duration": round(len(wave) / SAMPLE_RATE, 3),
                     "condition": condition})
    return rows
