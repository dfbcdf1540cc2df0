"""The one place for collectives (trainer.runtime.distributed)."""
from pathlib import Path


def test_no_module_but_distributed_calls_torch_distributed():
    """One place for collectives (one device rule, every rank enters every one): trainer/runtime/distributed.py."""
    callers = [p.as_posix() for p in Path("trainer").rglob("*.py")
               if "torch.distributed" in p.read_text() and p.as_posix() != "trainer/runtime/distributed.py"]
    assert callers == []
