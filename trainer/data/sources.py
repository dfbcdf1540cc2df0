"""Where utterances come from: NeMo JSON-lines manifests, Lhotse cut sets and Shar shards, and Hugging Face
datasets on disk.

Each reader returns the usable utterances and, for every row it could not use, one line naming the file and
line (or dataset and row) and the reason. The caller decides: skip and report (default), or stop before
training starts (``strict_data``).
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import soundfile as sf

from trainer.config import HFSource
from trainer.data.audio import load_audio
from trainer.data.text import normalize
from trainer.runtime.exits import ToFix


class DataError(ToFix, ValueError):
    """A data problem, worded for the user: file, line, what is wrong."""
    label = "data error: "


@dataclass(frozen=True)
class Utterance:
    audio: str  # a file path, or the folder of a Hugging Face dataset when ``hf`` is set
    duration: float
    text: str
    origin: str  # "manifest.jsonl:12" or "dataset[7]", for messages
    offset: float = 0.0
    hf: Optional[HFSource] = None
    row: int = -1
    segment: bool = False  # read ``duration`` seconds from ``offset`` even at offset 0 (a cut of a long recording)
    member: str = ""  # the cut id whose audio member of the tar ``audio`` holds this utterance (Shar shards)

    @property
    def frames(self) -> int:
        """Feature frames of 10 ms."""
        return int(self.duration * 100)  # 10 ms hop


def _check(duration: float, text: str, max_duration: float) -> str:
    if not duration > 0:
        return f"duration {duration} is not positive"
    if duration > max_duration:
        return f"duration {duration:.1f} s exceeds max_duration {max_duration}"
    if not normalize(text):
        return f"text {text!r} has no letter to train on"
    return ""


def _audio_problem(path: str, deep: bool) -> str:
    """Strict mode's check of a row's audio at start-up (it exists and opens). Otherwise nothing is checked
    here: a file that is missing or unreadable is skipped, named and counted when it is loaded, so start-up
    makes no metadata call per row (tens of millions on a parallel file system)."""
    if not deep:
        return ""
    if not os.path.exists(path):
        return f"audio {path} does not exist"
    try:
        if sf.info(path).frames == 0:
            return f"audio {path} is empty"
    except Exception as e:  # soundfile raises several types for unreadable files
        return f"audio {path} is unreadable ({e})"
    return ""


def read_manifest(path: str, max_duration: float, deep: bool = False,
                  share: tuple = (0, 1)) -> tuple[list[Utterance], list[str]]:
    """NeMo JSON lines: audio_filepath (absolute or relative to the manifest), duration, text, offset.
    deep=True also checks that every audio file exists and opens (strict mode). ``share`` (rank, world): only
    every world-th row from the rank-th is decoded (``in_share``)."""
    try:
        lines = Path(path).read_bytes().splitlines()  # decoded line by line: one bad byte costs one row
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path}: no such manifest") from None
    base = Path(path).parent
    utts, problems = [], []
    for n, raw in in_share(enumerate(lines, 1), share):
        origin = f"{path}:{n}"
        try:
            row = json.loads(raw.decode("utf-8"))
            audio, duration, text = str(base / row["audio_filepath"]), float(row["duration"]), str(row["text"])
            offset = float(row.get("offset", 0.0))
        except UnicodeDecodeError as e:
            problems.append(f"{origin}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{origin}: not JSON ({e.msg})")
            continue
        except KeyError as e:
            problems.append(f"{origin}: missing key {e}")
            continue
        except (TypeError, ValueError, AttributeError) as e:
            problems.append(f"{origin}: ill-typed row ({e})")
            continue
        reason = _check(duration, text, max_duration) or _audio_problem(audio, deep)
        if reason:
            problems.append(f"{origin}: {reason}")
        else:
            utts.append(Utterance(audio, duration, text, origin, offset))
    return utts, problems


@lru_cache(maxsize=None)
def open_hf(src: HFSource):
    """The dataset with its audio column left undecoded (bytes or path), so no torchcodec is needed."""
    import datasets
    if src.kind == "saved":
        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
    elif src.kind == "audiofolder":  # datasets' own audiofolder builder encodes through torchcodec
        root = Path(src.path)
        meta = next((root / n for n in ("metadata.csv", "metadata.jsonl") if (root / n).exists()), None)
        if meta is None:
            raise DataError(f"{root}: an audiofolder needs metadata.csv or metadata.jsonl with a file_name column")
        ds = datasets.load_dataset("csv" if meta.suffix == ".csv" else "json", data_files=str(meta), split="train")
        ds = ds.map(lambda r: {src.audio_column: {"bytes": None, "path": str(root / r["file_name"])}})
    else:
        files = [str(p) for p in sorted(Path(src.path).glob("*.parquet"))] if Path(src.path).is_dir() else src.path
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    for col in (src.audio_column, src.text_column):
        if col not in ds.column_names:
            raise DataError(f"{src.path}: no column {col!r} (columns: {', '.join(ds.column_names)})")
    return ds.cast_column(src.audio_column, datasets.Audio(decode=False))


def hf_audio_file(src: HFSource, row: int):
    """A file object of one row's audio: its stored bytes, or the file it points to."""
    cell = open_hf(src)[row][src.audio_column]
    return io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]


def _durations(src: HFSource, ds, cache_dir: str) -> list:
    """Each row's audio duration in seconds, or why it is unreadable. Hugging Face datasets store none, so
    the headers are read once and cached by the dataset's fingerprint (which changes with its data files)."""
    key = hashlib.sha1(f"{ds._fingerprint}:{src.audio_column}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if len(stored) == len(ds):
            return stored
    durations = []
    for i in range(len(ds)):
        try:
            durations.append(sf.info(hf_audio_file(src, i)).duration)
        except Exception as e:  # unreadable audio of any kind is a skipped row, not a crash
            durations.append(f"audio unreadable ({e})")
    if cache is not None:  # written whole or not at all: ranks may write it at once
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(durations, f)
        os.replace(tmp, cache)
    return durations


def read_hf(src: HFSource, max_duration: float, duration_cache: str = "",
            share: tuple = (0, 1)) -> tuple[list[Utterance], list[str]]:
    """The rows of the dataset that fall to ``share`` (rank, world: every world-th), with durations from the
    audio headers or their cache (``_durations``, computed for all rows once)."""
    try:
        ds = open_hf(src)
    except FileNotFoundError as e:
        raise DataError(f"{src.path}: {e}") from None
    utts, problems = [], []
    rows = enumerate(zip(ds[src.text_column], _durations(src, ds, duration_cache)))
    for i, (text, duration) in (row for row in rows if row[0] % share[1] == share[0]):
        origin = f"{src.path}[{i}]"
        reason = duration if isinstance(duration, str) else _check(duration, str(text), max_duration)
        if reason:
            problems.append(f"{origin}: {reason}")
        else:
            utts.append(Utterance(src.path, duration, str(text), origin, hf=src, row=i))
    return utts, problems


def _cut_audio(cut, root: str) -> tuple[str, str]:
    """(audio file, problem) of a cut: one audio file, read whole-channel and mixed to mono like any other."""
    from lhotse.cut.data import DataCut
    if not isinstance(cut, DataCut):
        return "", f"a {type(cut).__name__} (mixtures and padding are not read; trim or mix the cut set first)"
    rec = cut.recording
    if rec is None:
        return "", "no recording"
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = ", ".join(s.type for s in rec.sources)
        return "", f"recording {rec.id} has sources of type {kinds}: only one audio file per recording is read"
    if rec.transforms:
        return "", f"recording {rec.id} has transforms, which this trainer does not apply"
    return str(Path(root).expanduser() / rec.sources[0].source), ""


def _supervision_text(sup) -> str:
    """The supervision's text; Libriheavy's full release has none and keeps the book's text first in
    ``custom.texts`` (its ASR version has ``text``)."""
    texts = (sup.custom or {}).get("texts") or [""]
    return sup.text or str(texts[0])


def set_name(path: str) -> str:
    """A data set named after its file or folder, less .gz, .jsonl and .json (libriheavy_cuts_dev.jsonl.gz:
    libriheavy_cuts_dev)."""
    return Path(path).name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")


def _open_bytes(path: str):
    """A JSON-lines file, gzipped (.gz) or plain, opened for reading bytes."""
    return (gzip.open if str(path).endswith(".gz") else open)(path, "rb")


def in_share(numbered_lines, share: tuple):
    """(line number, line) of the non-empty lines that fall to rank ``share[0]`` of ``share[1]``: every
    world-th, so each rank decodes and keeps only its own rows, and start-up time and memory per rank fall
    with the number of ranks."""
    rank, world = share
    rows = ((n, raw) for n, raw in numbered_lines if raw.strip())
    return (row for k, row in enumerate(rows) if k % world == rank)


def _cut_lines(path: str, share: tuple = (0, 1)):
    """(origin, cut) for each line of a cut file (of ``share``: ``in_share``), decoded one by one by Lhotse's
    own deserialiser, so a bad line costs one row: then (origin, the problem as a string)."""
    from lhotse.serialization import deserialize_item
    with _open_bytes(path) as f:
        for n, raw in in_share(enumerate(f, 1), share):
            try:
                cut = deserialize_item(json.loads(raw))
            except Exception as e:  # JSON, UTF-8 or Lhotse's own schema errors: this line only
                yield f"{path}:{n}", f"not a Lhotse cut ({type(e).__name__}: {e})"
                continue
            yield f"{path}:{n} (cut {cut.id})", cut


def _supervised(cut, origin: str, audio: str, offset: float, available: float, what: str, max_duration: float,
                member: str = "") -> tuple[list[Utterance], list[str]]:
    """One utterance per supervision of a cut whose audio starts ``offset`` s into ``audio``, which holds
    ``available`` s (``what`` names it in messages)."""
    if not cut.supervisions:
        return [], [f"{origin}: no supervision (no text)"]
    utts, problems = [], []
    for sup in cut.supervisions:
        start, end = offset + max(sup.start, 0.0), offset + min(sup.end, cut.duration)
        where = f"{origin} supervision {sup.id}" if len(cut.supervisions) > 1 else origin
        text = _supervision_text(sup)
        reason = f"{start:.2f}-{end:.2f} s lies past the end of {what} ({available:.2f} s)" \
            if end > available + 0.01 or start >= available else _check(end - start, text, max_duration)
        if reason:
            problems.append(f"{where}: {reason}")
        else:
            utts.append(Utterance(audio, end - start, text, where, start, segment=True, member=member))
    return utts, problems


def read_cuts(path: str, max_duration: float, root: str = "", deep: bool = False,
              share: tuple = (0, 1)) -> tuple[list[Utterance], list[str]]:
    """A Lhotse cut set (.jsonl or .jsonl.gz, as Libriheavy publishes): one utterance per supervision, at its
    offset into the recording, of the cuts of ``share`` (``in_share``). Relative audio paths are resolved
    against ``root`` (empty: the current folder, as Lhotse does)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such cut set")
    utts, problems, audio_checked = [], [], {}
    for origin, cut in _cut_lines(path, share):
        audio, reason = ("", cut) if isinstance(cut, str) else _cut_audio(cut, root)
        if not reason and audio not in audio_checked:
            audio_checked[audio] = _audio_problem(audio, deep)
        reason = reason or audio_checked[audio]
        if reason:
            problems.append(f"{origin}: {reason}")
            continue
        u, p = _supervised(cut, origin, audio, cut.start, cut.recording.duration, f"recording {cut.recording.id}",
                           max_duration)
        utts += u
        problems += p
    return utts, problems


@lru_cache(maxsize=64)
def tar_index(path: str) -> dict[str, tuple[int, int]]:
    """Cut id -> (offset, size) of its audio member in a Shar tar. Only the headers are read (the data is
    seeked over), once per process and shard; a damaged tail leaves the members before it readable."""
    index = {}
    try:
        with tarfile.open(path) as t:
            for m in t:
                stem, ext = os.path.splitext(m.name)
                if ext != ".json":
                    index[stem] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError):
        pass
    return index


def member_audio(path: str, cut_id: str) -> io.BytesIO:
    """The audio bytes of one cut in a Shar tar, read with one seek."""
    if cut_id not in tar_index(path):
        raise ValueError(f"no audio member for cut {cut_id}")
    offset, size = tar_index(path)[cut_id]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise ValueError(f"member of cut {cut_id} truncated ({len(data)} of {size} bytes)")
    return io.BytesIO(data)


def audio_source(u: Utterance):
    """What soundfile reads for an utterance: its file, or a file object of its dataset row or shard member."""
    if u.hf:
        return hf_audio_file(u.hf, u.row)
    return member_audio(u.audio, u.member) if u.member else u.audio


def load_utterance(u: Utterance):
    """An utterance's 16 kHz mono samples [samples], from whichever source holds it."""
    return load_audio(audio_source(u), u.offset, u.duration if u.offset or u.segment else 0.0)


def shard_files(folder: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(cut records, audio tar) of each shard of a Lhotse Shar folder (cuts.NNNNNN.jsonl.gz beside
    recording.NNNNNN.tar, as tools/make_shards.py and Lhotse's own ``to_shar`` write), and the cut files
    without their tar. Nothing inside is read."""
    cut_files = sorted(Path(folder).glob("cuts.*.jsonl.gz"))
    if not cut_files:
        raise DataError(f"{folder}: no Lhotse Shar shards (cuts.NNNNNN.jsonl.gz) in it")
    shards, problems = [], []
    for cuts in cut_files:
        tar = str(cuts.with_name(cuts.name.replace("cuts.", "recording.", 1).replace(".jsonl.gz", ".tar")))
        if os.path.exists(tar):
            shards.append((str(cuts), tar))
        else:
            problems.append(f"{cuts}: no {Path(tar).name} beside it")
    return shards, problems


def read_shard(cuts: str, tar: str, max_duration: float, deep: bool = False) -> tuple[list[Utterance], list[str]]:
    """One shard: an utterance per supervision, its audio a member of the tar. Only the cut records are read;
    deep=True also reads the tar headers to find every member."""
    utts, problems = [], []
    for origin, cut in _cut_lines(cuts):
        reason = cut if isinstance(cut, str) else \
            f"no audio member in {tar}" if deep and cut.id not in tar_index(tar) else ""
        if reason:
            problems.append(f"{origin}: {reason}")
            continue
        u, p = _supervised(cut, origin, tar, 0.0, cut.duration, f"member {cut.id}", max_duration, cut.id)
        utts += u
        problems += p
    return utts, problems


def read_shards(folder: str, max_duration: float, deep: bool = False) -> tuple[list[Utterance], list[str]]:
    """Every shard of a Shar folder, read whole (dev sets, tools, strict checks; training reads its shards
    lazily, ``data.ShardSet``)."""
    shards, problems = shard_files(folder)
    utts = []
    for cuts, tar in shards:
        u, p = read_shard(cuts, tar, max_duration, deep)
        utts += u
        problems += p
    return utts, problems


def read_sources(manifests: list[str], hf_sources: list, max_duration: float, strict: bool, cuts: list = (),
                 cuts_root: str = "", duration_cache: str = "", shards: list = (), share: tuple = (0, 1)):
    """The utterances of a split (of ``share``, rank and world, in manifests, cut sets and datasets; a Shar
    folder is read whole). strict: any problem is a DataError listing them all; else (utts, problems)."""
    parts = [read_manifest(m, max_duration, deep=strict, share=share) for m in manifests] + \
            [read_cuts(c, max_duration, cuts_root, deep=strict, share=share) for c in cuts] + \
            [read_shards(d, max_duration, deep=strict) for d in shards] + \
            [read_hf(src, max_duration, duration_cache, share) for src in hf_sources]
    utts = [u for us, _ in parts for u in us]
    problems = [p for _, ps in parts for p in ps]
    if strict and problems:
        raise DataError(f"{len(problems)} unusable rows (strict_data):\n" + "\n".join(problems))
    return utts, problems


def is_cut_set(path: str) -> bool:
    """A Lhotse cut set rather than a NeMo manifest: its records carry ``supervisions``."""
    try:
        with _open_bytes(path) as f:
            first = next((line for line in f if line.strip()), b"{}")
        return "supervisions" in json.loads(first)
    except (OSError, ValueError):
        return False


def read_test_set(path: str, cuts_root: str = "") -> list[Utterance]:
    """The usable utterances of a test set for the tools: a manifest or a cut set, told apart by content."""
    cuts = is_cut_set(path)
    return read_sources([] if cuts else [path], [], float("inf"), False, [path] if cuts else [], cuts_root)[0]
