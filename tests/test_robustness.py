"""Runs that survive: atomic checkpoints, damaged ones skipped, non-finite losses, evaluation (signals and
the other operator faults: test_faults)."""
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.distributed as dist

from deepspeed.runtime.lr_schedules import WarmupDecayLR

from tests.common import VOCAB, batch, ds_dict, tiny_project
from tests.distributed import run_ranks
from tests.common import launch, tiny_config
from trainer.config import with_overrides
from trainer.engine import build_engine, build_model
from trainer.loop import Trainer, TrainingError
from trainer.telemetry import TrainMeter

pytestmark = pytest.mark.slow


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_periodic_evaluation_telemetry_retention_and_damaged_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, run={"eval_every": 8, "keep_last": 2},
                         tensorboard={"enabled": True, "output_path": str(out / "tb"), "job_name": "tiny"})
    extra = ["--dev_manifest", str(corpus / "dev.jsonl"), "--dev_manifest", str(corpus / "test.jsonl")]
    proc = launch(config, corpus, out, 2, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metrics(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    for r in evals:
        assert set(r["sets"]) == {"dev", "test"}
        assert r["mean_wer"] == (r["sets"]["dev"]["wer"] + r["sets"]["test"]["wer"]) / 2
        layers = r["routing"]["layers"]
        assert len(layers) == 2 and len(r["routing"]["adjacent_nmi"]) == 1
        assert all(abs(sum(layer["load"]) - 1) < 1e-6 and layer["dropped"] == 0 for layer in layers)  # no drop
        assert 0 <= r["routing"]["adjacent_nmi"][0] <= 1
    assert "adjacent-layer NMI" in proc.stdout and "MoE layer 1: load [" in proc.stdout
    events = list((out / "tb").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    train = [r for r in metrics(out) if r["kind"] == "train"]
    assert all(len(r["dropped_per_layer"]) == 2 and 0 <= min(r["dropped_per_layer"]) for r in train)
    best = min(evals, key=lambda r: r["mean_wer"])["step"]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == sorted({"step16", "step24", f"step{best}"})  # the newest two, and the best by dev WER
    assert (out / "checkpoints" / "latest").read_text() == "step24"

    # Damage the newest: the next newest is chosen instead, with a warning naming the file.
    victim = next((out / "checkpoints" / "step24").glob("layer_1_expert_3_*"))
    victim.unlink()
    again = launch(config, corpus, out, 2, extra + ["--eval_only"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {victim}: missing" in again.stdout
    assert f"resumed from {out / 'checkpoints' / 'step16'}" in again.stdout
    (out / "checkpoints" / "step24" / "complete.json").unlink(missing_ok=True)
    for tag in kept:
        (out / "checkpoints" / tag / "complete.json").unlink(missing_ok=True)
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
    refused = launch(config, corpus, out, 1, ["--max_steps", "20"])
    assert refused.returncode == 1
    assert "written by 2 ranks with ep_size 2, this run has 1 with ep_size 1" in refused.stderr
    assert "--reset_optimizer" in refused.stderr
    fresh = launch(config, corpus, out, 2, ["--max_steps", "20", "--resume", "never"])
    assert fresh.returncode == 1 and "--resume never" in fresh.stderr and "already holds checkpoints" in fresh.stderr
    moved = launch(config, corpus, out, 1, ["--max_steps", "20", "--reset_optimizer"])
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "at step 16 (optimizer reset)" in moved.stdout
    # The schedule carries on from step 16 of a 20-step schedule instead of warming up again.
    [row] = [r for r in metrics(out) if r["kind"] == "train" and r["step"] == 20]
    assert row["lr"] == pytest.approx(scheduled_lr(config, total=20, step=20), rel=1e-9)


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
    project = with_overrides(tiny_project("omni"), run={"max_bad_steps": 2, "output_dir": out_dir})
    engine = build_engine(ds_dict(stage=1), project, build_model(project, VOCAB))
    trainer = Trainer(engine, project, None, {}, None, out_dir)
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
