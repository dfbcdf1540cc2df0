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
    from trainer.corpus import build_corpus
    out = tmp_path_factory.mktemp("corpus") / "demo"
    build_corpus(str(out), 60, seed=1234)  # data.corpus_seed's default: the trainer reuses it
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus):
    """Two short runs on two ranks with ep_size 2 through the real launcher: omni (ZeRO 1, fp32) and switch
    (ZeRO 2, bf16)."""
    from tests.common import launch, tiny_config
    base = tmp_path_factory.mktemp("trained")
    runs = {}
    for mode, stage, bf16 in (("omni", 1, False), ("switch", 2, True)):
        config = tiny_config(base, mode, run={"max_steps": 16}, zero_optimization={"stage": stage},
                             bf16={"enabled": bf16})
        proc = launch(config, corpus, base / mode, 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = base / mode
    return runs
