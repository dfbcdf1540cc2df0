"""Faults and bad input, each a probe of tools/fault_drill.py run for real on two ranks (the drill's fast
cases; bad manifest rows and audio are tested in test_main, damaged checkpoints in test_robustness, a misspelt
section in unit/test_config; SIGINT to the runner takes the SIGTERM probe's path). kill -9 of a rank, kills during a
save and a full disk are probes of the drill alone: ``python -m tools.fault_drill``.

Each test runs one probe and states what it must observe: exit codes, what the output says, which checkpoint
is in use or resumed, files left. The drill's own verdict (``ok``, its table) must agree."""
import pytest

from tools.fault_drill import PROBES, Drill
from trainer.checkpoint import step_of as step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drill(tmp_path_factory, corpus):
    return Drill(tmp_path_factory.mktemp("drill"), corpus)


def observe(drill, probe: str) -> dict:
    """Run the probe; what it saw (a failed assertion shows it, whole outputs left out)."""
    row = PROBES[probe](drill)
    print(f"{probe}: {row.observed}")
    seen = row.seen
    seen["drill verdict"] = row.ok  # the table's, from the same observations
    return seen


# -- bad configuration ----------------------------------------------------------------------------------------
def test_ep_size_larger_than_the_world_exits_2_with_the_values_that_work_and_writes_nothing(drill):
    seen = observe(drill, "ep_size_vs_world")  # --set moe.ep_size=4 on 2 ranks
    assert seen["exit"] == 2
    assert "use one of 1, 2" in seen["stderr"] and "Traceback" not in seen["stderr"]
    assert not seen["written"]  # no output folder
    assert seen["drill verdict"]


def test_a_resume_that_changes_the_model_is_refused_naming_the_keys_and_run_keys_are_accepted(drill):
    seen = observe(drill, "resume_changed_config")  # resumes of the reference run: d_model 32, top_k 1
    # --set model.d_model=48 --set moe.top_k=2: refused, every changed key named, the way out suggested
    assert seen["model keys: exit"] == 2
    assert "model.d_model: 32 -> 48; moe.top_k: 1 -> 2" in seen["model keys: output"]
    assert "--reset_optimizer" in seen["model keys: output"]
    # --set model.d_model=48 --reset_optimizer: the weights do not fit the new shapes
    assert seen["shapes, --reset_optimizer: exit"] == 2
    assert "do not fit the changed model" in seen["shapes, --reset_optimizer: output"]
    # --set moe.top_k=2 --reset_optimizer --max_steps 10 --set run.log_every=1: loaded, both changes printed
    assert seen["fitting, --reset_optimizer: exit"] == 0
    said = seen["fitting, --reset_optimizer: output"]
    assert "moe.top_k: 1 -> 2" in said and "run.log_every: 2 -> 1" in said
    assert "(model-defining; weights loaded where they fit)" in said
    assert seen["drill verdict"]


# -- operator faults --------------------------------------------------------------------------------------------
def test_sigterm_to_the_runner_alone_stops_every_rank_with_a_complete_checkpoint(drill):
    seen = observe(drill, "runner_SIGTERM")  # at step 4 of 400, to the deepspeed runner, not its ranks
    assert seen["processes left"] == 0  # launcher and ranks all gone within 120 s
    assert "launcher that started this rank is gone" in seen["log"]
    assert step(seen["latest"]) >= 4 and seen["latest problem"] == ""  # saved, verified
    assert seen["drill verdict"]


def test_sigterm_to_the_launcher_during_a_slow_save_keeps_the_previous_checkpoint(drill):
    seen = observe(drill, "launcher_sigterm_slow_save")  # every save after step 4 takes 120 s to publish
    assert seen["launcher exit"] == 1  # it SIGKILLs its ranks 30 s after the SIGTERM
    assert seen["latest"] == "step4"
    assert seen["later saves"]  # the save the stop began, left without its record
    assert "incomplete (no complete.json" in seen["later save problem"]
    assert seen["drill verdict"]


def test_a_signal_to_one_rank_during_a_save_longer_than_the_grace_stops_all_after_it_with_exit_75(drill):
    seen = observe(drill, "signal_during_slow_save")  # SIGUSR1 to rank 1; the step-4 save takes 5 s, grace 2 s
    assert seen["exit"] == 75
    assert "stop requested (by another rank)" in seen["log"]  # rank 0 learns of it
    assert step(seen["latest"]) > 4 and seen["latest problem"] == ""  # the stop's own save, complete
    assert seen["drill verdict"]


def test_a_second_run_into_a_folder_in_use_exits_2_and_kill_9_of_the_holder_leaves_no_stale_lock(drill):
    seen = observe(drill, "output_dir_lock")
    assert seen["second exit"] == 2 and "is in use by another run (pid" in seen["second stderr"]
    assert seen["lock free after kill -9"]
    assert seen["drill verdict"]


def test_a_hung_rank_makes_the_others_collective_time_out_naming_the_step(drill):
    seen = observe(drill, "hung_rank_timeout")  # rank 1 SIGSTOPped after step 4; collective timeout 3 s
    assert seen["collective failure within 120 s"] and "a collective failed" in seen["failure line"]
    assert seen["exit"] != 0
    assert "error: rank 0, training step" in seen["log"]
    assert seen["drill verdict"]


def test_a_rank_blocked_by_a_hung_peer_ends_on_sigterm_after_the_grace(drill):
    seen = observe(drill, "hung_rank_sigterm_grace")  # rank 1 stopped, SIGTERM to rank 0, grace 3 s
    assert seen["signalled rank ended within 60 s"]
    assert "no step boundary within 3 s" in seen["log"]
    assert seen["drill verdict"]


def test_a_rank_blocked_by_a_hung_peer_ends_on_a_second_sigterm(drill):
    seen = observe(drill, "hung_rank_second_sigterm")  # grace 600 s: the second SIGTERM, 0.5 s later, ends it
    assert seen["signalled rank ended within 60 s"]
    assert "second signal" in seen["log"]
    assert seen["drill verdict"]


# -- integrity and trust ----------------------------------------------------------------------------------------
def test_a_checkpoint_file_changed_at_the_same_size_is_named_and_the_previous_checkpoint_used(drill):
    seen = observe(drill, "corrupted_same_size")  # a byte of step 8's rank-1 ZeRO shard flipped; --eval_only
    assert seen["exit"] == 0
    assert f"{seen['damaged file']}: content differs from the SHA-256" in seen["stdout"]
    assert seen["resumed"] == "step4 at step 4"
    assert seen["drill verdict"]


def test_metrics_are_written_once_per_kind_and_step_after_a_rerun_and_a_resume(drill):
    seen = observe(drill, "metrics_after_resume")  # a finished run rerun, then resumed from step 4
    assert seen["rerun exit"] == 0 and "nothing to do" in seen["rerun stdout"]
    assert seen["resume exit"] == 0 and seen["resumed"] == "step4 at step 4"
    assert seen["rows"] == [("train", 2), ("train", 4), ("train", 6), ("train", 8), ("eval", 8)]
    assert seen["drill verdict"]


def test_a_planted_pickle_payload_is_refused_by_consolidation_and_resume_and_never_runs(drill):
    seen = observe(drill, "planted_payload")  # os.system in step 8's model states, size and SHA-256 re-recorded
    refusal = f"{seen['planted file']}: refused: it holds posix.system"
    assert seen["consolidate exit"] == 2 and refusal in seen["consolidate stderr"]
    assert seen["resume exit"] == 0 and refusal in seen["resume stdout"]
    assert seen["resumed"] == "step4 at step 4"
    assert not seen["payload ran"]
    assert seen["drill verdict"]
