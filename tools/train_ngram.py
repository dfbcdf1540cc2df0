"""A word n-gram of training transcripts for beam search (tools/transcribe.py, tools/evaluate.py --lm).

    python -m tools.train_ngram --manifest data/train.jsonl --order 3 --out lm/
    python -m tools.train_ngram --text corpus.txt --order 4 --out lm/   # one sentence per line

Writes OUT/lm.arpa (ARPA text), OUT/lm.bin (KenLM binary: loads faster) and OUT/words.txt (the vocabulary, for
``--lm_words`` beside the binary). The text goes through the trainer's normaliser, as references are scored.

The estimator is KenLM's ``lmplz`` (modified Kneser-Ney, Heafield et al. 2013): the tool behind the n-grams that
flashlight, torchaudio, NeMo and ESPnet decode with, in the format they read. No registry ships its programs as
a binary; PyPI ships their source as the ``kenlm`` package, so on first use this tool downloads that source
(version and SHA-256 pinned below), builds ``lmplz`` and ``build_binary`` with cmake (about 2 minutes; needs
g++, cmake and Boost's program_options, system, thread and test libraries: Debian's ``libboost-*-dev``, which
tools/setup.sh installs), and keeps them in ~/.cache/omni-router (``KENLM_BIN``: use programs built elsewhere).
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from trainer.data.sources import DataError, read_sources
from trainer.data.text import normalize

KENLM = "kenlm-0.3.0"
KENLM_URL = ("https://files.pythonhosted.org/packages/02/6e/f4e159cef39ea4ef2244b4aa32857d447d60a5d0ee269e1b1f8d3"
             "723c03e/kenlm-0.3.0.tar.gz")
KENLM_SHA256 = "c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8"
PROGRAMS = ("lmplz", "build_binary")


class NgramError(RuntimeError):
    """What stops the n-gram from being built; worded for the user (exit 2)."""


def kenlm_bin() -> Path:
    """The folder holding ``lmplz`` and ``build_binary``: ``KENLM_BIN``, else the cached build (made if missing)."""
    if os.environ.get("KENLM_BIN"):
        where = Path(os.environ["KENLM_BIN"])
        if not all((where / p).exists() for p in PROGRAMS):
            raise NgramError(f"KENLM_BIN={where}: no {' or '.join(PROGRAMS)} there")
        return where
    where = Path.home() / ".cache" / "omni-router" / KENLM / "bin"
    if not all((where / p).exists() for p in PROGRAMS):
        build_kenlm(where)
    return where


def build_kenlm(dest: Path):
    """Download KenLM's pinned source from PyPI, check its SHA-256, build the two programs into ``dest``."""
    missing = [tool for tool in ("cmake", "make", "g++") if not shutil.which(tool)]
    if missing:
        raise NgramError(f"building KenLM needs {', '.join(missing)} (Debian: apt-get install cmake g++ "
                         "libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev)")
    with tempfile.TemporaryDirectory(prefix="kenlm-build-") as tmp:
        archive = Path(tmp) / f"{KENLM}.tar.gz"
        print(f"building KenLM's lmplz from {KENLM_URL} (once, about 2 minutes)", file=sys.stderr)
        try:
            urllib.request.urlretrieve(KENLM_URL, archive)
        except OSError as e:
            raise NgramError(f"cannot download {KENLM_URL}: {e}") from None
        if hashlib.sha256(archive.read_bytes()).hexdigest() != KENLM_SHA256:
            raise NgramError(f"{KENLM_URL}: SHA-256 differs from the pinned {KENLM_SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        build = Path(tmp) / "build"
        steps = [["cmake", "-S", str(Path(tmp) / KENLM), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                 ["make", "-C", str(build), f"-j{os.cpu_count() or 1}", *PROGRAMS]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                raise NgramError(f"building KenLM failed at {' '.join(step[:2])} (is Boost's development package "
                                 f"installed? see tools/setup.sh):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
        dest.mkdir(parents=True, exist_ok=True)
        for program in PROGRAMS:
            shutil.copy2(build / "bin" / program, dest / f".{program}.tmp")
            os.replace(dest / f".{program}.tmp", dest / program)


def sentences(manifests: list[str], texts: list[str]) -> list[str]:
    """Normalised, non-empty sentences of the manifests' transcripts and the text files' lines."""
    out = [u.text for u in read_sources(manifests, [], float("inf"), strict=False)[0]] if manifests else []
    for path in texts:
        try:
            out += Path(path).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise NgramError(f"{path}: unreadable ({e})") from None
    return [s for s in (normalize(t) for t in out) if s]


def train_ngram(lines: list[str], order: int, out: Path, bin_dir: Path) -> dict:
    """lm.arpa, lm.bin and words.txt of ``lines`` in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    arpa, binary, words = out / "lm.arpa", out / "lm.bin", out / "words.txt"
    with tempfile.TemporaryDirectory(prefix="lmplz-") as tmp:
        # --discount_fallback: a small corpus lacks the count-of-counts that modified Kneser-Ney's discounts need.
        done = subprocess.run([str(bin_dir / "lmplz"), "-o", str(order), "-S", "20%", "-T", tmp,
                               "--discount_fallback", "--arpa", str(arpa)],
                              input="\n".join(lines) + "\n", capture_output=True, text=True)
    if done.returncode:
        raise NgramError(f"lmplz failed:\n{done.stderr[-2000:]}")
    done = subprocess.run([str(bin_dir / "build_binary"), str(arpa), str(binary)], capture_output=True, text=True)
    if done.returncode:
        raise NgramError(f"build_binary failed:\n{done.stderr[-2000:]}")
    words.write_text("\n".join(sorted({w for line in lines for w in line.split()})) + "\n")
    return {"arpa": arpa, "binary": binary, "words": words}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", action="append", default=[], help="training manifest (repeatable)")
    p.add_argument("--text", action="append", default=[], help="text file, one sentence per line (repeatable)")
    p.add_argument("--order", type=int, default=3, help="n of the n-gram (default 3)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    if not args.manifest and not args.text:
        p.error("give --manifest or --text")
    if args.order < 1:
        p.error("--order must be at least 1")
    try:
        lines = sentences(args.manifest, args.text)
        if not lines:
            raise NgramError("no text: the sources hold no transcript")
        files = train_ngram(lines, args.order, Path(args.out), kenlm_bin())
    except (DataError, NgramError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_words = len(files["words"].read_text().split())
    print(f"{args.order}-gram of {len(lines)} sentences, {n_words} words: {files['arpa']}, {files['binary']}, "
          f"{files['words']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
