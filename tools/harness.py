"""What the tests and the fault drill share: starting a script of the repository (the trainer by default) on
local ranks through DeepSpeed's launcher, the tiny run config and bad training data they start it with, and the
fakes they plant in the processes they start (a file system without flock, a pickle that runs code)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))  # the launcher installed beside this interpreter


def free_port() -> int:
    """A TCP port free on this machine now (the launcher's --master_port, a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config, corpus, out, ranks: int = 1, extra=(), script: str = "trainer/main.py") -> list:
    """``deepspeed`` running ``script`` (a path from the repository root) on ``ranks`` local ranks."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script,
            "--deepspeed_config", str(config), "--corpus_dir", str(corpus), "--output_dir", str(out), *extra]


def launch(config, corpus, out, ranks: int = 1, extra=(), timeout: float = 600, env: Optional[dict] = None,
           script: str = "trainer/main.py") -> subprocess.CompletedProcess:
    """``command`` run to its end from the repository root, its output captured."""
    return subprocess.run(command(config, corpus, out, ranks, extra, script), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def tiny_config(folder: Path, mode: str = "omni", run: Optional[dict] = None, **ds_extra) -> str:
    """A shipped config shrunk to a tiny model on a 60-sentence corpus; written into ``folder``."""
    cfg = json.loads((ROOT / "ds_configs" / f"{mode}.json").read_text())
    cfg.update(ds_extra)
    cfg["omni_router"]["model"].update(d_model=32, num_layers=2, num_heads=2, ffn_dim=64)
    cfg["omni_router"]["data"].pop("augment")  # clean audio unless a test asks: the effects cost the suite minutes
    cfg["omni_router"]["data"].setdefault("corpus", {}).update(sentences=60, words=0, text="sentences")
    cfg["omni_router"]["data"].update(vocab_size=48, batch_frames=2500, **cfg.pop("data", {}))
    cfg["omni_router"]["run"].update({"max_steps": 24, "log_every": 4, **(run or {})})
    cfg["scheduler"]["params"]["warmup_num_steps"] = 5
    path = Path(folder) / f"{mode}-{len(list(Path(folder).glob('*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def bad_manifest(corpus: Path, folder: Path) -> tuple[Path, int]:
    """The corpus's training rows plus five bad ones, written into ``folder``: not JSON, missing audio,
    truncated FLAC, NaN samples, a line that is not UTF-8. Returns (manifest, number of good rows)."""
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    for r in rows:
        r["audio_filepath"] = str(corpus / r["audio_filepath"])
    folder.mkdir(exist_ok=True)
    (folder / "trunc.flac").write_bytes(Path(rows[0]["audio_filepath"]).read_bytes()[:300])
    wave = np.sin(np.arange(16000) / 10).astype("float32")
    wave[5:9] = np.nan
    sf.write(folder / "nan.wav", wave, 16000, subtype="FLOAT")
    bad = ["{oops", json.dumps({"audio_filepath": "nowhere.flac", "duration": 1.0, "text": "gone"}),
           json.dumps({"audio_filepath": "trunc.flac", "duration": 1.2, "text": "cut short"}),
           json.dumps({"audio_filepath": "nan.wav", "duration": 1.0, "text": "not a number"}),
           '{"audio_filepath": "x.flac", "duration": 1.0, "text": "na\xefve"}']
    manifest = folder / "train.jsonl"
    manifest.write_bytes("\n".join([json.dumps(r) for r in rows] + bad).encode("latin-1") + b"\n")
    return manifest, len(rows)


def site_env(folder: Path, code: str, ranks_only: bool = True, env: Optional[dict] = None) -> dict:
    """``env`` (this process's environment unless given) with a ``sitecustomize`` written into ``folder`` that
    runs ``code`` at the start of every Python process started with it: with ``ranks_only``, only in the ranks
    of a launch (the processes the launcher gives a LOCAL_RANK), not in the launcher itself."""
    base = os.environ if env is None else env
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = "import os\nif 'LOCAL_RANK' in os.environ:\n" + textwrap.indent(code, "    ")
    (folder / "sitecustomize.py").write_text(ranks if ranks_only else code)
    return {**base, "PYTHONPATH": os.pathsep.join([str(folder), base.get("PYTHONPATH", "")])}


# What a file system without locks (Lustre, NFS without locking) makes of flock: ENOLCK.
NO_FLOCK = """import errno, fcntl
def _no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = _no_flock
"""


def no_flock_env(folder: Path, ranks_only: bool = True, env: Optional[dict] = None) -> dict:
    """The environment (``env``, else this process's) of a launch whose ranks' ``fcntl.flock`` fails as on a file
    system without locks (ENOLCK; what we cannot mount here): a ``sitecustomize`` in ``folder``/no_flock replaces
    it in every rank, or with ``ranks_only=False`` in any Python process started with it (a plain holder)."""
    return site_env(Path(folder) / "no_flock", NO_FLOCK, ranks_only, env)


class RunsCode:
    """A pickle payload: unpickling this runs a shell command (``os.system``) that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def flip_byte(path: Path, bits: int = 0xFF):
    """Change the middle byte of a file (``bits`` of it): the same size, other content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= bits
    path.write_bytes(bytes(data))
