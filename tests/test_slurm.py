"""slurm/train.sh and slurm/eval.sh through a real SLURM cluster (two slurmd "nodes" on this machine)."""
import json
import subprocess
import sys
import time

import pytest

from tests.common import ROOT, tiny_config
from tests.slurm_cluster import Cluster

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


def test_train_sh_across_two_nodes_then_eval_sh_and_a_failing_job(cluster, corpus, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, run={"max_steps": 8})
    proc = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/train-%j.out"],
                  {"CONFIG": config, "OUTPUT_DIR": str(out)}, ["--corpus_dir", str(corpus)])
    job = job_id(proc)
    assert proc.wait(timeout=400) == 0
    log = (tmp_path / f"train-{job}.out").read_text()
    assert cluster.job_states()[job] == "COMPLETED", log[-3000:]
    assert "on node[1-2]: 2 nodes, 2 ranks, master 127.0.0.1" in log
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


def test_signalled_job_saves_requeues_itself_and_resumes(cluster, corpus, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, run={"max_steps": 60, "log_every": 2})
    proc = sbatch(cluster, "slurm/train.sh", NODES_2x1 + [f"--output={tmp_path}/train-%j.out"],
                  {"CONFIG": config, "OUTPUT_DIR": str(out)}, ["--corpus_dir", str(corpus)])
    job = job_id(proc)
    log_path, deadline = tmp_path / f"train-{job}.out", time.time() + 300
    while "step 4/60" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, "training did not reach step 4"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@300 sends before the time limit
    assert proc.wait(timeout=400) == 0
    log = log_path.read_text()
    assert cluster.job_states()[job] == "COMPLETED", log[-3000:]
    assert "stop requested (SIGUSR1)" in log and f"requeueing job {job}" in log and "attempt 2 on" in log
    saved = int(log.split("saving at step ")[1].split()[0])
    assert 4 <= saved < 60
    assert f"resumed from {out / 'checkpoints' / f'step{saved}'} at step {saved}" in log
    assert json.loads((out / "results.json").read_text())["dev"]["step"] == 60


def test_compare_sh_runs_one_array_task_per_mode_and_seed(cluster, corpus, tmp_path):
    from tools.compare_routing import main as compare
    runs = tmp_path / "cmp"
    assert compare(["plan", "--config", tiny_config(tmp_path, run={"max_steps": 4}), "--seeds", "1", "--out",
                    str(runs)]) == 0
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
