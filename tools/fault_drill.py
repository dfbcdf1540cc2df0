"""Fault drill: the faults and bad input the trainer promises to survive, each run for real against a tiny
config on two ranks through DeepSpeed's launcher, and one table: probe, expected, observed, pass.

    python -m tools.fault_drill                       # every probe (about 10 minutes on 2 CPU cores)
    python -m tools.fault_drill --only lock hung_rank_timeout --keep /tmp/drill

"Nothing lost" means: the last complete checkpoint loads, and a run resumed from it ends with the same
weights, bit for bit, as one that was never interrupted. Each probe returns what it observed (exit codes, the
output, which checkpoint was resumed, files present) with its verdict; the fast probes are also tests
(``tests/scenarios/test_faults.py``), which state their expectations on those observations. Exit status: 0
when every probe that ran passed, 1 otherwise. What the drill shares with the tests (launches, the tiny config,
the bad manifest, the fakes) is in ``tools/harness.py``.
"""
import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import psutil
import torch

from tools.harness import ROOT, RunsCode, bad_manifest, command, flip_byte, launch, no_flock_env, tiny_config
from trainer import checkpoint
from trainer.runtime import integrity, locks
from trainer.runtime.deepspeed_contract import EXPERT_FILE, MODEL_STATES
from trainer.runtime.locks import OUTPUT_LOCK as LOCK

LONG = 400  # max_steps of a run that is stopped on purpose
# A trainer whose checkpoint publication (the last act of a save) sleeps after the first one: a save that
# takes as long as we like, so a fault can land inside it.
SLOW_SAVE = """import os, sys, time
sys.path.insert(0, {root!r})
from trainer import checkpoint, run
from trainer.runtime import distributed
publish, calls = checkpoint.publish, []
def slow(*args):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(float(os.environ["DRILL_SAVE_S"]))
    publish(*args)
checkpoint.publish = slow
distributed.end_process(run.main())
"""


@dataclass
class Row:
    probe: str
    expected: str
    seen: dict  # what the probe observed, by name: exit codes, outputs, checkpoints, files
    ok: Optional[bool]  # None: not run here, ``seen["not run"]`` says why

    @property
    def observed(self) -> str:
        """The observations for the table; whole outputs (text of several lines) are left out."""
        return "; ".join(f"{k}: {v}" for k, v in self.seen.items() if not (isinstance(v, str) and "\n" in v))


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
        return self._child(f"--local_rank={local_rank}", f"no rank {local_rank} under the launcher")

    def launcher(self) -> psutil.Process:
        return self._child("deepspeed.launcher.launch", "no launcher under the runner")

    def _child(self, marker: str, missing: str) -> psutil.Process:
        """The process under the runner whose command line holds ``marker``. A child that has exited (a zombie
        this VM's init has not reaped yet, or one gone meanwhile) has no command line: it is passed over."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if marker in " ".join(child.cmdline()):
                    return child
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
        raise RuntimeError(missing)

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
            from trainer.data.corpus import build_corpus
            corpus = self.work / "corpus"
            build_corpus(str(corpus), 60, seed=1234)  # data.corpus.seed's default: the trainer reuses it
        self.corpus = Path(corpus)
        self.config = tiny_config(self.work, run={"max_steps": 8, "save_every": 4, "log_every": 2})
        self.env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        self._reference = None

    def launch(self, out: Path, extra=(), timeout: float = 600, ranks: int = 2, config: Optional[str] = None,
               script: str = "trainer/main.py", env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return launch(config or self.config, self.corpus, out, ranks, extra, timeout, {**self.env, **(env or {})},
                      script)

    def start(self, out: Path, extra=(), env: Optional[dict] = None, ranks: int = 2, config: Optional[str] = None,
              script: str = "trainer/main.py") -> Run:
        return Run(command(config or self.config, self.corpus, out, ranks, extra, script),
                   {**self.env, **(env or {})})

    def slow_trainer(self) -> str:
        path = self.work / "slow_save_main.py"
        path.write_text(SLOW_SAVE.format(root=str(ROOT)))
        return str(path)

    def no_flock_env(self) -> dict:
        """The environment of runs whose ranks find no flock (Lustre, NFS without locking)."""
        return no_flock_env(self.work, env=self.env)

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


def resume_to_step8(drill: Drill, out: Path) -> dict:
    """Resume ``out`` to step 8: its exit code, the checkpoint it resumed from, and whether its step-8 weights
    equal the reference's bit for bit."""
    proc = drill.launch(out)
    same = proc.returncode == 0 and same_weights(out / "checkpoints" / "step8",
                                                 drill.reference() / "checkpoints" / "step8")
    return {"resume exit": proc.returncode, "resumed": resumed_from(proc.stdout), "step-8 weights identical": same}


def latest(out: Path) -> str:
    path = out / "checkpoints" / "latest"
    return path.read_text() if path.exists() else "(none)"


def resumed_from(stdout: str) -> str:
    """The end of the trainer's 'resumed from ...' line: 'step4 at step 4' ('no resume' without one)."""
    return next((ln.split("/")[-1] for ln in stdout.splitlines() if ln.startswith("resumed from")), "no resume")


def usable(out: Path, tag: str) -> str:
    """'' when the checkpoint is complete and verified, else why not (``checkpoint.problem``)."""
    return "no checkpoint" if tag == "(none)" else checkpoint.problem(out / "checkpoints", tag)


def probe_bad_input(drill: Drill) -> Row:
    manifest, n = bad_manifest(drill.corpus, drill.work / "bad")
    extra = ["--train_manifest", str(manifest), "--dev_manifest", str(drill.corpus / "dev.jsonl")]
    proc = drill.launch(drill.work / "bad_input", extra)
    log = proc.stdout + proc.stderr
    named = [x for x in (f"{n + 1}: not JSON", f"{n + 2}: audio", f"{n + 3}", f"{n + 4}", f"{n + 5}: not UTF-8")
             if f"train.jsonl:{x}" in log]
    seen = {"exit": proc.returncode, "rows named": len(named), "log": log}
    ok = seen["exit"] == 0 and len(named) == 5 and "skipped 3 utterances whose audio" in log \
        and "samples are NaN or infinite" in log
    return Row("bad_input", "exit 0; 5 bad rows named by file:line (not JSON and not UTF-8 at start-up; missing, "
               "truncated, NaN when loaded, those 3 skipped and counted)", seen, ok)


def probe_bad_input_strict(drill: Drill) -> Row:
    manifest, n = bad_manifest(drill.corpus, drill.work / "bad")
    out = drill.work / "bad_strict"
    proc = drill.launch(out, ["--train_manifest", str(manifest), "--dev_manifest", str(drill.corpus / "dev.jsonl"),
                              "--strict_data"])
    listed = [x for x in (f"{n + 1}: not JSON", f"{n + 2}: audio", f"{n + 5}: not UTF-8")
              if f"train.jsonl:{x}" in proc.stderr]
    seen = {"exit": proc.returncode, "rows listed": len(listed), "checkpoints": (out / "checkpoints").exists()}
    return Row("bad_input_strict", "exit 2 before training, listing the rows bad at start-up", seen,
               seen["exit"] == 2 and len(listed) == 3 and not seen["checkpoints"])


def probe_misspelt_section(drill: Drill) -> Row:
    cfg = json.loads(Path(drill.config).read_text())
    cfg["omni-router"] = cfg.pop("omni_router")
    path = drill.work / "misspelt.json"
    path.write_text(json.dumps(cfg))
    out = drill.work / "misspelt"
    proc = drill.launch(out, config=str(path))
    seen = {"exit": proc.returncode, "error": last_line(proc.stderr), "stderr": proc.stderr, "written": out.exists()}
    ok = seen["exit"] == 2 and "unknown top-level key 'omni-router'" in proc.stderr \
        and "did you mean 'omni_router'?" in proc.stderr and not seen["written"]
    return Row("misspelt_section", "exit 2 naming 'omni-router' and 'omni_router'; nothing written", seen, ok)


def probe_ep_size(drill: Drill) -> Row:
    out = drill.work / "ep_size"
    proc = drill.launch(out, ["--set", "moe.ep_size=4"])
    seen = {"exit": proc.returncode, "error": last_line(proc.stderr), "stderr": proc.stderr, "written": out.exists()}
    ok = seen["exit"] == 2 and "use one of 1, 2" in proc.stderr and "Traceback" not in proc.stderr \
        and not seen["written"]
    return Row("ep_size_vs_world", "exit 2, the message alone (values that work), nothing written", seen, ok)


# Resumes of the reference run (d_model 32, top_k 1, log_every 2) with keys changed: (name, extra arguments).
CHANGED_CONFIG = [("model keys", ["--set", "model.d_model=48", "--set", "moe.top_k=2"]),
                  ("shapes, --reset_optimizer", ["--set", "model.d_model=48", "--reset_optimizer"]),
                  ("fitting, --reset_optimizer", ["--set", "moe.top_k=2", "--reset_optimizer", "--max_steps", "10",
                                                  "--set", "run.log_every=1"])]


def probe_changed_config(drill: Drill) -> Row:
    out = drill.copy_of_reference("changed_config")
    seen = {}
    for name, extra in CHANGED_CONFIG:
        proc = drill.launch(out, extra)
        seen.update({f"{name}: exit": proc.returncode, f"{name}: error": last_line(proc.stderr),
                     f"{name}: output": proc.stdout + proc.stderr})
    expected = {"model keys": (2, ["model.d_model: 32 -> 48; moe.top_k: 1 -> 2", "--reset_optimizer"]),
                "shapes, --reset_optimizer": (2, ["do not fit the changed model"]),
                "fitting, --reset_optimizer": (0, ["moe.top_k: 1 -> 2", "run.log_every: 2 -> 1",
                                                   "(model-defining; weights loaded where they fit)"])}
    ok = all(seen[f"{name}: exit"] == code and all(t in seen[f"{name}: output"] for t in texts)
             for name, (code, texts) in expected.items())
    return Row("resume_changed_config", "model keys refused, named, exit 2 (--reset_optimizer: loaded if shapes "
               "fit); run keys accepted and printed", seen, ok)


# -- operator faults ----------------------------------------------------------------------------------------
def probe_runner_signal(drill: Drill, sig: signal.Signals) -> Row:
    out = drill.work / f"runner_{sig.name}"
    run = drill.start(out, ["--max_steps", str(LONG)])
    run.wait_for("step 4/")
    tree = [c.pid for c in psutil.Process(run.proc.pid).children(recursive=True)]
    started = time.time()
    os.kill(run.proc.pid, sig)  # the deepspeed runner alone
    alive = gone_by(tree, 120)
    seen = {"processes left": len(alive), "seconds": round(time.time() - started)}
    run.lines += run.proc.stdout.readlines()
    seen.update({"latest": latest(out), "log": run.log})
    seen["latest problem"] = usable(out, seen["latest"])
    ok = not alive and "launcher that started this rank is gone" in run.log and not seen["latest problem"]
    return Row(f"runner_{sig.name}", "ranks notice, save at the next step, exit; no process left", seen, ok)


def probe_launcher_sigterm_slow_save(drill: Drill) -> Row:
    out = drill.work / "launcher_slow_save"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.save_every=4"], script=drill.slow_trainer(),
                      env={"DRILL_SAVE_S": "120"})
    run.wait_for("saved checkpoint")
    run.wait_for("step 6/")
    started = time.time()
    run.launcher().send_signal(signal.SIGTERM)
    seen = {"launcher exit": run.finish(), "seconds": round(time.time() - started), "latest": latest(out)}
    seen["later saves"] = [t for t in checkpoint.tags(out / "checkpoints") if t != "step4"]
    seen["later save problem"] = usable(out, seen["later saves"][-1]) if seen["later saves"] else ""
    ok = seen["launcher exit"] == 1 and seen["latest"] == "step4" and bool(seen["later save problem"])
    return Row("launcher_sigterm_slow_save", "the launcher SIGKILLs the ranks 30 s into a longer save and exits 1; "
               "the previous checkpoint stays in use", seen, ok)


def probe_signal_during_slow_save(drill: Drill) -> Row:
    """SIGUSR1 to rank 1 alone while a periodic save outlasts run.stop_grace_s: the save finishes, every rank
    stops at the next step boundary, and the run exits 75 (a save is not "no progress")."""
    out = drill.work / "signal_in_save"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.save_every=2", "--set", "run.stop_grace_s=2"],
                      script=drill.slow_trainer(), env={"DRILL_SAVE_S": "5"})
    run.wait_for("saved checkpoint")  # step 2, published at once; the save at step 4 takes 5 s more
    run.wait_for("step 4/")
    run.rank(1).send_signal(signal.SIGUSR1)
    seen = {"exit": run.finish(), "latest": latest(out), "log": run.log}
    seen["latest problem"] = usable(out, seen["latest"])
    ok = seen["exit"] == 75 and "stop requested (by another rank)" in run.log \
        and checkpoint.step_of(seen["latest"]) > 4 and not seen["latest problem"]
    return Row("signal_during_slow_save", "SIGUSR1 to rank 1 during a 5 s save (grace 2 s): all ranks stop after "
               "it, save, exit 75", seen, ok)


def probe_lock(drill: Drill) -> Row:
    out = drill.work / "lock"
    first = drill.start(out, ["--max_steps", str(LONG)])
    first.wait_for("step 2/")
    second = drill.launch(out, ["--max_steps", "4"])
    first.rank(0).kill()
    first.finish()
    with open(out / LOCK, "a") as f:  # what the next run's rank 0 takes first: free once the holder is dead
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
    seen = {"second exit": second.returncode, "second error": last_line(second.stderr),
            "second stderr": second.stderr, "lock free after kill -9": free}
    ok = second.returncode == 2 and "is in use by another run (pid" in second.stderr and free
    return Row("output_dir_lock", "a second run into the folder exits 2 naming the holder; after kill -9 of the "
               "holder no stale lock", seen, ok)


def probe_lock_file(drill: Drill) -> Row:
    out, env = drill.work / "lock_file", drill.no_flock_env()
    first = drill.start(out, ["--max_steps", str(LONG)], env=env)
    first.wait_for("step 2/")
    seen = {"lock file made": locks.lock_file(out / LOCK).exists()}
    second = drill.launch(out, ["--max_steps", "4"], env=env)
    seen.update({"second exit": second.returncode, "second error": last_line(second.stderr),
                 "second stderr": second.stderr})
    os.kill(first.proc.pid, signal.SIGTERM)  # the runner alone: the ranks stop, save and exit
    seen["first exit"] = first.finish()
    seen["lock file removed"] = not locks.lock_file(out / LOCK).exists()
    ok = seen["lock file made"] and second.returncode == 2 and "is in use by another run (pid" in second.stderr \
        and f"{locks.LOCK_FILE}; last heartbeat" in second.stderr and seen["lock file removed"]
    return Row("output_dir_lock_file", "without flock: a lock file with heartbeat; a second run exits 2 naming the "
               "holder and the kind of lock; the file goes when the holder stops", seen, ok)


def probe_hung_rank_timeout(drill: Drill) -> Row:
    out = drill.work / "hung_timeout"
    run = drill.start(out, ["--max_steps", str(LONG), "--set", "run.collective_timeout_s=3", "--set",
                            "run.save_every=0"])  # saves have their own, longer timeout
    run.wait_for("step 4/")
    stuck = run.rank(1)
    stuck.suspend()  # SIGSTOP: the rank is alive but never enters the next collective
    started = time.time()
    named = run.wait_for("a collective failed", timeout=120)
    seen = {"collective failure within 120 s": named, "seconds": round(time.time() - started)}
    stuck.resume()
    seen["exit"] = run.finish()
    seen["failure line"] = next((ln for ln in run.lines if "a collective failed" in ln), "").strip()
    seen["log"] = run.log
    ok = named and seen["exit"] != 0 and "error: rank 0, training step" in run.log
    return Row("hung_rank_timeout", "the others' collective times out: exit non-zero naming the step", seen, ok)


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
    seen = {"signalled rank ended within 60 s": not alive, "seconds": round(time.time() - started, 1)}
    stuck.resume()
    run.finish()
    seen["log"] = run.log
    why = "second signal" if second_signal else "no step boundary within 3 s"
    return Row("hung_rank_" + ("second_sigterm" if second_signal else "sigterm_grace"),
               f"a rank stuck in a collective ends on {'a second SIGTERM' if second_signal else 'SIGTERM after grace'}",
               seen, not alive and why in run.log)


# -- integrity and trust ------------------------------------------------------------------------------------
def probe_corrupted_checkpoint(drill: Drill) -> Row:
    out = drill.copy_of_reference("corrupted")
    victim = next((out / "checkpoints" / "step8").glob("zero_pp_rank_1_*"))
    flip_byte(victim)  # same size, other bytes
    proc = drill.launch(out, ["--eval_only"])
    seen = {"damaged file": str(victim), "exit": proc.returncode, "resumed": resumed_from(proc.stdout),
            "stdout": proc.stdout}
    ok = seen["exit"] == 0 and f"{victim}: content differs from the SHA-256" in proc.stdout \
        and seen["resumed"] == "step4 at step 4"
    return Row("corrupted_same_size", "detected by SHA-256 at resume, named; the previous checkpoint is used", seen,
               ok)


def probe_metrics_once(drill: Drill) -> Row:
    out = drill.copy_of_reference("metrics_once")
    again = drill.launch(out)
    flip_byte(next((out / "checkpoints" / "step8").glob("layer_0_expert_0_*")))
    resumed = drill.launch(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = {"rerun exit": again.returncode, "rerun stdout": again.stdout, "resume exit": resumed.returncode,
            "resumed": resumed_from(resumed.stdout), "rows": [(r["kind"], r["step"]) for r in rows]}
    ok = again.returncode == 0 and "nothing to do" in again.stdout and resumed.returncode == 0 \
        and seen["rows"] == [("train", 2), ("train", 4), ("train", 6), ("train", 8), ("eval", 8)]
    return Row("metrics_after_resume", "each (kind, step) written once after a rerun and a resume from step 4", seen,
               ok)


def plant(path: Path, marker: Path):
    """Add a payload to a checkpoint file and re-record its size and SHA-256, as a tamperer would."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved["note"] = RunsCode(marker)
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
    seen = {"planted file": str(victim), "consolidate exit": tool.returncode, "consolidate stderr": tool.stderr,
            "resume exit": resume.returncode, "resumed": resumed_from(resume.stdout), "resume stdout": resume.stdout,
            "payload ran": marker.exists()}
    refusal = f"{victim}: refused: it holds posix.system"
    ok = tool.returncode == 2 and refusal in tool.stderr and resume.returncode == 0 and refusal in resume.stdout \
        and seen["resumed"] == "step4 at step 4" and not seen["payload ran"]
    return Row("planted_payload", "consolidation and resume refuse the file naming it and the type; nothing runs",
               seen, ok)


# -- faults that already held -------------------------------------------------------------------------------
def probe_kill9_rank(drill: Drill) -> Row:
    out = drill.work / "kill9"
    run = drill.start(out)
    run.wait_for("saved checkpoint")
    started = time.time()
    run.rank(1).kill()
    seen = {"exit": run.finish(), "seconds": round(time.time() - started), **resume_to_step8(drill, out)}
    ok = seen["exit"] != 0 and seen["seconds"] < 60 and seen["step-8 weights identical"]
    return Row("kill9_rank", "the run ends within seconds; resume exact", seen, ok)


def probe_kill_during_save(drill: Drill) -> Row:
    out = drill.work / "kill_in_save"
    run = drill.start(out, script=drill.slow_trainer(), env={"DRILL_SAVE_S": "60"})
    run.wait_for("saved checkpoint")  # step 4; the save at step 8 sleeps before it is published
    run.wait_for("dev mean WER")  # the final evaluation is logged; its save takes 60 s from here
    run.rank(0).kill()
    run.finish()
    seen = {"latest after the kill": latest(out), **resume_to_step8(drill, out)}
    ok = seen["latest after the kill"] == "step4" and seen["step-8 weights identical"]
    return Row("kill_during_save", "the previous checkpoint stays in use; resume exact", seen, ok)


def probe_disk_full(drill: Drill) -> Row:
    mount = drill.work / "small_fs"
    mount.mkdir(exist_ok=True)
    size = sum(f.stat().st_size for f in (drill.reference() / "checkpoints" / "step4").iterdir())
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 4096 * 4096 + 65536}", "tmpfs", str(mount)]
    made = subprocess.run(cmd, capture_output=True, text=True)
    if made.returncode != 0:
        return Row("disk_full", "earlier checkpoints intact",
                   {"not run": f"no size-limited file system ({last_line(made.stderr)})"}, None)
    try:
        out = mount / "run"
        proc = drill.launch(out)
        seen = {"exit": proc.returncode, "latest": latest(out)}
        seen["latest problem"] = usable(out, seen["latest"])
        return Row("disk_full", "the run fails; the last complete checkpoint stays usable", seen,
                   seen["exit"] != 0 and not seen["latest problem"])
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
