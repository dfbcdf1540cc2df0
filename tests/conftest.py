"""Test-wide settings: DeepSpeed on the CPU, one intra-op thread per process (ranks share 2 cores)."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small slice of the embedded corpus (60 training sentences), made once per test session."""
    from trainer.data.corpus import build_corpus
    out = tmp_path_factory.mktemp("corpus") / "demo"
    build_corpus(str(out), 60, seed=1234)  # data.corpus.seed's default: the trainer reuses it
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus):
    """Two short runs on two ranks with ep_size 2 through the real launcher: omni (ZeRO 1, fp32, dropless as
    shipped, two micro-batches per step) and switch (ZeRO 2, bf16, capacity mode), each evaluated and saved at
    steps 8 and 16. The omni run is given a GPU
    allocation torch cannot use, and trains on the CPU on purpose (``run.allow_cpu``). The switch run's ranks
    find no flock, as on Lustre or NFS without locking (``tools.harness.no_flock_env``): its corpus and output
    folder are locked with lock files, which are gone when it ends."""
    from tools.harness import launch, no_flock_env, tiny_config
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    for mode, stage, bf16 in (("omni", 1, False), ("switch", 2, True)):
        omni = mode == "omni"
        config = tiny_config(base, mode, run={"max_steps": 16, "eval_every": 8, "allow_cpu": omni},
                             zero_optimization={"stage": stage}, bf16={"enabled": bf16},
                             data={"max_frames_per_rank": 625 if omni else 0})
        proc = launch(config, corpus, base / mode, 2, [] if omni else ["--set", "moe.dropless=false"],
                      env={**os.environ, "SLURM_STEP_GPUS": "0"} if omni else no_flock_env(base))
        assert proc.returncode == 0, proc.stderr[-3000:]
        fallback = f"{base / mode / '.lock'}: flock fails here (ENOLCK" in proc.stdout
        assert fallback == (not omni) and not (base / mode / ".lock.heartbeat").exists(), proc.stdout[-2000:]
        assert ("2 micro-batch(es)" in proc.stdout) == omni, proc.stdout[-2000:]
        runs[mode] = base / mode
    return runs

