"""DeepSpeed glue: the engine, the training loop, evaluation and checkpoints."""
import copy
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from trainer import checkpoint, distributed, objective
from trainer.config import ProjectConfig, batch_plan, resolve_ep_size
from trainer.data import SamplerState, SpeechDataset, length_batches, loader, padding_fraction, shard, train_batches
from trainer.decode import greedy_labels, word_error_rate
from trainer.distributed import log0
from trainer.model import CTCModel, ModelOutput, moe_blocks
from trainer.telemetry import MetricsFile, RoutingMeter, TrainMeter

REQUEUE = 75  # exit status after a signal-requested stop and save: "temporary failure, run me again"


class TrainingError(RuntimeError):
    """The run cannot go on (for example, too many non-finite losses in a row); a checkpoint was saved."""


def ds_config_for(ds_config: dict, project: ProjectConfig) -> dict:
    """DeepSpeed's dict with what derives from the project section filled in: the scheduler's length, and the
    batch keys from ``data.batch_frames`` (one "sample" is one micro-batch; accumulation keeps the global batch
    fixed whatever the number of ranks)."""
    cfg = copy.deepcopy(ds_config)
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and cfg["scheduler"].get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sched.setdefault("total_num_steps", project.run.max_steps)
    plan = batch_plan(project.data, distributed.world())
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=plan.accumulation,
               train_batch_size=plan.world * plan.accumulation)
    return cfg


def build_model(project: ProjectConfig, vocab_size: int) -> CTCModel:
    """The model with ep_size resolved against the world: the same weights on every rank and for every ep_size
    (experts are initialised from their global id). Afterwards each rank draws its own random stream (dropout)."""
    seed, world = project.run.seed, distributed.world()
    ep_size = resolve_ep_size(project.moe, world)
    torch.manual_seed(seed)
    model = CTCModel(project.model, project.moe, vocab_size, ep_size, distributed.rank() % ep_size, seed)
    torch.manual_seed(seed + 1000003 * (distributed.rank() + 1))  # CPU and accelerator streams, per rank
    return model


def build_engine(ds_config: dict, project: ProjectConfig, model: CTCModel):
    """deepspeed.initialize creates the expert-parallel groups and splits expert from dense parameters."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config_for(ds_config, project))
    return engine


def forward(engine, batch: dict) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
    """(model output, [B] weighted CTC sums, real encoder frames) of one batch on the engine's device."""
    dev = engine.device
    out = engine(batch["feats"].to(dev), batch["lengths"].to(dev))
    weight = batch["weight"].to(dev)
    ctc = objective.ctc_sums(out, batch["targets"].to(dev), batch["target_lengths"].to(dev), weight)
    return out, ctc, objective.real_frames(out, weight)


def step_loss(engine, project: ProjectConfig, batch: dict, stop_requested: bool = False):
    """Forward one micro-batch and normalise its loss over all ranks: (Loss, output, StepTotals). One
    all-reduce (frame and routing counts, non-finite and stop flags), entered by every rank."""
    out, ctc, frames = forward(engine, batch)
    ctc_sum = ctc.sum()
    totals = objective.step_totals(out, frames, bool(torch.isfinite(ctc_sum)), stop_requested)
    return objective.loss(ctc_sum, out, totals, project.moe, distributed.world()), out, totals


class StopSignal:
    """SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) set a flag; the ranks agree
    on it at the next step, so all of them stop at the same step boundary."""

    def __init__(self):
        self.received = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name


class Trainer:
    """The training loop around one DeepSpeed engine: steps, logs, evaluations, checkpoints, stops."""

    def __init__(self, engine, project: ProjectConfig, train_set: SpeechDataset, dev_sets: dict, tokenizer,
                 out_dir: str):
        self.engine, self.project, self.train_set, self.dev_sets = engine, project, train_set, dev_sets
        self.tokenizer, self.out_dir = tokenizer, Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics = MetricsFile(self.out_dir / "metrics.jsonl", distributed.rank() == 0)
        self.state = SamplerState()
        self.best = {"wer": math.inf, "tag": ""}
        self.bad_in_a_row = self.skipped_steps = 0
        self.history = []
        self.moe_layers = len(moe_blocks(project.model, project.moe))

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> str:
        world = distributed.world()
        client = {"project_config": self.project.model_dump(), "step": self.engine.global_steps,
                  "sampler": {"epoch": self.state.epoch, "position": self.state.position}, "best": self.best,
                  "world_size": world, "ep_size": resolve_ep_size(self.project.moe, world)}
        keep = {self.best["tag"]} if self.best["tag"] else set()
        extra = [f for f in (self.out_dir / checkpoint.TOKENIZER, self.out_dir / checkpoint.CMVN) if f.exists()]
        tag = checkpoint.save(self.engine, self.ckpt_dir, client, self.project.run.keep_last, keep, extra)
        log0(f"saved checkpoint {self.ckpt_dir / tag}")
        return tag

    def resume(self, reset_optimizer: bool = False) -> bool:
        """Continue from the newest usable checkpoint, if any: weights, optimizer, scheduler, step, random
        states and data position. A different world size needs ``reset_optimizer`` (weights only); the
        learning-rate schedule then continues from the checkpoint's step."""
        newest, warnings, written = distributed.broadcast_from_rank0(  # one rank reads the disk; all decide alike
            self._newest_with_layout() if distributed.rank() == 0 else None)
        for w in warnings:
            log0(f"WARNING: skipping a damaged checkpoint: {w}")
        if not newest:
            return False
        was = (written["world_size"], written["ep_size"])
        now = (distributed.world(), resolve_ep_size(self.project.moe, distributed.world()))
        if not written["optimizer_state"]:  # re-sharded by tools/consolidate_checkpoint.py: weights only
            reset_optimizer = True
        elif was != now and not reset_optimizer:
            raise TrainingError(f"{self.ckpt_dir / newest} was written by {was[0]} ranks with ep_size {was[1]}, "
                                f"this run has {now[0]} with ep_size {now[1]}: the optimizer state cannot be "
                                "re-partitioned; pass --reset_optimizer to continue from the weights (experts are "
                                "stored by global id) with a fresh optimizer")
        tag, client = checkpoint.load(self.engine, self.ckpt_dir, newest, load_optimizer=not reset_optimizer)
        self.state = SamplerState(**client["sampler"])
        self.best = client.get("best", self.best)
        log0(f"resumed from {self.ckpt_dir / tag} at step {self.engine.global_steps}"
             + (" (optimizer reset)" if reset_optimizer else ""))
        return True

    def _newest_with_layout(self) -> tuple[str, list, dict]:
        tag, warnings = checkpoint.newest_usable(self.ckpt_dir)
        return tag, warnings, checkpoint.layout(self.ckpt_dir, tag) if tag else {}

    # -- training ----------------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to run.max_steps; 0 when done, REQUEUE when stopped by a signal (after saving)."""
        engine, run = self.engine, self.project.run
        rank, world = distributed.rank(), distributed.world()
        plan = batch_plan(self.project.data, world)
        stop = StopSignal()
        all_batches = length_batches(self.train_set.utts, plan.micro_frames)
        log0(f"{plan.describe()}; {len(all_batches)} micro-batches per epoch, padding "
             f"{100 * padding_fraction(self.train_set.utts, all_batches):.1f}% of frames")
        meter, started, first_step = TrainMeter(self.moe_layers), time.time(), engine.global_steps
        while engine.global_steps < run.max_steps:
            batches = train_batches(self.train_set.utts, plan.micro_frames, run.seed, self.state.epoch, rank, world)
            if not batches:
                raise TrainingError(f"{world} ranks and {plan.micro_frames} frames per micro-batch leave no "
                                    f"training batch for every rank ({len(self.train_set)} utterances)")
            self.train_set.epoch, skipped = self.state.epoch, 0
            engine.train()
            for batch in loader(self.train_set, batches[self.state.position:], self.project.data.num_workers):
                self.state.position += 1
                skipped += batch["skipped"]
                result = self.train_step(batch, meter, bool(stop.received))
                step = engine.global_steps
                if result.stopping and (result.boundary or result.skipped):
                    log0(f"stop requested ({stop.received or 'by another rank'}): saving at step {step}")
                    self.save()
                    return REQUEUE
                if not result.boundary or result.skipped:
                    continue
                if step % run.log_every == 0 or step == run.max_steps:
                    self.log_train(meter, step, first_step, started)
                    meter = TrainMeter(self.moe_layers)
                if step >= run.max_steps:
                    break
                if run.eval_every and step % run.eval_every == 0:
                    self.evaluate_and_save()
                    engine.train()
                elif run.save_every and step % run.save_every == 0:
                    self.save()
            report_skipped(skipped, self.state.epoch)
            if self.state.position == len(batches):
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
        result = self.evaluate_and_save()
        if rank == 0:
            (self.out_dir / "results.json").write_text(json.dumps({"train": self.history, "dev": result}, indent=1))
        return 0

    def train_step(self, batch: dict, meter: TrainMeter, stop_requested: bool) -> "StepResult":
        """One micro-batch, agreed by all ranks.

        A non-finite loss on any rank skips the batch on every rank before backward. A non-finite gradient
        with a finite loss is caught by DeepSpeed's ZeRO optimizer, which skips the step on every rank (the
        global norm is reduced over expert and non-expert groups alike); it is counted here the same way."""
        engine = self.engine
        loss, out, totals = step_loss(engine, self.project, batch, stop_requested)
        boundary = engine.is_gradient_accumulation_boundary()  # DeepSpeed advances it in step()
        if totals.bad_loss:
            self.count_bad_step("loss")
            return StepResult(boundary, True, totals.stop)
        engine.backward(loss.total)
        engine.step()
        if boundary and not engine.was_step_applied():
            self.count_bad_step("gradient")
        else:
            self.bad_in_a_row = 0
            meter.add(int(batch["lengths"].sum()), loss, out.routing)
        return StepResult(boundary, False, totals.stop)

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
                                f"{self.project.run.max_bad_steps}); the last good state is {self.ckpt_dir / tag}")

    def log_train(self, meter: TrainMeter, step: int, first_step: int, started: float):
        m = meter.reduce()  # a collective: every rank logs at the same step
        fps = m.pop("input_frames") / max(m.pop("elapsed"), 1e-9)  # input frames (10 ms), all ranks
        eta = (time.time() - started) / max(step - first_step, 1) * (self.project.run.max_steps - step)
        norm = self.engine.get_global_grad_norm()  # of the last step, before clipping
        row = {"kind": "train", "step": step, "epoch": self.state.epoch, **m, "lr": self.engine.get_lr()[0],
               "grad_norm": None if norm is None else float(norm), "frames_per_s": fps,
               "skipped_steps": self.skipped_steps}
        drops = " ".join(f"{100 * x:.1f}" for x in m["dropped_per_layer"])
        log0(f"step {step}/{self.project.run.max_steps} ep {self.state.epoch} loss {m['loss']:.4f} "
             f"ctc {m['ctc']:.4f} lb {m['lb']:.3f} z {m['z']:.3f} lr {row['lr']:.2e} |g| {row['grad_norm'] or 0:.2f} "
             f"{fps:,.0f} frames/s "
             + (f"dropped% [{drops}] " if drops else "") + f"ETA {eta / 60:.1f} min")
        self.history.append(row)
        self.metrics.write(row)
        self.monitor(step, {f"train/{k}": v for k, v in row.items()
                            if k not in ("kind", "step", "dropped_per_layer") and v is not None})

    def monitor(self, step: int, values: dict):
        """DeepSpeed's monitor (TensorBoard, CSV, W&B as its config section enables) on rank 0."""
        if self.engine.monitor.enabled and distributed.rank() == 0:
            self.engine.monitor.write_events([(k, float(v), step) for k, v in values.items()])

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate_and_save(self) -> dict:
        result = self.evaluate()
        if result["mean_wer"] < self.best["wer"]:
            self.best = {"wer": result["mean_wer"], "tag": f"step{self.engine.global_steps}"}
        self.save()
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and greedy-CTC WER per dev set and their unweighted mean, with routing telemetry."""
        data = self.project.data
        routing = RoutingMeter(self.moe_layers, self.project.moe.num_experts)
        micro = batch_plan(data, distributed.world()).micro_frames
        sets = {name: evaluate(self.engine, ds, self.tokenizer, micro, data.num_workers, routing)
                for name, ds in self.dev_sets.items()}
        routing.all_reduce()
        result = {"kind": "eval", "step": self.engine.global_steps, "sets": sets,
                  "mean_wer": sum(r["wer"] for r in sets.values()) / len(sets),
                  "mean_loss": sum(r["loss"] for r in sets.values()) / len(sets), "routing": routing.summary()}
        for name, r in sets.items():
            log0(f"dev {name}: loss {r['loss']:.4f}  WER {r['wer']:.2f}%  ({r['utterances']} utterances)")
        log0(f"dev mean WER {result['mean_wer']:.2f}% over {len(sets)} set(s) at step {result['step']}")
        for i, layer in enumerate(result["routing"]["layers"]):
            load = " ".join(f"{x:.2f}" for x in layer["load"])
            log0(f"  MoE layer {i}: load [{load}] entropy {layer['entropy']:.3f} dropped "
                 f"{100 * layer['dropped']:.1f}% capacity used {100 * layer['capacity_used']:.0f}%")
        if result["routing"]["adjacent_nmi"]:
            log0("  adjacent-layer NMI of expert choices: "
                 + " ".join(f"{x:.3f}" for x in result["routing"]["adjacent_nmi"]))
        self.metrics.write(result)
        values = {f"dev/{name}/{k}": r[k] for name, r in sets.items() for k in ("loss", "wer")}
        values.update({"dev/mean_wer": result["mean_wer"]}, **{
            f"routing/layer{i}/{k}": layer[k] for i, layer in enumerate(result["routing"]["layers"])
            for k in ("entropy", "dropped", "capacity_used")})
        values.update({f"routing/nmi_{i}_{i + 1}": x for i, x in enumerate(result["routing"]["adjacent_nmi"])})
        self.monitor(result["step"], values)
        return result


@dataclass
class StepResult:
    """What one micro-batch did, as every rank agrees."""
    boundary: bool  # the last micro-batch of an optimizer step
    skipped: bool  # not trained on (a non-finite loss on some rank)
    stopping: bool  # a stop was requested on some rank


def report_skipped(skipped: int, epoch: int):
    """All ranks' count of utterances whose audio failed to decode in this epoch (a collective call)."""
    total = int(distributed.sum_over_ranks({"skipped": torch.tensor([float(skipped)])})["skipped"][0])
    if total:
        log0(f"epoch {epoch}: skipped {total} utterances whose audio could not be read")


@torch.no_grad()
def evaluate(engine, dataset: SpeechDataset, tokenizer, max_frames: int, workers: int = 0,
             routing: RoutingMeter = None) -> dict:
    """Dev loss (CTC per encoder frame) and greedy-CTC WER over one set; ranks step in lockstep through the
    same number of batches (filler batches are computed for the all-to-all, then discarded). Nothing is dropped
    at evaluation, so the result does not depend on batch-mates, batch size or world size."""
    rank, world = distributed.rank(), distributed.world()
    engine.eval()
    mine = shard(length_batches(dataset.utts, max_frames), rank, world, fill=True)
    rows, ctc_total, frames_total = [], 0.0, 0.0
    for (ids, filler), batch in zip(mine, loader(dataset, [ids for ids, _ in mine], workers)):
        out, ctc, frames = forward(engine, batch)
        if filler or not batch["weight"].any():
            continue
        if routing is not None:
            routing.add(out.routing)
        ctc_total += float(ctc.sum())
        frames_total += float(frames)
        hyps = [tokenizer.decode(h) for h in greedy_labels(out.log_probs, out.lengths)]
        rows += [(dataset.utts[i].text, h) for i, h in zip(batch["index"].tolist(), hyps)]
    gathered = distributed.gather_objects((rows, ctc_total, frames_total))
    rows = [r for part, _, _ in gathered for r in part]
    if not rows:
        raise TrainingError("no dev utterance could be decoded")
    refs, hyps = zip(*rows)
    return {"loss": sum(c for _, c, _ in gathered) / max(sum(f for _, _, f in gathered), 1.0),
            "wer": word_error_rate(list(refs), list(hyps)), "utterances": len(rows),
            "examples": [{"ref": r, "hyp": h} for r, h in rows[:5]]}
