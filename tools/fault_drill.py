"""Fault drill: the faults and bad input the trainer promises to survive, each run for real against a tiny
config on two ranks through DeepSpeed's launcher, and one table: probe, expected, observed, pass.

    python -m tools.fault_drill                       # every probe (about 10 minutes on 2 CPU cores)
    python -m tools.fault_drill --only lock hung_rank_timeout --keep /tmp/drill

"Nothing lost" means: the last complete checkpoint loads, and a run resumed from it ends with the same
weights, bit for bit, as one that was never interrupted. The fast probes are also tests
(``tests/test_faults.py``). Exit status: 0 when every probe that ran passed, 1 otherwise.
"""
import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import psutil
import soundfile as sf
import torch

from trainer import checkpoint, integrity, locks
from trainer.run import LOCK
from trainer.deepspeed_contract import EXPERT_FILE, MODEL_STATES

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
LONG = 400  # max_steps of a run that is stopped on purpose
# A trainer whose checkpoint publication (the last act of a save) sleeps after the first one: a save that
# takes as long as we like, so a fault can land inside it.
SLOW_SAVE = """import os, sys, time
sys.path.insert(0, {root!r})
from trainer import checkpoint, distributed, run
publish, calls = checkpoint.publish, []
def slow(*args):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(float(os.environ["DRILL_SAVE_S"]))
    publish(*args)
checkpoint.publish = slow
distributed.end_process(run.main())
"""


# A trainer on a file system without flock (Lustre, NFS without locking): flock fails with ENOLCK.
NO_FLOCK = """import errno, fcntl, sys
sys.path.insert(0, {root!r})
def no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = no_flock
from trainer import distributed, run
distributed.end_process(run.main())
"""


@dataclass
class Row:
    probe: str
    expected: str
    observed: str
    ok: Optional[bool]  # None: not run here, ``observed`` says why


def tiny_config(folder: Path, mode: str = "omni", run: Optional[dict] = None, **ds_extra) -> str:
    """A shipped config shrunk to a tiny model on a 60-sentence corpus; written into ``folder``."""
    cfg = json.loads((ROOT / "ds_configs" / f"{mode}.json").read_text())
    cfg.update(ds_extra)
    cfg["omni_router"]["model"].update(d_model=32, num_layers=2, num_heads=2, ffn_dim=64)
    cfg["omni_router"]["data"].update(corpus_sentences=60, corpus_words=0, corpus_text="sentences", vocab_size=48,
                                      batch_frames=2500, **cfg.pop("data", {}))
    cfg["omni_router"]["run"].update({"max_steps": 24, "log_every": 4, **(run or {})})
    cfg["scheduler"]["params"]["warmup_num_steps"] = 5
    path = Path(folder) / f"{mode}-{len(list(Path(folder).glob('*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One launch of the trainer in the background: its merged output read line by line, its processes."""

    def __init__(self, cmd: list, env: dict):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self.lines = []

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        """Read output until a line contains ``text`` (True) or the run ends or the time is up (False)."""
        end = time.time() + timeout
        while time.time() < end:
            line = self.proc.stdout.readline()
            if not line:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def rank(self, local_rank: int) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
                return child
        raise RuntimeError(f"no rank {local_rank} under the launcher")

    def launcher(self) -> psutil.Process:
        return next(c for c in psutil.Process(self.proc.pid).children(recursive=True)
                    if "deepspeed.launcher.launch" in c.cmdline())

    def finish(self, timeout: float = 300) -> int:
        """The runner's exit status once it and every process it started are gone; the rest of the output."""
        tree = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)] \
            if self.proc.poll() is None else []
        self.lines += self.proc.stdout.readlines()
        code = self.proc.wait(timeout=timeout)
        gone_by(tree, timeout)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


def gone_by(pids: list, timeout: float) -> list:
    """Wait for processes to end; return those still alive after ``timeout`` seconds."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


class Drill:
    """A work folder with a tiny corpus and config, the reference run, and the commands the probes use."""

    def __init__(self, work: Path, corpus: Optional[Path] = None):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        if corpus is None:
            from trainer.corpus import build_corpus
            corpus = self.work / "corpus"
            build_corpus(str(corpus), 60, seed=1234)  # data.corpus_seed's default: the trainer reuses it
        self.corpus = Path(corpus)
        self.config = tiny_config(self.work, run={"max_steps": 8, "save_every": 4, "log_every": 2})
        self.env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        self._reference = None

    def command(self, out: Path, extra=(), ranks: int = 2, config: Optional[str] = None,
                script: str = "trainer/main.py") -> list:
        return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), script,
                "--deepspeed_config", config or self.config, "--corpus_dir", str(self.corpus),
                "--output_dir", str(out), *extra]

    def launch(self, out: Path, extra=(), timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(out, extra, **kw), cwd=ROOT, capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def start(self, out: Path, extra=(), env: Optional[dict] = None, **kw) -> Run:
        return Run(self.command(out, extra, **kw), {**self.env, **(env or {})})

    def slow_trainer(self) -> str:
        path = self.work / "slow_save_main.py"
        path.write_text(SLOW_SAVE.format(root=str(ROOT)))
        return str(path)

    def no_flock_trainer(self) -> str:
        path = self.work / "no_flock_main.py"
        path.write_text(NO_FLOCK.format(root=str(ROOT)))
        return str(path)

    def reference(self) -> Path:
        """An uninterrupted run to step 8 (checkpoints at steps 4 and 8), made once."""
        if self._reference is None:
            out = self.work / "reference"
            proc = self.launch(out)
            if proc.returncode != 0:
                raise RuntimeError(f"the reference run failed:\n{proc.stderr[-3000:]}")
            self._reference = out
        return self._reference

    def copy_of_reference(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.reference(), out, ignore=shutil.ignore_patterns(".lock"))
        return out


def weights(tag_dir: Path) -> dict:
    """Every weight of a checkpoint (non-expert and expert files), by name and file."""
    found = {f"module.{k}": v for k, v in integrity.load(tag_dir / MODEL_STATES, [])["module"].items()}
    for f in tag_dir.iterdir():
        if EXPERT_FILE.fullmatch(f.name):
            found.update({f"{f.name}:{k}": v for k, v in integrity.load(f, []).items()})
    return found


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def resumed_exactly(drill: Drill, out: Path) -> tuple[bool, str]:
    """Resume ``out`` to step 8; (its weights equal the reference's bit for bit, what happened)."""
    proc = drill.launch(out)
    if proc.returncode != 0:
        return False, f"resume exit {proc.returncode}"
    resumed = next((ln for ln in proc.stdout.splitlines() if ln.startswith("resumed from")), "no resume")
    same = same_weights(out / "checkpoints" / "step8", drill.reference() / "checkpoints" / "step8")
    return same, f"{resumed.split('/')[-1]}; step-8 weights {'identical' if same else 'DIFFER'}"


def latest(out: Path) -> str:
    path = out / "checkpoints" / "latest"
    return path.read_text() if path.exists() else "(none)"


# -- bad input ----------------------------------------------------------------------------------------------
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


def probe_bad_input(drill: Drill) -> Row:
    manifest, n = bad_manifest(drill.corpus, drill.work / "bad")
    extra = ["--train_manifest", str(manifest), "--dev_manifest", str(drill.corpus / "dev.jsonl")]
    proc = drill.launch(drill.work / "bad_input", extra)
    log = proc.stdout + proc.stderr
    named = {f"{n + 1}: not JSON", f"{n + 2}: audio", f"{n + 3}", f"{n + 4}", f"{n + 5}: not UTF-8"}
    seen = sorted(x for x in named if f"train.jsonl:{x}" in log)
    ok = proc.returncode == 0 and len(seen) == 5 and "skipped 3 utterances whose audio" in log \
        and "samples are NaN or infinite" in log
    return Row("bad_input", "exit 0; 5 bad rows named by file:line (not JSON and not UTF-8 at start-up; missing, "
               "truncated, NaN when loaded, those 3 skipped and counted)", f"exit {proc.returncode}; {len(seen)}/5 "
               "named", ok)


def probe_bad_input_strict(drill: Drill) -> Row:
    manifest, n = bad_manifest(drill.corpus, drill.work / "bad")
    out = drill.work / "bad_strict"
    proc = drill.launch(out, ["--train_manifest", str(manifest), "--dev_manifest", str(drill.corpus / "dev.jsonl"),
                              "--strict_data"])
    listed = [x for x in (f"{n + 1}: not JSON", f"{n + 2}: audio", f"{n + 5}: not UTF-8")
              if f"train.jsonl:{x}" in proc.stderr]
    ok = proc.returncode == 2 and len(listed) == 3 and not (out / "checkpoints").exists()
    return Row("bad_input_strict", "exit 2 before training, listing the rows bad at start-up",
               f"exit {proc.returncode}; {len(listed)}/3 listed", ok)


def probe_misspelt_section(drill: Drill) -> Row:
    cfg = json.loads(Path(drill.config).read_text())
    cfg["omni-router"] = cfg.pop("omni_router")
    path = drill.work / "misspelt.json"
    path.write_text(json.dumps(cfg))
    out = drill.work / "misspelt"
    proc = drill.launch(out, config=str(path))
    ok = proc.returncode == 2 and "unknown top-level key 'omni-router'" in proc.stderr \
        and "did you mean 'omni_router'?" in proc.stderr and not out.exists()
    return Row("misspelt_section", "exit 2 naming 'omni-router' and 'omni_router'; nothing written",
               f"exit {proc.returncode}; {last_line(proc.stderr)}", ok)


def probe_ep_size(drill: Drill) -> Row:
    out = drill.work / "ep_size"
    proc = drill.launch(out, ["--set", "moe.ep_size=4"])
    ok = proc.returncode == 2 and "use one of 1, 2" in proc.stderr and "Traceback" not in proc.stderr \
        and not out.exists()
    return Row("ep_size_vs_world", "exit 2, the message alone (values that work), nothing written",
               f"exit {proc.returncode}; traceback {'yes' if 'Traceback' in proc.stderr else 'no'}; "
               f"written {'yes' if out.exists() else 'no'}", ok)


def probe_changed_config(drill: Drill) -> Row:
    out = drill.copy_of_reference("changed_config")
    cases = [(["--set", "model.d_model=48", "--set", "moe.top_k=2"], 2,
              ["model.d_model: 32 -> 48; moe.top_k: 1 -> 2", "--reset_optimizer"]),
             (["--set", "model.d_model=48", "--reset_optimizer"], 2, ["do not fit the changed model"]),
             (["--set", "moe.top_k=2", "--reset_optimizer", "--max_steps", "10", "--set", "run.log_every=1"], 0,
              ["moe.top_k: 1 -> 2", "run.log_every: 2 -> 1", "(model-defining; weights loaded where they fit)"])]
    failed = []
    for extra, code, texts in cases:
        proc = drill.launch(out, extra)
        if proc.returncode != code or not all(t in proc.stdout + proc.stderr for t in texts):
            failed.append(f"{' '.join(extra)}: exit {proc.returncode}, {last_line(proc.stderr)}")
    return Row("resume_changed_config", "model keys refused, named, exit 2 (--reset_optimizer: loaded if shapes "
               "fit); run keys accepted and printed", f"{len(cases) - len(failed)}/{len(cases)} cases as expected"
               + "".join(f"; {f}" for f in failed), not failed)


# -- operator faults ----------------------------------------------------------------------------------------
def probe_runner_signal(drill: Drill, sig: signal.Signals) -> Row:
    out = drill.work / f"runner_{sig.name}"
    run = drill.start(out, ["--max_steps", str(LONG)])
    run.wait_for("step 4/")
    tree = [c.pid for c in psutil.Process(run.proc.pid).children(recursive=True)]
    started = time.time()
    os.kill(run.proc.pid, sig)  # the deepspeed runner alone
    alive = gone_by(tree, 120)
    took = time.time() - started
    run.lines += run.proc.stdout.readlines()
    saved = latest(out)
    ok = not alive and "launcher that started this rank is gone" in run.log and saved != "(none)" \
        and not checkpoint.problem(out / "checkpoints", saved)
    return Row(f"runner_{sig.name}", "ranks notice, save at the next step, exit; no process left",
               f"{len(alive)} left after {took:.0f} s; saved {saved}", ok)


def probe_launcher_sigterm_slow_save(drill: Drill) -> Row:
    out = drill.work / "launcher_slow_save"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.save_every=4"], script=drill.slow_trainer(),
                      env={"DRILL_SAVE_S": "120"})
    run.wait_for("saved checkpoint")
    run.wait_for("step 6/")
    started = time.time()
    run.launcher().send_signal(signal.SIGTERM)
    code = run.finish()
    took = time.time() - started
    stop_tags = [t for t in checkpoint.tags(out / "checkpoints") if t != "step4"]
    ok = code == 1 and latest(out) == "step4" and stop_tags and checkpoint.problem(out / "checkpoints", stop_tags[-1])
    return Row("launcher_sigterm_slow_save", "the launcher SIGKILLs the ranks 30 s into a longer save and exits 1; "
               "the previous checkpoint stays in use", f"launcher exit {code} after {took:.0f} s; latest "
               f"{latest(out)}; {stop_tags[-1] if stop_tags else 'no'} stop save left incomplete", bool(ok))


def probe_signal_during_slow_save(drill: Drill) -> Row:
    """SIGUSR1 to rank 1 alone while a periodic save outlasts run.stop_grace_s: the save finishes, every rank
    stops at the next step boundary, and the run exits 75 (a save is not "no progress")."""
    out = drill.work / "signal_in_save"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.save_every=2", "--set", "run.stop_grace_s=2"],
                      script=drill.slow_trainer(), env={"DRILL_SAVE_S": "5"})
    run.wait_for("saved checkpoint")  # step 2, published at once; the save at step 4 takes 5 s more
    run.wait_for("step 4/")
    run.rank(1).send_signal(signal.SIGUSR1)
    code = run.finish()
    saved = latest(out)
    ok = code == 75 and "stop requested (by another rank)" in run.log and saved not in ("step2", "step4", "(none)") \
        and not checkpoint.problem(out / "checkpoints", saved)
    return Row("signal_during_slow_save", "SIGUSR1 to rank 1 during a 5 s save (grace 2 s): all ranks stop after "
               "it, save, exit 75", f"exit {code}; latest {saved}", ok)


def probe_lock(drill: Drill) -> Row:
    out = drill.work / "lock"
    first = drill.start(out, ["--max_steps", str(LONG)])
    first.wait_for("step 2/")
    second = drill.launch(out, ["--max_steps", "4"])
    refused = second.returncode == 2 and "is in use by another run (pid" in second.stderr
    first.rank(0).kill()
    first.finish()
    with open(out / LOCK, "a") as f:  # what the next run's rank 0 takes first: free once the holder is dead
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
    return Row("output_dir_lock", "a second run into the folder exits 2 naming the holder; after kill -9 of the "
               "holder no stale lock", f"second: exit {second.returncode}; after kill -9 the lock is "
               f"{'free' if free else 'STILL HELD'}", refused and free)


def probe_lock_file(drill: Drill) -> Row:
    out, script = drill.work / "lock_file", drill.no_flock_trainer()
    first = drill.start(out, ["--max_steps", str(LONG)], script=script)
    first.wait_for("step 2/")
    held = locks.lock_file(out / LOCK).exists()
    second = drill.launch(out, ["--max_steps", "4"], script=script)
    refused = second.returncode == 2 and "is in use by another run (pid" in second.stderr \
        and f"{locks.LOCK_FILE}; last heartbeat" in second.stderr
    os.kill(first.proc.pid, signal.SIGTERM)  # the runner alone: the ranks stop, save and exit
    code = first.finish()
    gone = not locks.lock_file(out / LOCK).exists()
    return Row("output_dir_lock_file", "without flock: a lock file with heartbeat; a second run exits 2 naming the "
               "holder and the kind of lock; the file goes when the holder stops",
               f"lock file {'made' if held else 'MISSING'}; second: exit {second.returncode}; first stopped (runner "
               f"{code}), lock file {'removed' if gone else 'LEFT'}", held and refused and gone)


def probe_hung_rank_timeout(drill: Drill) -> Row:
    out = drill.work / "hung_timeout"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.collective_timeout_s=3", "--set",
                            "run.save_every=0"])  # saves have their own, longer timeout
    run.wait_for("step 4/")
    stuck = run.rank(1)
    stuck.suspend()  # SIGSTOP: the rank is alive but never enters the next collective
    started = time.time()
    named = run.wait_for("a collective failed", timeout=120)
    took = time.time() - started
    stuck.resume()
    code = run.finish()
    ok = named and code != 0 and "error: rank 0, training step" in run.log
    line = next((ln for ln in run.lines if "a collective failed" in ln), "").strip()
    return Row("hung_rank_timeout", "the others' collective times out: exit non-zero naming the step",
               f"exit {code} {took:.0f} s after the hang: {line[:90]}", ok)


def probe_hung_rank_sigterm(drill: Drill, second_signal: bool) -> Row:
    out = drill.work / f"hung_sigterm_{int(second_signal)}"
    grace = 600 if second_signal else 3
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.collective_timeout_s=600", "--set",
                            f"run.stop_grace_s={grace}", "--set", "run.save_every=0"])
    run.wait_for("step 4/")
    stuck, blocked = run.rank(1), run.rank(0)
    stuck.suspend()
    started = time.time()
    blocked.send_signal(signal.SIGTERM)
    if second_signal:
        time.sleep(0.5)  # two separate signals, not one merged by the kernel
        blocked.send_signal(signal.SIGTERM)
    alive = gone_by([blocked.pid], 60)
    took = time.time() - started
    stuck.resume()
    run.finish()
    why = "second signal" if second_signal else "no step boundary within 3 s"
    ok = not alive and why in run.log
    return Row("hung_rank_" + ("second_sigterm" if second_signal else "sigterm_grace"),
               f"a rank stuck in a collective ends on {'a second SIGTERM' if second_signal else 'SIGTERM after grace'}",
               f"{'still alive' if alive else 'ended'} {took:.1f} s after the signal", ok)


# -- integrity and trust ------------------------------------------------------------------------------------
def flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def probe_corrupted_checkpoint(drill: Drill) -> Row:
    out = drill.copy_of_reference("corrupted")
    victim = next((out / "checkpoints" / "step8").glob("zero_pp_rank_1_*"))
    flip_byte(victim)  # same size, other bytes
    proc = drill.launch(out, ["--eval_only"])
    named = f"{victim}: content differs from the SHA-256" in proc.stdout
    ok = proc.returncode == 0 and named and "resumed from" in proc.stdout and "step4 at step 4" in proc.stdout
    return Row("corrupted_same_size", "detected by SHA-256 at resume, named; the previous checkpoint is used",
               f"exit {proc.returncode}; named {named}; {latest_resume(proc.stdout)}", ok)


def latest_resume(stdout: str) -> str:
    return next((ln.split("/")[-1] for ln in stdout.splitlines() if ln.startswith("resumed from")), "no resume")


def probe_metrics_once(drill: Drill) -> Row:
    out = drill.copy_of_reference("metrics_once")
    again = drill.launch(out)
    flip_byte(next((out / "checkpoints" / "step8").glob("layer_0_expert_0_*")))
    resumed = drill.launch(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    ok = again.returncode == 0 and "nothing to do" in again.stdout and resumed.returncode == 0 \
        and len(keys) == len(set(keys)) and keys == [("train", 2), ("train", 4), ("train", 6), ("train", 8),
                                                     ("eval", 8)]
    return Row("metrics_after_resume", "each (kind, step) written once after a rerun and a resume from step 4",
               f"rows {keys}", ok)


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path):
    """Add a payload to a checkpoint file and re-record its size and SHA-256, as a tamperer would."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["note"] = _Payload(marker)
    torch.save(saved, path)
    record = path.parent / checkpoint.RECORD
    files = json.loads(record.read_text())
    files["files"][path.name] = {"bytes": path.stat().st_size, "sha256": integrity.digest(path)}
    record.write_text(json.dumps(files))


def probe_planted_payload(drill: Drill) -> Row:
    out = drill.copy_of_reference("payload")
    marker = drill.work / "PAYLOAD_RAN"
    marker.unlink(missing_ok=True)
    victim = out / "checkpoints" / "step8" / MODEL_STATES
    plant(victim, marker)
    tool = subprocess.run([sys.executable, "-m", "tools.consolidate_checkpoint", str(victim.parent), "--out",
                           str(drill.work / "payload_model")], cwd=ROOT, capture_output=True, text=True, env=drill.env)
    resume = drill.launch(out, ["--eval_only"])
    refused = f"{victim}: refused: it holds posix.system" in tool.stderr
    skipped = f"{victim}: refused: it holds posix.system" in resume.stdout and "step4 at step 4" in resume.stdout
    ok = tool.returncode == 2 and refused and skipped and not marker.exists()
    return Row("planted_payload", "consolidation and resume refuse the file naming it and the type; nothing runs",
               f"consolidate exit {tool.returncode}; resume {latest_resume(resume.stdout)}; payload "
               f"{'RAN' if marker.exists() else 'never ran'}", ok)


# -- faults that already held -------------------------------------------------------------------------------
def probe_kill9_rank(drill: Drill) -> Row:
    out = drill.work / "kill9"
    run = drill.start(out)
    run.wait_for("saved checkpoint")
    started = time.time()
    run.rank(1).kill()
    code = run.finish()
    took = time.time() - started
    same, how = resumed_exactly(drill, out)
    return Row("kill9_rank", "the run ends within seconds; resume exact", f"exit {code} after {took:.0f} s; {how}",
               code != 0 and took < 60 and same)


def probe_kill_during_save(drill: Drill) -> Row:
    out = drill.work / "kill_in_save"
    run = drill.start(out, script=drill.slow_trainer(), env={"DRILL_SAVE_S": "60"})
    run.wait_for("saved checkpoint")  # step 4; the save at step 8 sleeps before it is published
    run.wait_for("dev mean WER")  # the final evaluation is logged; its save takes 60 s from here
    run.rank(0).kill()
    run.finish()
    before = latest(out)
    same, how = resumed_exactly(drill, out)
    return Row("kill_during_save", "the previous checkpoint stays in use; resume exact",
               f"latest after the kill {before}; {how}", before == "step4" and same)


def probe_disk_full(drill: Drill) -> Row:
    mount = drill.work / "small_fs"
    mount.mkdir(exist_ok=True)
    size = sum(f.stat().st_size for f in (drill.reference() / "checkpoints" / "step4").iterdir())
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 4096 * 4096 + 65536}", "tmpfs", str(mount)]
    made = subprocess.run(cmd, capture_output=True, text=True)
    if made.returncode != 0:
        return Row("disk_full", "earlier checkpoints intact",
                   f"not run: no size-limited file system ({last_line(made.stderr)})", None)
    try:
        out = mount / "run"
        proc = drill.launch(out)
        kept = latest(out)
        usable = kept != "(none)" and not checkpoint.problem(out / "checkpoints", kept)
        ok = proc.returncode != 0 and usable
        return Row("disk_full", "the run fails; the last complete checkpoint stays usable",
                   f"exit {proc.returncode}; latest {kept} {'verified' if usable else 'NOT usable'}", ok)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


PROBES: dict[str, Callable[[Drill], Row]] = {
    "bad_input": probe_bad_input,
    "bad_input_strict": probe_bad_input_strict,
    "misspelt_section": probe_misspelt_section,
    "ep_size_vs_world": probe_ep_size,
    "resume_changed_config": probe_changed_config,
    "runner_SIGTERM": lambda d: probe_runner_signal(d, signal.SIGTERM),
    "runner_SIGINT": lambda d: probe_runner_signal(d, signal.SIGINT),
    "launcher_sigterm_slow_save": probe_launcher_sigterm_slow_save,
    "signal_during_slow_save": probe_signal_during_slow_save,
    "output_dir_lock": probe_lock,
    "output_dir_lock_file": probe_lock_file,
    "hung_rank_timeout": probe_hung_rank_timeout,
    "hung_rank_sigterm_grace": lambda d: probe_hung_rank_sigterm(d, second_signal=False),
    "hung_rank_second_sigterm": lambda d: probe_hung_rank_sigterm(d, second_signal=True),
    "corrupted_same_size": probe_corrupted_checkpoint,
    "metrics_after_resume": probe_metrics_once,
    "planted_payload": probe_planted_payload,
    "kill9_rank": probe_kill9_rank,
    "kill_during_save": probe_kill_during_save,
    "disk_full": probe_disk_full,
}


def table(rows: list[Row]) -> str:
    marks = {True: "pass", False: "FAIL", None: "not run"}
    lines = ["| probe | expected | observed | result |", "|---|---|---|---|"]
    lines += [f"| {r.probe} | {r.expected} | {r.observed} | {marks[r.ok]} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(PROBES), help="these probes (default: all)")
    p.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = p.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fault-drill-"))
    try:
        drill = Drill(work)
        rows = []
        for name in args.only or PROBES:
            started = time.time()
            rows.append(PROBES[name](drill))
            print(f"{name}: {'pass' if rows[-1].ok else rows[-1].ok} ({time.time() - started:.0f} s)", file=sys.stderr)
        print(table(rows))
        return 0 if all(r.ok is not False for r in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
