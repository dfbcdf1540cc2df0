"""The training loop: epochs over batches over steps, with evaluations, checkpoints and agreed stops.

It owns no policy of its own beyond the loop: the checkpointer decides what is saved and kept and how a run
resumes (``checkpoint.Checkpointer``), the logger writes every row (``telemetry.RunLogger``), the objective
normalises the loss (``objective``), and evaluation scores the dev sets (``evaluation``).
"""
import json
import time
from itertools import chain
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from trainer.checkpoint import Checkpointer, Record
from trainer.data.batches import (SamplerState, SpeechDataset, describe, epoch_batches, length_batches, loader,
                                  padding_fraction, with_last)
from trainer.engine import step_loss
from trainer.evaluation import evaluate_dev_sets
from trainer.model.ctc import moe_blocks
from trainer.plan import RunPlan
from trainer.runtime import distributed
from trainer.runtime.distributed import log0
from trainer.runtime.exits import REQUEUE, RunError
from trainer.runtime.stopping import StopSignal
from trainer.telemetry import RunLogger, TrainMeter



class TrainingError(RunError, RuntimeError):
    """The run cannot go on (for example, too many non-finite losses in a row); a checkpoint was saved."""


@dataclass
class StepResult:
    """What one micro-batch did, as every rank agrees."""
    boundary: bool  # the last micro-batch of an optimizer step
    skipped: bool  # not trained on (a non-finite loss on some rank)
    stopping: bool  # a stop was requested on some rank
    last: bool  # the last micro-batch of the epoch (some rank has no further batch)


class Trainer:
    """The training loop around one DeepSpeed engine."""

    def __init__(self, engine, plan: RunPlan, train_set: SpeechDataset, dev_sets: dict, tokenizer):
        self.engine, self.plan, self.project = engine, plan, plan.project
        self.train_set, self.dev_sets, self.tokenizer = train_set, dev_sets, tokenizer
        self.checkpointer = Checkpointer(engine, plan)
        self.logger = RunLogger(plan.output_dir, engine.monitor, plan.project.run.max_steps)
        self.moe_layers = len(moe_blocks(plan.project.model, plan.project.moe))
        self.state = SamplerState()
        self.bad_in_a_row = self.skipped_steps = 0
        self.history = []
        self.finished = False  # resumed from the final checkpoint of a finished run
        self.phase = "start-up"  # what the loop is doing, for the message of a failed collective
        self.stop = None  # the StopSignal of fit(); its watcher hears of progress through beat()

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self, finished: bool = False) -> str:
        """A checkpoint of this step (a stop signal waits for it to finish); its tag."""
        self.phase = f"saving checkpoint step{self.engine.global_steps}"
        with self.stop.save() if self.stop else nullcontext():
            return self.checkpointer.save(Record(
                project_config=self.project.model_dump(), step=self.engine.global_steps, epoch=self.state.epoch,
                position=self.state.position, world_size=self.plan.world, ep_size=self.plan.ep_size,
                finished=finished))

    def resume(self, reset_optimizer: bool = False, weights_only: bool = False) -> bool:
        """Continue from the newest usable checkpoint, if any (see ``Checkpointer.resume``); the metrics written
        after it are dropped, as they are computed again."""
        record = self.checkpointer.resume(reset_optimizer, weights_only)
        if record is not None:
            self.state = SamplerState(record.epoch, record.position)
            self.finished = record.finished and record.step >= self.project.run.max_steps
            self.logger.metrics.resume_at(record.step)
        return record is not None

    # -- training ----------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to run.max_steps; 0 when done, REQUEUE when stopped by a signal (after saving)."""
        if self.finished:
            log0(f"the run finished at step {self.engine.global_steps} (run.max_steps); nothing to do")
            return 0
        utts = self.train_set.utts
        if utts:  # a sharded set is read lazily: its batches are not known in advance
            all_batches = length_batches(utts, self.plan.batch.micro_frames)
            log0(f"{self.plan.batch.describe()}; {len(all_batches)} micro-batches per epoch, padding "
                 f"{100 * padding_fraction(utts, all_batches):.1f}% of frames")
        self.stop = stop = StopSignal(self.project.run.stop_grace_s)
        started, first_step = time.time(), self.engine.global_steps
        self.meter = TrainMeter(self.moe_layers)  # sums between two log lines, across epoch boundaries
        while self.engine.global_steps < self.project.run.max_steps:
            if self.train_epoch(stop, started, first_step) == REQUEUE:
                return REQUEUE
        result = self.evaluate_and_save(finished=True)
        if self.plan.rank == 0:
            results = {"train": self.history, "dev": result}
            (self.plan.output_dir / "results.json").write_text(json.dumps(results, indent=1))
        return 0

    def train_epoch(self, stop: StopSignal, started: float, first_step: int):
        """The rest of this epoch (from the data position); REQUEUE after a stop is agreed and saved. The epoch
        ends where the ranks agree that one has no further batch (the data position moves to the next epoch
        before that step's checkpoint), or at once when a rank resumes with none left."""
        engine, run = self.engine, self.project.run
        rank, world = self.plan.rank, self.plan.world
        batches = epoch_batches(self.train_set, self.plan.batch.micro_frames, run.seed, self.state.epoch, rank,
                                world, start=self.state.position)
        self.train_set.epoch, skipped = self.state.epoch, 0
        engine.train()
        stream = with_last(loader(self.train_set, batches, self.project.data.num_workers))
        first = next(stream, None)
        if distributed.sum_over_ranks({"empty": torch.tensor([float(first is None)])})["empty"][0] > 0:
            if self.state.position == 0:
                raise TrainingError(f"{world} ranks and {self.plan.batch.micro_frames} frames per micro-batch leave "
                                    f"no training batch for every rank in epoch {self.state.epoch} "
                                    f"({describe(self.train_set.utts, self.train_set.shards)})")
            # All ranks took `position` batches and one has no more: a checkpoint saved at the epoch's end.
            self.state.epoch, self.state.position = self.state.epoch + 1, 0
            return 0
        for batch, last in chain([first], stream):
            self.state.position += 1
            skipped += batch["skipped"]
            self.phase = f"training step {engine.global_steps + 1}"
            ready = self.train_set.on_device(batch, self.plan.device)  # features on the device (data.features_on)
            result = self.train_step(ready, self.meter, bool(stop.received), last)
            if result.last:
                report_skipped(skipped, self.state.epoch)
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
            stop.beat()
            step = engine.global_steps
            if result.stopping and (result.boundary or result.skipped):
                stop.acknowledge()
                log0(f"stop requested ({stop.received or 'by another rank'}): saving at step {step}")
                self.save()
                return REQUEUE
            if result.boundary and not result.skipped:
                if step % run.log_every == 0 or step == run.max_steps:
                    self.log_train(self.meter, step, first_step, started)
                    self.meter = TrainMeter(self.moe_layers)
                if step >= run.max_steps:
                    return 0
                if run.eval_every and step % run.eval_every == 0:
                    self.evaluate_and_save()
                    engine.train()
                elif run.save_every and step % run.save_every == 0:
                    self.save()
            if result.last:
                return 0
        raise TrainingError(f"rank {rank}: the batches of epoch {self.state.epoch} ended without the ranks "
                            "agreeing on the last one")

    def train_step(self, batch: dict, meter: TrainMeter, stop_requested: bool, last: bool) -> StepResult:
        """One micro-batch, agreed by all ranks.

        A non-finite loss on any rank skips the batch on every rank before backward. A non-finite gradient
        with a finite loss is caught by DeepSpeed's ZeRO optimizer, which skips the step on every rank (the
        global norm is reduced over expert and non-expert groups alike); it is counted here the same way.
        ``batch`` as ``SpeechDataset.on_device`` readies it. Host syncs: the step's outcome (``step_totals``),
        the capacity's frame count or the split sizes (``trainer.runtime.host_syncs``), and DeepSpeed's in ``step``."""
        engine = self.engine
        loss, out, totals = step_loss(engine, self.plan, batch, stop_requested, last)
        boundary = engine.is_gradient_accumulation_boundary()  # DeepSpeed advances it in step()
        if totals.bad_loss:
            self.count_bad_step("loss")
            return StepResult(boundary, True, totals.stop, totals.last)
        engine.backward(loss.total)
        engine.step()
        if boundary and not engine.was_step_applied():
            self.count_bad_step("gradient")
        else:
            self.bad_in_a_row = 0
            meter.add(int(batch["lengths"].sum()), loss, out.routing)
        return StepResult(boundary, False, totals.stop, totals.last)

    def count_bad_step(self, what: str):
        """A skipped batch or step; more than run.max_bad_steps in a row stop the run with a checkpoint."""
        self.bad_in_a_row += 1
        self.skipped_steps += 1
        log0(f"step {self.engine.global_steps}: non-finite {what} on some rank, "
             f"{'batch' if what == 'loss' else 'update'} skipped on all "
             f"({self.bad_in_a_row} in a row, {self.skipped_steps} in all)")
        if self.bad_in_a_row > self.project.run.max_bad_steps:
            tag = self.save()
            raise TrainingError(f"{self.bad_in_a_row} non-finite losses or gradients in a row (run.max_bad_steps="
                                f"{self.project.run.max_bad_steps}); the last good state is "
                                f"{self.checkpointer.dir / tag}")

    def log_train(self, meter: TrainMeter, step: int, first_step: int, started: float):
        """One training row from the meter's sums over all ranks (every rank enters)."""
        m = meter.reduce()  # a collective: every rank logs at the same step
        fps = m.pop("input_frames") / max(m.pop("elapsed"), 1e-9)  # input frames (10 ms), all ranks
        eta = (time.time() - started) / max(step - first_step, 1) * (self.project.run.max_steps - step)
        norm = self.engine.get_global_grad_norm()  # of the last step, before clipping
        row = {"kind": "train", "step": step, "epoch": self.state.epoch, **m, "lr": self.engine.get_lr()[0],
               "grad_norm": None if norm is None else float(norm), "frames_per_s": fps,
               "skipped_steps": self.skipped_steps}
        self.history.append(row)
        self.logger.train(row, eta)

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Every dev set, logged (loss, WER, routing telemetry)."""
        data = self.project.data
        self.phase = f"evaluation at step {self.engine.global_steps}"
        result = evaluate_dev_sets(self.engine, self.dev_sets, self.tokenizer, self.plan.batch.micro_frames,
                                   data.num_workers, self.moe_layers, self.project.moe.num_experts,
                                   progress=self.stop.beat if self.stop else None)
        self.logger.evaluation(result)
        return result

    def evaluate_and_save(self, finished: bool = False) -> dict:
        """Evaluate, note the dev WER for the best checkpoint, save; the result."""
        result = self.evaluate()
        self.checkpointer.note_evaluation(result["mean_wer"])
        self.save(finished)
        return result


def report_skipped(skipped: int, epoch: int):
    """All ranks' count of utterances whose audio failed to decode in this epoch (a collective call)."""
    total = int(distributed.sum_over_ranks({"skipped": torch.tensor([float(skipped)])})["skipped"][0])
    if total:
        log0(f"epoch {epoch}: skipped {total} utterances whose audio could not be read")
