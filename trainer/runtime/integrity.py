"""Checkpoint files a run can trust: a SHA-256 computed while each file is written and checked before it is
read, and loads that cannot run code.

A ``.pt`` file is a pickle, and a pickle may carry an object whose unpickling runs code. Every load of the
trainer and its tools goes through ``load``: ``weights_only=True`` (tensors, containers, numbers, strings)
plus the few plain-data types DeepSpeed's optimizer files hold (``deepspeed_contract.SAFE_GLOBALS``); any other
type is refused, naming the file and the type.
"""
import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from trainer.runtime.exits import RunError


class UnsafeFile(RunError, ValueError):
    """A checkpoint file holding a type a load must not construct; worded for the user."""


class _HashingWriter:
    """A binary file that hashes what passes through it (torch.save needs only ``write`` and ``flush``)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def save(obj, path, zipfile: bool = True) -> str:
    """torch.save to ``path``; returns the file's SHA-256, computed on the way to the disk."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(obj, writer, _use_new_zipfile_serialization=zipfile)
    return writer.sha.hexdigest()


def digest(path) -> str:
    """SHA-256 of a file on disk, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load(path, allowed: list, map_location="cpu", mmap: bool = False):
    """torch.load without running code: weights only, plus the ``allowed`` plain-data classes. ``mmap``
    (zip-format files) reads the pickle and maps the tensors: a cheap check of a large file."""
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        kind = found[1] if found else str(e).splitlines()[-1]
        raise UnsafeFile(f"{Path(path)}: refused: it holds {kind}, which no checkpoint of this trainer holds; "
                         "loading it could run code it carries (share models as consolidated safetensors)") from None
