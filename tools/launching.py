"""Starting a script of the repository (the trainer by default) on local ranks through DeepSpeed's launcher:
the command line and a free port for its rendezvous. Used by the fault drill and the tests."""
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

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
