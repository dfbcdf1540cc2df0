"""When a rank stops: signals, a vanished launcher, and the deadline after which a stuck rank ends itself.

A stop is *requested* on a rank by SIGTERM, SIGINT or SIGUSR1 (SLURM's warning before a time limit or a
preemption), or by DeepSpeed's runner or launcher that started the rank disappearing (``kill`` of the
``deepspeed`` process alone leaves the ranks running otherwise: on one node it forwards no signal). The ranks
*agree* on it at the next step boundary, save, and exit 75 (``exits.REQUEUE``).

Python runs signal handlers only when the main thread returns to the interpreter, which a rank blocked in a
collective never does. So the request is read by a watcher thread from ``signal.set_wakeup_fd`` (the C-level
handler writes the signal number at once), and the watcher ends the process itself, status 1 and without a
save (the last complete checkpoint stays in use), on a second signal, or when the loop shows no progress
(``beat``) within ``grace_s`` of the first and has not begun the save (``acknowledge``). The same signal
repeated within ``REPEAT_S`` is one request: SLURM sends SIGTERM twice within milliseconds at a time limit
and at a preemption without grace time, and the ranks then have ``KillWait`` (30 s by default) to save.
"""
import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager

from trainer.runtime import locks
from trainer.runtime.deepspeed_contract import is_deepspeed_launcher, is_deepspeed_runner

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FORCED = 1  # exit status when the watcher ends a rank that did not stop by itself
REPEAT_S = 0.2  # the same signal within this of the first is one request, not the second that forces an exit


class StopSignal:
    """The stop request of this rank (``received``: why, '' if none), watched from a thread."""

    def __init__(self, grace_s: float):
        self.received, self.grace_s = "", grace_s
        self.signals, self.requested_at = 0, 0.0
        self.last_beat = time.monotonic()
        self.acknowledged = False
        self.saving = False  # a checkpoint save is under way: it beats no one, and has a timeout of its own
        self.parents = launcher_chain()
        read, write = os.pipe()
        os.set_blocking(write, False)
        self.read = read
        for sig in SIGNALS:
            signal.signal(sig, lambda *_: None)  # the watcher acts; the default action would kill at once
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-watcher", daemon=True).start()

    def beat(self):
        """The loop made progress (a micro-batch or an evaluation batch done)."""
        self.last_beat = time.monotonic()

    @contextmanager
    def save(self):
        """No deadline while a checkpoint is written (its collectives have ``run.checkpoint_timeout_s``): a stop
        requested during a long periodic save is taken at the next step, not turned into an unsaved exit."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
            self.beat()

    def acknowledge(self):
        """The loop has seen the stop and begun the save: no deadline any more (a second signal still ends)."""
        self.acknowledged = True

    def _watch(self):
        while True:
            ready, _, _ = select.select([self.read], [], [], 1.0)
            for number in os.read(self.read, 64) if ready else b"":
                if number in SIGNALS:  # others with Python handlers (SIGCHLD of DataLoader workers) pass by
                    self._request(signal.Signals(number).name)
            gone = [pid for pid, parent in self.parents.items() if _parent(pid) != parent]
            if gone and not self.received:
                self._request("the DeepSpeed launcher that started this rank is gone", counted=False)
            late = time.monotonic() - self.last_beat > self.grace_s
            if self.received and not self.acknowledged and not self.saving and late:
                self._exit(f"no step boundary within {self.grace_s:.0f} s of the stop request ({self.received}); "
                           "this rank may be stuck in a collective")

    def _request(self, why: str, counted: bool = True):
        now = time.monotonic()
        if counted and why == self.received and now - self.requested_at < REPEAT_S:
            return  # the same signal again at once (SLURM sends SIGTERM twice at a time limit or GraceTime 0)
        self.signals += counted
        if self.signals > 1:
            self._exit(f"second signal ({why})")
        if not self.received:
            self.received, self.requested_at = why, now
            self.last_beat = now  # the grace period starts now

    @staticmethod
    def _exit(why: str):
        sys.stderr.write(f"rank {os.environ.get('RANK', '0')}: {why}: exiting without a save; the last complete "
                         "checkpoint stays in use\n")
        sys.stderr.flush()
        locks.release_all()  # the output folder's lock file, if it is one (flock goes with the process)
        os._exit(FORCED)


def launcher_chain() -> dict:
    """{pid: the parent it must keep} along this rank -> DeepSpeed's launcher -> DeepSpeed's runner; a change
    means the runner or the launcher is gone. Empty when another launcher (srun, torchrun) started the rank:
    those forward signals themselves."""
    me, launcher = os.getpid(), os.getppid()
    if not is_deepspeed_launcher(_cmdline(launcher)):
        return {}
    runner = _parent(launcher)
    return {me: launcher, **({launcher: runner} if is_deepspeed_runner(_cmdline(runner)) else {})}


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int:
    """The parent pid of a live process; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
