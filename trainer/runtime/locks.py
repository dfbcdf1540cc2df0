"""Locks on shared folders (the output folder, the corpus being built) that hold on any file system.

``flock`` first: the kernel releases it however the process ends. On a file system without it (Lustre or NFS
mounted without locking: ``flock`` fails with ENOSYS, ENOLCK, EOPNOTSUPP or EINVAL) a lock file instead,
created with ``O_CREAT | O_EXCL`` and holding ``pid P on HOST since TIME``; a daemon thread of the holder
refreshes its modification time every ``heartbeat_s`` (the heartbeat), and the holder removes it when it lets
go (``release``, ``release_all`` on the way out of a run). A lock file whose holder is gone without removing it
(kill -9, a node that died) is stale, and taken over, only when both hold:

* its heartbeat is older than ``stale_s`` (10 heartbeats; measured against the file system's clock, so the
  clocks of the nodes do not matter), and
* its holder is on another host, or on this host and its pid is dead (or reused by a later process).

The lock file is ``NAME.heartbeat`` beside the flock's file ``NAME``, which flock leaves behind naming its last
holder.

On the holder's own host the pid is the authority: a live pid keeps its lock however old its heartbeat (a
holder stopped with SIGSTOP, or starved), so a lock is never taken from a live run on this host; across hosts,
where no pid can be checked, the heartbeat is. Every message names the holder and the kind of lock in use.
All hosts sharing a folder must mount it alike (one kind of lock for all).
"""
import errno
import fcntl
import os
import re
import socket
import threading
import time
from pathlib import Path

import psutil

from trainer.runtime.exits import ToFix

FLOCK = "flock"
LOCK_FILE = "lock file with heartbeat, the file system has no flock"
NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # EOPNOTSUPP is ENOTSUP on Linux
OUTPUT_LOCK = ".lock"  # in a run's output folder: who is writing into it
HEARTBEAT_S = 10.0
STALE_HEARTBEATS = 10
_HOLDER = re.compile(r"pid (\d+) on (\S+) since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")
_STAMP = "%Y-%m-%d %H:%M:%S"
_held: list = []  # the locks this process holds (``release_all``)


class LockBusy(ToFix, ValueError):
    """Held by another run (or, for a lock file, by a holder that may be alive); worded for the user."""


class Lock:
    """A lock this process holds; ``release`` (or leaving the ``with`` block) lets it go."""

    def __init__(self, path: Path, kind: str, line: str, handle=None, heartbeat_s: float = HEARTBEAT_S):
        self.path, self.kind, self.line, self.handle = Path(path), kind, line, handle
        self.inode = os.stat(path).st_ino if kind == LOCK_FILE else None
        self._stop = threading.Event()
        if kind == LOCK_FILE:
            threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="lock-heartbeat").start()
        _held.append(self)

    def _beat(self, period: float):
        while not self._stop.wait(period):
            try:
                if os.stat(self.path).st_ino != self.inode or self.path.read_text().strip() != self.line:
                    break
                os.utime(self.path)
            except FileNotFoundError:
                break
            except OSError:
                pass  # a transient failure of the file system: the next beat tries again
        if not self._stop.is_set():
            print(f"WARNING: {self.path}: this process's lock file was removed or replaced by another", flush=True)

    def _ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode and self.path.read_text().strip() == self.line
        except OSError:
            return False

    def release(self):
        """Let go: stop the heartbeat, remove the lock file (if still ours) or unlock."""
        if self in _held:
            _held.remove(self)
        self._stop.set()
        if self.kind == LOCK_FILE and self._ours():
            try:
                self.path.unlink()
            except OSError:
                pass
        if self.handle is not None:
            self.handle.close()  # the kernel drops the flock
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def release_all():
    """Let go of every lock of this process (its lock files removed): the run's clean exit path."""
    for lock in list(_held):
        lock.release()


def holder_line() -> str:
    """What a lock says of its holder: pid, host, since when."""
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime(_STAMP)}"


def acquire(path, wait: bool = False, heartbeat_s: float = HEARTBEAT_S, poll_s: float = 1.0,
            use_flock: bool = True) -> Lock:
    """The lock ``path`` (flock on that file, made if missing; else the lock file ``lock_file(path)``); ``wait``:
    until it is free, else raise ``LockBusy`` naming the holder and the kind of lock. ``use_flock=False`` goes
    straight to the lock file (its tests)."""
    path = Path(path)
    if use_flock:
        fd, made = _open(path)
        handle = os.fdopen(fd, "r+")
        try:
            return _flock(path, handle, wait, heartbeat_s)
        except LockBusy:
            handle.close()
            raise
        except OSError as e:
            handle.close()
            if e.errno not in NO_FLOCK:
                raise
            if made:
                path.unlink(missing_ok=True)
            print(f"{path}: flock fails here ({errno.errorcode.get(e.errno, e.errno)}: the file system has no "
                  f"locks): using a lock file with heartbeat instead, {lock_file(path)}", flush=True)
    return _lock_file(lock_file(path), wait, heartbeat_s, poll_s)


def claim_output_dir(out: Path) -> Lock:
    """The lock on a run's output folder, held for the run's life: a second run into the folder stops before
    writing anything (``LockBusy`` naming the holder and the kind of lock)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return acquire(out / OUTPUT_LOCK)
    except LockBusy as e:
        raise LockBusy(f"{out} is in use by another run ({e}); wait for it to end, stop it, or choose another "
                       "--output_dir") from None


def lock_file(path) -> Path:
    """The lock file with heartbeat that stands for the flock on ``path``: a file of its own, so that the file
    flock leaves behind (it names its last holder) is never taken for a held lock file."""
    return Path(path).with_name(Path(path).name + ".heartbeat")


def _open(path: Path) -> tuple[int, bool]:
    """A descriptor of ``path``, and whether this call made the file."""
    while True:
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            try:
                return os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed in between: make it


def _flock(path: Path, handle, wait: bool, heartbeat_s: float) -> Lock:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        if not wait:
            raise LockBusy(f"{holder}; {FLOCK}") from None
        print(f"{path}: waiting for {holder} to let go ({FLOCK})", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
    line = holder_line()
    handle.seek(0)
    handle.truncate()
    handle.write(line + "\n")
    handle.flush()
    return Lock(path, FLOCK, line, handle, heartbeat_s)


def _lock_file(path: Path, wait: bool, heartbeat_s: float, poll_s: float) -> Lock:
    stale_s, said = STALE_HEARTBEATS * heartbeat_s, False
    while True:
        line = holder_line()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            why = _why_held(path, stale_s)
            if not why:
                continue  # gone meanwhile, or stale and moved aside: try again
            if not wait:
                raise LockBusy(why) from None
            if not said:
                print(f"{path}: waiting for {why}", flush=True)
                said = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return Lock(path, LOCK_FILE, line, None, heartbeat_s)


def _why_held(path: Path, stale_s: float) -> str:
    """Why the existing lock file ``path`` is held ('' when it is gone, or was stale and has been moved aside)."""
    try:
        before = os.stat(path)
        holder = path.read_text().strip()
    except FileNotFoundError:
        return ""
    age = _fs_now(path) - before.st_mtime
    described = f"{holder or 'a holder still writing its name'}; {LOCK_FILE}; last heartbeat {age:.0f} s ago"
    if age < stale_s:
        return described
    found = _HOLDER.search(holder)
    if found and found[2] == socket.gethostname() and _alive(int(found[1]), found[3]):
        return (f"{described}, but the pid is alive on this host, so the lock is not taken over (stop that "
                "process, or remove the file if it is not a run of this trainer)")
    print(f"{path}: taking over a stale lock ({described}; its holder is gone)", flush=True)
    _move_aside(path, before)
    return ""  # judged again from the start: free, or someone's fresh lock


def _alive(pid: int, since: str) -> bool:
    """The pid runs, and is the process that took the lock (not a later one given the same number)."""
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
        zombie = proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
    try:
        took = time.mktime(time.strptime(since, _STAMP))
    except ValueError:
        return not zombie
    return not zombie and started <= took + 2


def _move_aside(path: Path, judged: os.stat_result):
    """Remove the stale lock file ``judged`` was read from: renamed aside (atomic), then checked to be that file.
    A contender that took the lock over in between made a new file: that one is linked back into place (unless a
    third contender has made yet another; a race of three within microseconds is not covered)."""
    aside = path.with_name(f"{path.name}.stale.{socket.gethostname()}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    moved = os.stat(aside)
    if (moved.st_ino, moved.st_mtime) != (judged.st_ino, judged.st_mtime):
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)


def _fs_now(path: Path) -> float:
    """The file system's time (what a heartbeat writes), read from a file made and removed beside ``path``."""
    probe = path.with_name(f"{path.name}.clock.{socket.gethostname()}.{os.getpid()}")
    try:
        probe.touch()
        now = os.stat(probe).st_mtime
        probe.unlink()
        return now
    except OSError:
        return time.time()
