"""Locks where the file system has no flock (Lustre, NFS without locking): a lock file with a heartbeat.

The holder is a real process whose ``fcntl.flock`` fails as such a file system makes it fail (ENOLCK; we cannot
mount one here); the contender is this process, on the same file system, going straight to the lock file
(``use_flock=False``: on such a mount its flock would fail the same way)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tools.harness import ROOT, no_flock_env
from trainer.runtime import locks

pytestmark = pytest.mark.slow  # a holder process (a plain Python one, under a second)

HOLDER = """import sys
from trainer.runtime import locks
lock = locks.acquire(sys.argv[1], heartbeat_s=float(sys.argv[2]))
print("held", lock.kind, flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def start_holder(path, heartbeat_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(heartbeat_s)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=no_flock_env(path.parent, ranks_only=False))
    said = [proc.stdout.readline() for _ in range(2)]
    assert said[1].startswith("held"), said
    assert "flock fails here (ENOLCK" in said[0] and "using a lock file with heartbeat" in said[0]
    assert said[1].strip() == f"held {locks.LOCK_FILE}"
    return proc


def age(path, seconds: float):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_without_flock_a_lock_file_with_heartbeat_keeps_a_live_run_out_and_goes_on_a_clean_exit(tmp_path):
    holder = start_holder(tmp_path / ".lock", 0.2)
    path = locks.lock_file(tmp_path / ".lock")
    assert path.name == ".lock.heartbeat" and not (tmp_path / ".lock").exists()
    try:
        assert path.read_text() == f"pid {holder.pid} on {socket.gethostname()} since " \
            f"{path.read_text().split(' since ')[1]}"
        age(path, 30)
        time.sleep(0.6)
        assert time.time() - path.stat().st_mtime < 10  # the heartbeat refreshed it
        with pytest.raises(locks.LockBusy, match=rf"pid {holder.pid} on .*; {locks.LOCK_FILE}; last heartbeat"):
            locks.acquire(tmp_path / ".lock", use_flock=False)
        # An old heartbeat does not matter while the pid lives on this host.
        with pytest.raises(locks.LockBusy, match="the pid is alive on this host, so the lock is not taken over"):
            age(path, 1000)
            locks.acquire(tmp_path / ".lock", heartbeat_s=0.01, use_flock=False)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "released\n" and holder.wait(10) == 0
        assert not path.exists()  # removed by its holder on the way out
    finally:
        holder.kill()
    with locks.acquire(tmp_path / ".lock", use_flock=False) as mine:
        assert path.read_text().startswith(f"pid {os.getpid()} ") and mine.kind == locks.LOCK_FILE
    assert not path.exists()


def test_a_stale_lock_file_is_taken_over_only_once_its_heartbeat_is_old_and_its_holder_gone(tmp_path, capsys):
    holder = start_holder(tmp_path / ".lock", 60)
    path = locks.lock_file(tmp_path / ".lock")
    holder.send_signal(signal.SIGKILL)  # a crash: the file stays
    holder.wait()
    with pytest.raises(locks.LockBusy, match=rf"pid {holder.pid} .*last heartbeat \d s ago"):
        locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False)  # dead, but its heartbeat is recent: not yet
    age(path, 11)
    with locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False):
        assert path.read_text().startswith(f"pid {os.getpid()} ")
    assert f"taking over a stale lock (pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().out
    # Another host's holder: no pid to check there; the heartbeat decides.
    path.write_text("pid 1 on some-other-node since 2026-01-01 00:00:00\n")
    with pytest.raises(locks.LockBusy, match="pid 1 on some-other-node"):
        locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False)
    age(path, 11)
    with locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False):
        assert path.read_text().startswith(f"pid {os.getpid()} ")


def test_a_holder_that_exited_unreaped_is_gone_and_its_stale_lock_taken_over(tmp_path, capsys):
    """A zombie (a child its parent has not reaped, as under a container whose PID 1 does not reap) still has
    its pid, but holds nothing."""
    holder = start_holder(tmp_path / ".lock", 60)
    path = locks.lock_file(tmp_path / ".lock")
    holder.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # it has exited; left unreaped: a zombie
    try:
        age(path, 11)
        with locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False):
            assert path.read_text().startswith(f"pid {os.getpid()} ")
        assert f"taking over a stale lock (pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().out
    finally:
        holder.wait()


def test_a_lock_naming_a_pid_now_used_by_a_later_process_is_stale_and_taken_over(tmp_path, capsys):
    """The pid of a holder that is gone, given to a process started after the lock was taken (this one), is
    not the holder; with a recent start time the same pid keeps its lock."""
    path = locks.lock_file(tmp_path / ".lock")
    mine = f"pid {os.getpid()} on {socket.gethostname()}"
    path.write_text(f"{mine} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    age(path, 11)
    with pytest.raises(locks.LockBusy, match="the pid is alive on this host"):
        locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False)
    path.write_text(f"{mine} since 2026-01-01 00:00:00\n")  # before this process started
    age(path, 11)
    with locks.acquire(tmp_path / ".lock", heartbeat_s=1, use_flock=False):
        assert path.read_text() != f"{mine} since 2026-01-01 00:00:00\n"
    assert f"taking over a stale lock ({mine} since 2026-01-01 00:00:00" in capsys.readouterr().out
