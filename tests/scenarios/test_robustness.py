"""Runs that survive: atomic checkpoints, damaged ones skipped, non-finite losses, evaluation (signals and
the other operator faults: test_faults)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist

from deepspeed.runtime.lr_schedules import WarmupDecayLR

from tests.support.builders import VOCAB, batch, ds_dict, tiny_plan, tiny_project
from tests.support.ranks import run_ranks
from tools.harness import ROOT, flip_byte, launch, tiny_config
from trainer.config import with_overrides
from trainer.engine import build_engine, build_model
from trainer.loop import Trainer, TrainingError
from trainer.telemetry import TrainMeter

pytestmark = pytest.mark.slow


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, corpus) -> dict:
    """A 24-step run on two ranks, evaluated every 8 steps on two dev sets, with TensorBoard, keeping the newest
    two checkpoints (and the best): its folder, config, launch arguments and output. Made once; tests that damage
    checkpoints damage a copy."""
    base = tmp_path_factory.mktemp("evaluated")
    out = base / "run"
    config = tiny_config(base, run={"eval_every": 8, "keep_last": 2},
                         tensorboard={"enabled": True, "output_path": str(out / "tb"), "job_name": "tiny"})
    extra = ["--dev_manifest", str(corpus / "dev.jsonl"), "--dev_manifest", str(corpus / "test.jsonl")]
    proc = launch(config, corpus, out, 2, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "config": config, "extra": extra, "stdout": proc.stdout}


def test_periodic_evaluation_scores_every_dev_set_and_the_routing(evaluated):
    evals = [r for r in metrics(evaluated["out"]) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    for r in evals:
        assert set(r["sets"]) == {"dev", "test"}
        assert r["mean_wer"] == (r["sets"]["dev"]["wer"] + r["sets"]["test"]["wer"]) / 2
        layers = r["routing"]["layers"]
        assert len(layers) == 2 and len(r["routing"]["adjacent_nmi"]) == 1
        assert all(abs(sum(layer["load"]) - 1) < 1e-6 and layer["dropped"] == 0 for layer in layers)  # no drop
        assert 0 <= r["routing"]["adjacent_nmi"][0] <= 1
    assert "adjacent-layer NMI" in evaluated["stdout"] and "MoE layer 1: load [" in evaluated["stdout"]


def test_telemetry_is_written_to_tensorboard_and_training_rows_count_drops_per_layer(evaluated):
    events = list((evaluated["out"] / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    train = [r for r in metrics(evaluated["out"]) if r["kind"] == "train"]
    assert all(len(r["dropped_per_layer"]) == 2 and 0 <= min(r["dropped_per_layer"]) for r in train)


def test_retention_keeps_the_newest_checkpoints_and_the_best_by_dev_wer(evaluated):
    out = evaluated["out"]
    evals = [r for r in metrics(out) if r["kind"] == "eval"]
    best = min(evals, key=lambda r: r["mean_wer"])["step"]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({"step16", "step24", f"step{best}"})  # the newest two, and the best by dev WER
    assert (out / "checkpoints" / "latest").read_text() == "step24"


def test_a_damaged_checkpoint_is_skipped_for_the_next_newest_and_none_usable_is_an_error(evaluated, corpus, tmp_path):
    out, config, extra = tmp_path / "run", evaluated["config"], evaluated["extra"]
    shutil.copytree(evaluated["out"], out, ignore=shutil.ignore_patterns(".lock"))
    # Damage the newest: the next newest is chosen instead, with a warning naming the file. It is evaluated
    # with the features computed on the device: the same scores as the run's evaluation of it in the loader.
    victim = next((out / "checkpoints" / "step24").glob("layer_1_expert_3_*"))
    victim.unlink()
    again = launch(config, corpus, out, 2, extra + ["--eval_only", "--set", "data.features_on=device"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {victim}: missing" in again.stdout
    assert f"resumed from {out / 'checkpoints' / 'step16'}" in again.stdout
    assert 'data.features_on: "loader" -> "device"' in again.stdout
    in_loader = [r for r in metrics(evaluated["out"]) if r["kind"] == "eval" and r["step"] == 16][0]["sets"]
    on_device = json.loads((out / "eval_step16.json").read_text())["sets"]
    for name in ("dev", "test"):
        assert on_device[name]["wer"] == in_loader[name]["wer"] and on_device[name]["cer"] == in_loader[name]["cer"]
        assert on_device[name]["loss"] == pytest.approx(in_loader[name]["loss"], rel=1e-4)
    for tag in (p for p in (out / "checkpoints").iterdir() if p.is_dir()):
        (tag / "complete.json").unlink(missing_ok=True)
    none = launch(config, corpus, out, 2, extra + ["--eval_only"])
    assert none.returncode == 1 and "no usable checkpoint" in none.stderr
    assert "incomplete (no complete.json" in none.stdout


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, corpus):
    # Finite samples whose power overflows float32: the features, and so the loss, become non-finite.
    wave = np.full(16000, 3e38, dtype="float32")
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    manifest = tmp_path / "nan.jsonl"
    manifest.write_text("".join(json.dumps({"audio_filepath": "nan.wav", "duration": 1.0, "text": f"word {i}"})
                                + "\n" for i in range(40)))
    config = tiny_config(tmp_path, run={"max_bad_steps": 3})
    proc = launch(config, corpus, tmp_path / "run", 2, ["--train_manifest", str(manifest), "--dev_manifest",
                                                       str(corpus / "dev.jsonl")])
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "non-finite loss on some rank, batch skipped on all (4 in a row" in proc.stdout
    assert "4 non-finite losses or gradients in a row" in proc.stderr and "last good state" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step0" / "complete.json").exists()


def test_changing_the_number_of_ranks_needs_reset_optimizer(tmp_path, corpus, trained):
    config = tiny_config(tmp_path, run={"max_steps": 16})  # the config of the trained omni run (2 ranks, ep 2)
    out = tmp_path / "run"
    shutil.copytree(trained["omni"], out, ignore=shutil.ignore_patterns(".lock"))
    # The run folder's tokenizer damaged too: restored from the newest checkpoint's copy, both files named.
    (out / "tokenizer.model").write_bytes(b"\0" * 100)
    refused = launch(config, corpus, out, 1, ["--max_steps", "20"])
    assert f"WARNING: {out / 'tokenizer.model'}: not a readable sentencepiece model" in refused.stdout
    assert f"restored from {out / 'checkpoints' / 'step16' / 'tokenizer.model'}" in refused.stdout
    assert refused.returncode == 2, refused.stderr[-3000:]  # a bad configuration, as the README's table says
    assert "written by 2 ranks with ep_size 2, this run has 1 with ep_size 1" in refused.stderr
    assert "--reset_optimizer" in refused.stderr and "Traceback" not in refused.stderr
    fresh = launch(config, corpus, out, 2, ["--max_steps", "20", "--resume", "never"])
    assert fresh.returncode == 2 and "--resume never" in fresh.stderr and "already holds checkpoints" in fresh.stderr
    moved = launch(config, corpus, out, 1, ["--max_steps", "20", "--reset_optimizer"])
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "at step 16 (optimizer reset)" in moved.stdout
    # The schedule carries on from step 16 of a 20-step schedule instead of warming up again.
    [row] = [r for r in metrics(out) if r["kind"] == "train" and r["step"] == 20]
    assert row["lr"] == pytest.approx(scheduled_lr(config, total=20, step=20), rel=1e-9)


def test_eval_only_evaluates_a_checkpoint_written_by_another_world_size(tmp_path, corpus, trained):
    """Evaluation needs no optimizer state: the weights of a 2-rank, ep_size 2 run on 1 rank score as they did."""
    config = tiny_config(tmp_path, run={"max_steps": 16, "allow_cpu": True}, zero_optimization={"stage": 1},
                         bf16={"enabled": False}, data={"max_frames_per_rank": 625})  # the trained omni run's
    out = tmp_path / "run"
    shutil.copytree(trained["omni"], out, ignore=shutil.ignore_patterns(".lock"))
    proc = launch(config, corpus, out, 1, ["--eval_only"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step16'} at step 16\n" in proc.stdout
    evaluated = json.loads((out / "eval_step16.json").read_text())
    final = json.loads((out / "results.json").read_text())["dev"]
    assert {k: v["wer"] for k, v in evaluated["sets"].items()} == {k: v["wer"] for k, v in final["sets"].items()}


def scheduled_lr(config: str, total: int, step: int) -> float:
    """The learning rate after ``step`` steps of an uninterrupted run, from DeepSpeed's own scheduler."""
    params = json.loads(open(config).read())["scheduler"]["params"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params["warmup_max_lr"])
    sched = WarmupDecayLR(opt, total_num_steps=total, **params)
    for _ in range(step):
        sched.step()
    return sched.get_lr()[0]


def test_a_rank_with_no_dev_batch_still_enters_every_collective(tmp_path, corpus):
    """Two ranks, a dev set of one batch: rank 1 holds only filler and must not skip the routing all-reduce."""
    dev = tmp_path / "one.jsonl"
    rows = (corpus / "dev.jsonl").read_text().splitlines()[:2]
    dev.write_text("".join(json.dumps({**json.loads(r), "audio_filepath": str(corpus / json.loads(r)[
        "audio_filepath"])}) + "\n" for r in rows))
    proc = launch(tiny_config(tmp_path, run={"max_steps": 4}), corpus, tmp_path / "run", 2,
                  ["--dev_manifest", str(dev)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dev one: loss" in proc.stdout and "(2 utterances)" in proc.stdout


def _poisoned_gradients(out_dir: str) -> dict:
    """Two ranks, ZeRO 1, ep_size 2: rank 1's router gradient is made infinite on chosen steps."""
    plan = tiny_plan(with_overrides(tiny_project("omni"), {"run.max_bad_steps": 2, "run.output_dir": out_dir}),
                     ds_dict(stage=1))
    engine = build_engine(plan, build_model(plan, VOCAB))
    trainer = Trainer(engine, plan, None, {}, None)
    router = engine.module.routers()[0].wg.weight
    poison = [False]
    if dist.get_rank() == 1:
        router.register_hook(lambda g: g * float("inf") if poison[0] else g)
    seen = []
    for i, bad in enumerate([False, True, False, True, True, True]):
        poison[0] = bad
        before = router.detach().clone()
        try:
            trainer.train_step(batch(10 * i + dist.get_rank()), TrainMeter(3), False, False)
        except TrainingError as e:
            seen.append(("stopped", str(e)))
            break
        seen.append((engine.global_steps, trainer.bad_in_a_row, bool(torch.equal(before, router.detach()))))
    return {"seen": seen, "router": router.detach().clone()}


def test_non_finite_gradient_with_finite_loss_is_skipped_on_all_ranks(tmp_path):
    results = run_ranks(_poisoned_gradients, 2, str(tmp_path / "run"))
    for r in results:  # (global step, bad steps in a row, router unchanged by this step)
        assert r["seen"][:5] == [(1, 0, False), (2, 1, True), (3, 0, False), (4, 1, True), (5, 2, True)]
        assert r["seen"][5][0] == "stopped" and "3 non-finite losses or gradients in a row" in r["seen"][5][1]
    assert torch.equal(results[0]["router"], results[1]["router"])
    assert (tmp_path / "run" / "checkpoints" / "step6" / "complete.json").exists()


def _resume_after_damage_with_a_late_rank_0(out_dir: str) -> dict:
    """Two ranks, ep_size 2: checkpoints tagged step1 and step2; a byte of step2's file that only rank 1 loads (its
    ZeRO shard) changed; the run's collective timeout 1 s, the checkpoint timeout 60 s; rank 0 comes to the
    resume 4 s late, as when it hashes a share of a large checkpoint while rank 1 waits."""
    import time
    from pathlib import Path
    from trainer import checkpoint
    from trainer.runtime import distributed
    plan = tiny_plan(with_overrides(tiny_project("omni"), {"run.output_dir": out_dir}), ds_dict(stage=1))
    engine = build_engine(plan, build_model(plan, VOCAB))
    trainer = Trainer(engine, plan, None, {}, None)
    for step in (1, 2):
        engine.global_steps = step  # the tag; what is written is DeepSpeed's and the trainer's as in a run
        trainer.save()
    victim = Path(out_dir, "checkpoints", "step2", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    if dist.get_rank() == 1:
        flip_byte(victim)
    distributed.barrier()
    quick = with_overrides(plan.project, {"run.checkpoint_timeout_s": 60.0})
    resumer = checkpoint.Checkpointer(engine, tiny_plan(quick, ds_dict(stage=1)))
    distributed.apply_timeout(1.0)
    if dist.get_rank() == 0:
        time.sleep(4)
    record = resumer.resume(reset_optimizer=False)
    return {"step": record.step, "verified": resumer.newest_verified(2, 2, plan.project.moe.num_experts),
            "victim": str(victim)}


def test_each_rank_verifies_the_files_it_loads_under_the_checkpoint_timeout(tmp_path):
    from trainer import checkpoint
    results = run_ranks(_resume_after_damage_with_a_late_rank_0, 2, str(tmp_path / "run"))
    step2 = tmp_path / "run" / "checkpoints" / "step2"
    _, files = checkpoint.recorded_files(step2.parent, "step2")
    owner = checkpoint.share(files, 2, checkpoint.rank_readers(2, 2, 4))
    assert owner["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1  # rank 0 never reads it
    assert {owner[f"layer_0_expert_{e}_mp_rank_00_model_states.pt"] for e in (0, 1)} == {0}
    assert {owner[f"layer_0_expert_{e}_mp_rank_00_model_states.pt"] for e in (2, 3)} == {1}
    for r in results:
        assert r["step"] == 1
        assert r["verified"] == ("step1", [f"{r['victim']}: content differs from the SHA-256 recorded when it was "
                                           "written (corrupted)"])


REPEATED_SIGTERM = """
import os, signal, time
from trainer.runtime.stopping import REPEAT_S, StopSignal
stop = StopSignal(grace_s=60)
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # at once, as SLURM sends it at a time limit or a preemption without grace
deadline = time.time() + 10
while not stop.received and time.time() < deadline:
    time.sleep(0.01)
print("received", stop.received, flush=True)
time.sleep(2 * REPEAT_S)
os.kill(os.getpid(), signal.SIGUSR1)  # a second request: the watcher ends the process
time.sleep(30)
print("still running", flush=True)
"""


def test_the_same_signal_twice_at_once_is_one_stop_request_and_a_later_one_is_a_second():
    proc = subprocess.run([sys.executable, "-c", REPEATED_SIGTERM], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout == "received SIGTERM\n", proc.stdout + proc.stderr
    assert proc.returncode == 1 and "second signal (SIGUSR1)" in proc.stderr, proc.stderr
