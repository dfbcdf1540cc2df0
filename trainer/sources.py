"""Where utterances come from: NeMo JSON-lines manifests and Hugging Face datasets on local disk.

Each reader returns the usable utterances and, for every row it could not use, one line naming the file and
line (or dataset and row) and the reason. The caller decides: skip and report (default), or stop before
training starts (``strict_data``).
"""
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import soundfile as sf

from trainer.config import HFSource
from trainer.text import normalize


class DataError(ValueError):
    """A data problem, worded for the user: file, line, what is wrong."""


@dataclass(frozen=True)
class Utterance:
    audio: str  # a file path, or the folder of a Hugging Face dataset when ``hf`` is set
    duration: float
    text: str
    origin: str  # "manifest.jsonl:12" or "dataset[7]", for messages
    offset: float = 0.0
    hf: Optional[HFSource] = None
    row: int = -1

    @property
    def frames(self) -> int:
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
    if not os.path.exists(path):
        return f"audio {path} does not exist"
    if deep:
        try:
            if sf.info(path).frames == 0:
                return f"audio {path} is empty"
        except Exception as e:  # soundfile raises several types for unreadable files
            return f"audio {path} is unreadable ({e})"
    return ""


def read_manifest(path: str, max_duration: float, deep: bool = False) -> tuple[list[Utterance], list[str]]:
    """NeMo JSON lines: audio_filepath (absolute or relative to the manifest), duration, text, offset.
    deep=True also opens every audio header (strict mode); otherwise a file is only checked to exist."""
    try:
        lines = Path(path).read_bytes().splitlines()  # decoded line by line: one bad byte costs one row
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path}: no such manifest") from None
    base = Path(path).parent
    utts, problems = [], []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
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


def read_hf(src: HFSource, max_duration: float) -> tuple[list[Utterance], list[str]]:
    """Every row of the dataset; durations come from the audio headers (the dataset stores none)."""
    try:
        ds = open_hf(src)
    except FileNotFoundError as e:
        raise DataError(f"{src.path}: {e}") from None
    utts, problems = [], []
    for i, text in enumerate(ds[src.text_column]):
        origin = f"{src.path}[{i}]"
        try:
            duration = sf.info(hf_audio_file(src, i)).duration
        except Exception as e:  # unreadable audio of any kind is a skipped row, not a crash
            problems.append(f"{origin}: audio unreadable ({e})")
            continue
        reason = _check(duration, str(text), max_duration)
        if reason:
            problems.append(f"{origin}: {reason}")
        else:
            utts.append(Utterance(src.path, duration, str(text), origin, hf=src, row=i))
    return utts, problems


def read_sources(manifests: list[str], hf_sources: list, max_duration: float, strict: bool):
    """All utterances of a split. strict: any problem is a DataError listing them all; else (utts, problems)."""
    utts, problems = [], []
    for m in manifests:
        u, p = read_manifest(m, max_duration, deep=strict)
        utts += u
        problems += p
    for src in hf_sources:
        u, p = read_hf(src, max_duration)
        utts += u
        problems += p
    if strict and problems:
        raise DataError(f"{len(problems)} unusable rows (strict_data):\n" + "\n".join(problems))
    return utts, problems
