"""Faults and bad input, each a probe of tools/fault_drill.py run for real on two ranks (the drill's fast
cases; bad manifest rows and audio are tested in test_main, damaged checkpoints in test_robustness, a misspelt
section in test_config; SIGINT to the runner takes the SIGTERM probe's path). kill -9 of a rank, kills during a
save and a full disk are probes of the drill alone: ``python -m tools.fault_drill``."""
import pytest

from tools.fault_drill import PROBES, Drill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drill(tmp_path_factory, corpus):
    return Drill(tmp_path_factory.mktemp("drill"), corpus)


@pytest.mark.parametrize("probe", [
    "ep_size_vs_world", "resume_changed_config", "runner_SIGTERM", "launcher_sigterm_slow_save",
    "signal_during_slow_save", "output_dir_lock", "hung_rank_timeout", "hung_rank_sigterm_grace",
    "hung_rank_second_sigterm", "corrupted_same_size", "metrics_after_resume", "planted_payload"])
def test_fault_probe(drill, probe):
    row = PROBES[probe](drill)
    assert row.ok, f"{row.probe}: expected {row.expected}; observed {row.observed}"
