"""slurm/train.sh and slurm/eval.sh through a real SLURM cluster (two slurmd "nodes" on this machine)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import Cluster
from tools.harness import ROOT, tiny_config

NODES_2x1 = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=15"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.up()
    except PermissionError as e:
        pytest.skip(str(e))
    yield c
    c.down()


def sbatch(cluster, script, flags, env, args=(), wait=True):
    """sbatch [--wait] from the repository root, the way a user submits; returns the Popen."""
    job_env = {**cluster.env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    cmd = ["sbatch", *(["--wait"] if wait else []), *flags, script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_id(proc) -> str:
    line = proc.stdout.readline()  # "Submitted batch job N", printed at submission
    assert line.startswith("Submitted batch job"), line
    return line.split()[-1]


def wait_for(what: str, ready, timeout: float, proc=None):
    """Poll ``ready()`` until it is true; fail after ``timeout`` s, or as soon as ``proc`` (sbatch --wait) ends."""
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        assert proc is None or proc.poll() is None, f"{what}: the job ended first"
        time.sleep(0.2)


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# Stands in for trainer/main.py under slurm/train.sh (PYTHON=the wrapper below): says where this rank runs, what
# it was given and which GPU the trainer would take; with PROBE_WAIT it waits for SIGTERM or SIGUSR1 and exits 75,
# as a rank does after its save.
PROBE = """import os, signal, sys, time
e = os.environ
said = {k: e.get(k, "-") for k in ("RANK", "LOCAL_RANK", "LOCAL_SIZE", "WORLD_SIZE", "SLURMD_NODENAME",
                                   "CUDA_VISIBLE_DEVICES", "SLURM_CPUS_PER_TASK", "MASTER_ADDR", "NCCL_SOCKET_IFNAME",
                                   "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SLURM_RESTART_COUNT")}
if not e.get("PROBE_WAIT"):  # the trainer's rule (trainer.runtime.placement imports no torch)
    sys.path.insert(0, os.getcwd())
    from trainer.runtime.placement import device_index
    said["device"] = device_index(int(e["LOCAL_RANK"]), e.get("CUDA_VISIBLE_DEVICES", ""))
got = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, _: got.append(signal.Signals(n).name))
print("probe " + " ".join(f"{k}={v}" for k, v in said.items()), flush=True)
while e.get("PROBE_WAIT") and not got:
    time.sleep(0.05)
if got:
    time.sleep(0.5)  # a second signal, if any, arrives within this
    print(f"probe rank {e['RANK']} got {'+'.join(got)}: exits 75", flush=True)
    sys.exit(75)
"""


def probe(tmp_path) -> str:
    """An executable that train.sh runs as its PYTHON: the probe above, whatever the arguments."""
    (tmp_path / "probe.py").write_text(PROBE)
    wrapper = tmp_path / "probe.sh"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'probe.py'}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def ranks(log: str) -> dict:
    """{rank: what the probe said} from a job log."""
    said = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in log.splitlines()
            if line.startswith("probe R")]
    return {int(r["RANK"]): r for r in said}


def test_train_sh_across_two_nodes_then_eval_sh_and_a_failing_job(cluster, corpus, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, run={"max_steps": 8, "allow_cpu": True})
    proc = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/train-%j.out"],
                  {"CONFIG": config, "OUTPUT_DIR": str(out)}, ["--corpus_dir", str(corpus)])
    job = job_id(proc)
    assert proc.wait(timeout=400) == 0
    log = (tmp_path / f"train-{job}.out").read_text()
    assert cluster.job_states()[job] == "COMPLETED", log[-3000:]
    assert "on node[1-2]: 2 nodes, 2 ranks, master 127.0.0.1" in log
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=2" in log  # a timed-out NCCL collective raises in the rank
    assert "2 rank(s), ep_size 2" in log
    ckpt = out / "checkpoints" / "step8"
    assert (ckpt / "complete.json").exists()
    assert (ckpt / "layer_1_expert_3_mp_rank_00_model_states.pt").exists()  # written by the rank on node2

    ev = sbatch(cluster, "slurm/eval.sh", ["--nodes=1", "--ntasks=1", "--gpus-per-node=1", "--cpus-per-task=1",
                                            f"--output={tmp_path}/eval-%j.out"],
                {"RUN_DIR": str(out), "TESTS": f"dev={corpus / 'dev.jsonl'}", "DEVICE": "cpu"})
    ev_job = job_id(ev)
    assert ev.wait(timeout=300) == 0, (tmp_path / f"eval-{ev_job}.out").read_text()[-3000:]
    table = (out / "results" / "wer.md").read_text()
    assert table.startswith("| model | dev WER | dev CER | average WER | average CER |") and "| run |" in table

    failing = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/fail-%j.out"],
                     {"CONFIG": str(tmp_path / "missing.json"), "OUTPUT_DIR": str(tmp_path / "x")})
    fail_job = job_id(failing)
    assert failing.wait(timeout=300) == 2
    assert cluster.job_states()[fail_job] == "FAILED"
    assert "no such config file" in (tmp_path / f"fail-{fail_job}.out").read_text()


def test_preempted_then_signalled_job_saves_requeues_itself_and_resumes(cluster, corpus, tmp_path):
    """Preemption with a grace time (SIGTERM to the ranks), then a signal to the batch script alone (forwarded to
    the ranks): each time the ranks save, the script requeues the job, and it resumes from the saved step."""
    out = tmp_path / "run"
    config = tiny_config(tmp_path, run={"max_steps": 60, "log_every": 2, "allow_cpu": True})
    proc = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/train-%j.out"],
                  {"CONFIG": config, "OUTPUT_DIR": str(out)}, ["--corpus_dir", str(corpus)])
    job = job_id(proc)
    log_path = tmp_path / f"train-{job}.out"
    wait_for("step 4 of attempt 1", lambda: "step 4/60" in text(log_path), 300, proc)
    # A job of the "urgent" partition needs a whole node: SLURM preempts this one (SIGTERM to its ranks; 60 s grace).
    urgent = cluster.run("sbatch", "--parsable", "--partition=urgent", "--exclusive", "--nodes=1",
                         f"--output={tmp_path}/urgent-%j.out", "--wrap", "true").stdout.strip()
    wait_for("attempt 2 resumed", lambda: "resumed from" in text(log_path), 300, proc)
    wait_for("a step of attempt 2", lambda: "/60 ep" in text(log_path).partition("resumed from")[2], 300, proc)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@300 would send
    assert proc.wait(timeout=400) == 0
    log = log_path.read_text()
    assert cluster.job_states()[job] == "COMPLETED", log[-3000:]
    assert cluster.job_states()[urgent] == "COMPLETED"
    first, second = (int(s) for s in re.findall(r"saving at step (\d+)", log))
    assert 4 <= first < second < 60
    assert log.index("stop requested (SIGTERM)") < log.index(f"resumed from {out / 'checkpoints' / f'step{first}'} "
                                                              f"at step {first}")
    assert log.index("this script got SIGUSR1: forwarding it to the ranks") < log.index("stop requested (SIGUSR1)")
    assert f"resumed from {out / 'checkpoints' / f'step{second}'} at step {second}" in log
    assert log.count(f"checkpoint saved on signal: requeueing job {job}") == 2 and "attempt 3 on" in log
    assert json.loads((out / "results.json").read_text())["dev"]["step"] == 60


def test_train_sh_places_ranks_binds_gpus_passes_the_environment_and_leaves_requeues_to_slurm(cluster, tmp_path):
    """train.sh with a probe for the trainer: ranks in blocks per node; the GPU index for both visibilities (all
    of the node's GPUs per task, one per task); the script's environment reaches the ranks even under
    sbatch --export=<list>. (The CPUs per task are passed to srun, but only a task plugin that binds CPUs, which
    this cluster lacks, would show them.) Then a node failure, which SLURM requeues itself, and a scancel, which
    the script does not undo."""
    flags = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=15"]
    env = {"PYTHON": probe(tmp_path), "NCCL_SOCKET_IFNAME": "lo"}
    all_gpus = sbatch(cluster, "slurm/train.sh", flags + ["--export=PYTHON,PATH,NCCL_SOCKET_IFNAME,"
                                                          "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                                                          f"--output={tmp_path}/all-%j.out"], env)
    one_gpu = sbatch(cluster, "slurm/train.sh", flags + ["--gpus-per-task=1", f"--output={tmp_path}/one-%j.out"], env)
    all_job, one_job = job_id(all_gpus), job_id(one_gpu)
    assert all_gpus.wait(timeout=120) == 0 and one_gpu.wait(timeout=120) == 0
    seen = ranks((tmp_path / f"all-{all_job}.out").read_text())
    assert [seen[r]["SLURMD_NODENAME"] for r in range(4)] == ["node1", "node1", "node2", "node2"]
    for r, said in seen.items():
        assert (said["LOCAL_RANK"], said["LOCAL_SIZE"], said["WORLD_SIZE"]) == (str(r % 2), "2", "4")
        assert said["CUDA_VISIBLE_DEVICES"] == "0,1" and said["device"] == str(r % 2)
        assert said["SLURM_CPUS_PER_TASK"] == "1" and said["MASTER_ADDR"] == "127.0.0.1"
        assert said["NCCL_SOCKET_IFNAME"] == "lo" and said["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # the site's
    seen = ranks((tmp_path / f"one-{one_job}.out").read_text())
    assert sorted(said["CUDA_VISIBLE_DEVICES"] for said in seen.values()) == ["0", "0", "1", "1"]
    assert all(said["device"] == "0" and said["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2" for said in seen.values())

    waiting = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/wait-%j.out"],
                     {**env, "PROBE_WAIT": "1"})
    job = job_id(waiting)
    log_path = tmp_path / f"wait-{job}.out"
    wait_for("attempt 1", lambda: text(log_path).count("probe RANK") == 2, 60, waiting)
    cluster.run("scontrol", "update", "nodename=node2", "state=down", "reason=drill")
    try:
        wait_for("the requeue on node failure", lambda: cluster.job_field(job, "Restarts") == "1", 60, waiting)
    finally:
        cluster.run("scontrol", "update", "nodename=node2", "state=resume", check=False)
    wait_for("attempt 2", lambda: text(log_path).count("probe RANK") == 4, 60, waiting)
    cluster.run("scancel", job)
    waiting.wait(timeout=60)  # returns once the job is CANCELLED, while the script may still be writing its log
    wait_for("the script's last word", lambda: "not requeueing" in text(log_path), 30)
    log = log_path.read_text()
    assert cluster.job_histories()[job] == ["NODE_FAIL", "CANCELLED"], log[-3000:]
    assert "SLURM_RESTART_COUNT=1" in log and "attempt 3" not in log and "requeueing job" not in log
    assert "this script got SIGTERM while SLURM ends job" in log  # no forward: the ranks got it from SLURM
    assert f"checkpoint saved on signal, but SLURM is ending job {job} (state COMPLETING): not requeueing" in log


def test_compare_sh_runs_one_array_task_per_mode_and_seed(cluster, corpus, tmp_path):
    from tools.compare_routing import main as compare
    runs = tmp_path / "cmp"
    assert compare(["plan", "--config", tiny_config(tmp_path, run={"max_steps": 4, "allow_cpu": True}), "--seeds", "1",
                    "--out", str(runs)]) == 0
    one_task = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=15"]
    proc = sbatch(cluster, "slurm/compare.sh", one_task + ["--array=0-2", f"--output={tmp_path}/cmp-%A_%a.out"], {},
                  [str(runs), "--corpus_dir", str(corpus)])
    job = job_id(proc)
    assert proc.wait(timeout=600) == 0, "".join(p.read_text()[-2000:] for p in tmp_path.glob("cmp-*.out"))
    for mode in ("dense", "switch", "omni"):
        assert (runs / "runs" / f"{mode}-seed1" / "results.json").exists()
    logs = sorted(tmp_path.glob(f"cmp-{job}_*.out"))
    assert len(logs) == 3 and all("1 ranks" in p.read_text() for p in logs)
    again = sbatch(cluster, "slurm/compare.sh", one_task + ["--array=1", f"--output={tmp_path}/again-%A_%a.out"], {},
                   [str(runs)])
    again_job = job_id(again)
    assert again.wait(timeout=300) == 0
    assert "is finished" in (tmp_path / f"again-{again_job}_1.out").read_text()
    assert compare(["report", "--out", str(runs), "--test", f"test={corpus / 'test.jsonl'}"]) == 0
    report = (runs / "report.md").read_text()
    assert "| omni vs dense |" in report and "| omni vs switch |" in report
    # the same utterance of the first manifest set (test here) routed under switch and under omni
    assert "![switch](routing-switch/utterance.png) ![omni](routing-omni/utterance.png)" in report
    maps = [json.loads((runs / f"routing-{m}" / "routing.json").read_text())["utterance"] for m in ("switch", "omni")]
    assert maps[0]["audio"] == maps[1]["audio"] and all((runs / f"routing-{m}" / "utterance.png").exists()
                                                        for m in ("switch", "omni"))
    # the routing's structure per mode, and the paired statistics against both other modes
    assert re.search(r"^\| omni \| [\d. ]+ \| [\d. ]+ \| [\d.]+ \| [\d. ]+ \|$", report, re.M), report
    assert re.search(r"^\| switch \| test \| [+-]\d+\.\d\d \| ", report, re.M), report
