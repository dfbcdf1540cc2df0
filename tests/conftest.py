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
    build_corpus(str(out), 60, seed=1)
    return out
