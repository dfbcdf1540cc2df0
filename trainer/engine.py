"""DeepSpeed glue: process groups, the engine, the training loop, evaluation and checkpoints."""
import copy
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.config import ProjectConfig, resolve_ep_size
from trainer.data import SamplerState, SpeechDataset, length_batches, loader, padding_fraction, shard, train_batches
from trainer.decode import greedy_labels, word_error_rate
from trainer.model import CTCModel, ctc_loss
from trainer.telemetry import MetricsFile, RoutingMeter


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes (deepspeed, torchrun or srun env); return (rank, world)."""
    # The shared-memory op serves only inference all-reduce; skipping it saves a minute of g++ per fresh node.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


REQUEUE = 75  # exit status after a signal-requested stop and save: "temporary failure, run me again"


class TrainingError(RuntimeError):
    """The run cannot go on (for example, too many non-finite losses in a row); a checkpoint was saved."""


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def ds_config_for(ds_config: dict, project: ProjectConfig) -> dict:
    """DeepSpeed's dict with what derives from the project section filled in (scheduler length)."""
    cfg = copy.deepcopy(ds_config)
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and cfg["scheduler"].get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        sched.setdefault("total_num_steps", project.run.max_steps)
    return cfg


def build_model(project: ProjectConfig, vocab_size: int) -> CTCModel:
    """The model with ep_size resolved against the world; the same seed gives the same weights on every rank."""
    torch.manual_seed(project.run.seed)
    return CTCModel(project.model, project.moe, vocab_size, resolve_ep_size(project.moe, dist.get_world_size()))


def build_engine(ds_config: dict, project: ProjectConfig, model: CTCModel):
    """deepspeed.initialize creates the expert-parallel groups and splits expert from dense parameters."""
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config_for(ds_config, project))
    return engine


def forward_loss(engine, batch):
    """(total loss, ctc loss, aux loss, model output) for one batch on the engine's device."""
    dev = engine.device
    out = engine(batch["feats"].to(dev), batch["lengths"].to(dev))
    ctc = ctc_loss(out, batch["targets"].to(dev), batch["target_lengths"].to(dev), batch["weight"].to(dev))
    return ctc + out.aux_loss, ctc, out.aux_loss, out


@dataclass
class Meter:
    """Running sums between two log lines."""
    sums: dict = field(default_factory=dict)
    count: int = 0
    frames: int = 0
    start: float = field(default_factory=time.time)

    def add(self, frames: int, **values):
        self.count += 1
        self.frames += frames
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> dict:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


class StopSignal:
    """SIGTERM and SIGUSR1 (what SLURM sends before a time limit or preemption) set a flag; the ranks agree
    on it at the next step, so all of them stop at the same step boundary."""

    def __init__(self):
        self.received = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name


def any_rank(*flags: bool) -> list[bool]:
    """Each flag as set on any rank (one all-reduce of a few numbers)."""
    t = torch.tensor([float(f) for f in flags], device=deepspeed.get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


class Trainer:
    """The training loop around one DeepSpeed engine: steps, logs, evaluations, checkpoints, stops."""

    def __init__(self, engine, project: ProjectConfig, train_set: SpeechDataset, dev_sets: dict, tokenizer,
                 out_dir: str):
        self.engine, self.project, self.train_set, self.dev_sets = engine, project, train_set, dev_sets
        self.tokenizer, self.out_dir = tokenizer, Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.metrics = MetricsFile(self.out_dir / "metrics.jsonl", dist.get_rank() == 0)
        self.state = SamplerState()
        self.best = {"wer": math.inf, "tag": ""}
        self.bad_in_a_row = self.skipped_steps = 0
        self.history = []

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> str:
        client = {"project_config": self.project.model_dump(), "step": self.engine.global_steps,
                  "sampler": {"epoch": self.state.epoch, "position": self.state.position}, "best": self.best,
                  "world_size": dist.get_world_size(),
                  "ep_size": resolve_ep_size(self.project.moe, dist.get_world_size())}
        keep = {self.best["tag"]} if self.best["tag"] else set()
        extra = [f for f in (self.out_dir / checkpoint.TOKENIZER, self.out_dir / checkpoint.CMVN) if f.exists()]
        tag = checkpoint.save(self.engine, self.ckpt_dir, client, self.project.run.keep_last, keep, extra)
        log0(f"saved checkpoint {self.ckpt_dir / tag}")
        return tag

    def resume(self, reset_optimizer: bool = False) -> bool:
        """Continue from the newest usable checkpoint, if any: weights, optimizer, scheduler, step, random
        states and data position. A different world size needs ``reset_optimizer`` (weights only)."""
        box = [self._newest_with_layout() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)  # one rank reads the disk; all decide alike
        newest, warnings, written = box[0]
        for w in warnings:
            log0(f"WARNING: skipping a damaged checkpoint: {w}")
        if not newest:
            return False
        was = (written["world_size"], written["ep_size"])
        now = (dist.get_world_size(), resolve_ep_size(self.project.moe, dist.get_world_size()))
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
        engine, run, data = self.engine, self.project.run, self.project.data
        rank, world = dist.get_rank(), dist.get_world_size()
        stop = StopSignal()
        all_batches = length_batches(self.train_set.utts, data.max_frames_per_batch)
        log0(f"{len(all_batches)} training batches per epoch over {world} rank(s), "
             f"padding {100 * padding_fraction(self.train_set.utts, all_batches):.1f}% of frames")
        meter, started, first_step = Meter(), time.time(), engine.global_steps
        while engine.global_steps < run.max_steps:
            batches = train_batches(self.train_set.utts, data.max_frames_per_batch, run.seed, self.state.epoch,
                                    rank, world)
            if not batches:
                raise TrainingError(f"{world} ranks and max_frames_per_batch={data.max_frames_per_batch} "
                                    f"leave no training batch for every rank ({len(self.train_set)} utterances)")
            self.train_set.epoch, skipped = self.state.epoch, 0
            engine.train()
            for batch in loader(self.train_set, batches[self.state.position:], data.num_workers):
                self.state.position += 1
                skipped += batch["skipped"]
                boundary, skipped_batch, stopping = self.train_step(batch, meter, bool(stop.received))
                step = engine.global_steps
                if stopping and (boundary or skipped_batch):
                    log0(f"stop requested ({stop.received or 'by another rank'}): saving at step {step}")
                    self.save()
                    return REQUEUE
                if not boundary or skipped_batch:
                    continue
                if step % run.log_every == 0 or step == run.max_steps:
                    self.log_train(meter, step, first_step, started)
                    meter = Meter()
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

    def train_step(self, batch: dict, meter: Meter, stop_requested: bool) -> tuple[bool, bool, bool]:
        """One micro-batch, agreed by all ranks: (gradient-accumulation boundary, batch skipped, stopping).

        A non-finite loss on any rank skips the batch on every rank before backward. A non-finite gradient
        with a finite loss is caught by DeepSpeed's ZeRO optimizer, which skips the step on every rank (the
        global norm is reduced over expert and non-expert groups alike); it is counted here the same way."""
        engine = self.engine
        loss, ctc, aux, out = forward_loss(engine, batch)
        bad_loss, stopping = any_rank(not torch.isfinite(loss).item(), stop_requested)
        boundary = engine.is_gradient_accumulation_boundary()  # DeepSpeed advances it in step()
        if bad_loss:
            self.count_bad_step("loss")
            return boundary, True, stopping
        engine.backward(loss)
        engine.step()
        if boundary and not engine.was_step_applied():
            self.count_bad_step("gradient")
        else:
            self.bad_in_a_row = 0
            meter.add(int(batch["lengths"].sum()), loss=loss.item(), ctc=ctc.item(), aux=aux.item(),
                      lb=out.mean_over_layers("lb_loss"), z=out.mean_over_layers("z_loss"))
        return boundary, False, stopping

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

    def log_train(self, meter: Meter, step: int, first_step: int, started: float):
        elapsed = time.time() - meter.start
        m = meter.means()
        fps = meter.frames * dist.get_world_size() / max(elapsed, 1e-9)  # input frames (10 ms), all ranks
        eta = (time.time() - started) / max(step - first_step, 1) * (self.project.run.max_steps - step)
        row = {"kind": "train", "step": step, "epoch": self.state.epoch, **m, "lr": self.engine.get_lr()[0],
               "frames_per_s": fps, "skipped_steps": self.skipped_steps}
        log0(f"step {step}/{self.project.run.max_steps} ep {self.state.epoch} loss {m.get('loss', math.nan):.3f} "
             f"ctc {m.get('ctc', math.nan):.3f} lb {m.get('lb', math.nan):.3f} z {m.get('z', math.nan):.3f} "
             f"lr {row['lr']:.2e} {fps:,.0f} frames/s ETA {eta / 60:.1f} min")
        self.history.append(row)
        self.metrics.write(row)
        self.monitor(step, {f"train/{k}": v for k, v in row.items() if k not in ("kind", "step")})

    def monitor(self, step: int, values: dict):
        """DeepSpeed's monitor (TensorBoard, CSV, W&B as its config section enables) on rank 0."""
        if self.engine.monitor.enabled and dist.get_rank() == 0:
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
        data, routing = self.project.data, RoutingMeter()
        sets = {name: evaluate(self.engine, ds, self.tokenizer, data.max_frames_per_batch, data.num_workers,
                               routing) for name, ds in self.dev_sets.items()}
        routing.all_reduce()
        result = {"kind": "eval", "step": self.engine.global_steps, "sets": sets,
                  "mean_wer": sum(r["wer"] for r in sets.values()) / len(sets),
                  "mean_loss": sum(r["loss"] for r in sets.values()) / len(sets), "routing": routing.summary()}
        for name, r in sets.items():
            log0(f"dev {name}: loss {r['loss']:.3f}  WER {r['wer']:.2f}%  ({r['utterances']} utterances)")
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


def report_skipped(skipped: int, epoch: int):
    """All ranks' count of utterances whose audio failed to decode in this epoch (a collective call)."""
    total = torch.tensor([skipped], device=deepspeed.get_accelerator().current_device_name())
    dist.all_reduce(total)
    if total.item():
        log0(f"epoch {epoch}: skipped {total.item()} utterances whose audio could not be read")


@torch.no_grad()
def evaluate(engine, dataset: SpeechDataset, tokenizer, max_frames: int, workers: int = 0,
             routing: RoutingMeter = None) -> dict:
    """Dev loss and greedy-CTC WER over one set; ranks step in lockstep, filler batches discarded."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    mine = shard(length_batches(dataset.utts, max_frames), rank, world, fill=True)
    rows, loss_sum = [], 0.0
    for (ids, filler), batch in zip(mine, loader(dataset, [ids for ids, _ in mine], workers)):
        loss, _, _, out = forward_loss(engine, batch)
        if filler or not batch["weight"].any():
            continue
        if routing is not None and out.routing:
            routing.add(out.routing)
        loss_sum += loss.item() * len(batch["index"])
        hyps = [tokenizer.decode(h) for h in greedy_labels(out.log_probs, out.lengths)]
        rows += [(dataset.utts[i].text, h) for i, h in zip(batch["index"].tolist(), hyps)]
    gathered = [None] * world
    dist.all_gather_object(gathered, (rows, loss_sum))
    rows = [r for part, _ in gathered for r in part]
    if not rows:
        raise TrainingError("no dev utterance could be decoded")
    refs, hyps = zip(*rows)
    return {"loss": sum(s for _, s in gathered) / len(rows), "wer": word_error_rate(list(refs), list(hyps)),
            "utterances": len(rows), "examples": [{"ref": r, "hyp": h} for r, h in rows[:5]]}
