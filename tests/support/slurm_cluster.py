"""A real, throw-away SLURM cluster on this machine: munge, slurmctld and one slurmd per emulated node.

Debian's slurmd is built with MULTIPLE_SLURMD, so several daemons (``-N node1``, ``-N node2``) run on one host,
each on its own port. Nothing goes through systemd or /etc: clients find the cluster through SLURM_CONF, and
every daemon started here is stopped by the PID it wrote. Each node has two fake GPUs (/dev/null clones) so
that GPU sbatch flags are accepted and set CUDA_VISIBLE_DEVICES; the code under test runs on the CPU. Jobs of
the "urgent" partition preempt those of the default one ("debug"), as on a site with preemption.

    python -m tests.support.slurm_cluster up|down      # by hand, for debugging
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ["node1", "node2"]
MUNGE_PID = Path("/run/munge/munged.pid")
GPUS = 2  # fake GPUs per node
GRACE_S = 60  # preemption grace time of the debug partition


class Cluster:
    def __init__(self, root: Path, cpus: int = 2, port: int = 6917):
        self.root, self.cpus, self.port = Path(root), cpus, port
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.own_munged = None

    # -- start -------------------------------------------------------------------------------------------
    def up(self, timeout: float = 60.0):
        install()
        self.own_munged = start_munged()
        self.write_config()
        self.run("slurmctld", "-f", str(self.conf))
        for node in NODES:
            self.run("slurmd", "-f", str(self.conf), "-N", node)
        deadline = time.time() + timeout
        while self.idle_nodes() != len(NODES):
            if time.time() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted((self.root / "log").glob("*.log")))
                self.down()
                raise RuntimeError(f"SLURM nodes not idle after {timeout:.0f} s:\n{logs}")
            time.sleep(0.25)

    def write_config(self):
        for sub in ("etc", "run", "state", "log", "dev", *(f"spool/{n}" for n in NODES)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(GPUS):
            gpu = self.root / "dev" / f"nvidia{i}"
            if not gpu.exists():
                os.mknod(gpu, 0o666 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
        host, r = socket.gethostname().split(".")[0], self.root
        lines = [
            "ClusterName=omnitest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={self.port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            "AuthInfo=cred_expire=5",  # a requeued job may start again after 6 s (default 120)
            "MpiDefault=none", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MailProg=/bin/true", "ReturnToService=2",
            "EnforcePartLimits=ALL", "MinJobAge=5", "KillWait=5", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt", "SlurmdParameters=config_overrides", "GresTypes=gpu",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
        ]
        for i, node in enumerate(NODES, 1):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.port + i} "
                         f"CPUs={self.cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
                         f"RealMemory=8000 Gres=gpu:{GPUS} State=UNKNOWN")
        # Preemption as many sites set it up: a job of the "urgent" partition takes the nodes of a "debug" job,
        # which gets SIGTERM at once and GRACE_S seconds before SLURM requeues it.
        lines += ["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
                  f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP "
                  f"PriorityTier=1 GraceTime={GRACE_S}",
                  f"PartitionName=urgent Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2 "
                  "PreemptMode=OFF"]
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "etc" / "gres.conf").write_text(f"Name=gpu File={self.root}/dev/nvidia[0-{GPUS - 1}]\n")

    # -- use ---------------------------------------------------------------------------------------------
    def run(self, *cmd, check=True, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def idle_nodes(self) -> int:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        return len({line.split()[0] for line in out if line.endswith(" idle")})

    def job_states(self) -> dict:
        """{job id: final state} from the job completion log (finished jobs leave squeue after MinJobAge)."""
        return {job: states[-1] for job, states in self.job_histories().items()}

    def job_histories(self) -> dict:
        """{job id: [state of each attempt that ended, oldest first]}, e.g. ["NODE_FAIL", "CANCELLED"]."""
        states = {}
        path = self.root / "log" / "jobcomp.txt"
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            states.setdefault(fields["JobId"], []).append(fields["JobState"])
        return states

    def job_field(self, job: str, name: str) -> str:
        """A field of ``scontrol show job`` ('' once the job has left slurmctld)."""
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return next((f.split("=", 1)[1] for f in out.split() if f.startswith(name + "=")), "")

    # -- stop --------------------------------------------------------------------------------------------
    def down(self):
        jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)
            deadline = time.time() + 30
            while self.run("squeue", "-h", "-o", "%A", check=False).stdout.split() and time.time() < deadline:
                time.sleep(0.25)
        for pid_file in sorted((self.root / "run").glob("slurmd-*.pid")) + [self.root / "run" / "slurmctld.pid"]:
            stop(pid_file, "slurmd" if "slurmd" in pid_file.name else "slurmctld")
        if self.own_munged:
            stop(MUNGE_PID, "munged")


def install():
    """The Debian packages, when a daemon or client is missing (needs root)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise PermissionError("SLURM is not installed and this is not root: apt-get install " + " ".join(PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env)


def munge_answers() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def start_munged() -> bool:
    """Reuse a munged that answers; else start one as the munge user. True when started here."""
    if munge_answers():
        return False
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    deadline = time.time() + 10
    while not munge_answers():
        if time.time() > deadline:
            raise RuntimeError("munged did not answer within 10 s (see /var/log/munge/munged.log)")
        time.sleep(0.1)
    return True


def stop(pid_file: Path, comm: str, grace: float = 10.0):
    """TERM the process whose PID the file holds, if it is still ``comm``; KILL it after ``grace`` seconds."""
    try:
        pid = int(pid_file.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() != comm:
            return
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.time() + grace
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    cluster = Cluster(Path("/tmp/omni-router-slurm"))
    if sys.argv[1:] == ["up"]:
        cluster.up()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.own_munged = True
        cluster.down()
