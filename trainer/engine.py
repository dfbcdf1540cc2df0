"""DeepSpeed glue: process groups, the engine, the training loop, evaluation and checkpoints."""
import copy
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from trainer.config import ProjectConfig, resolve_ep_size
from trainer.data import SamplerState, SpeechDataset, length_batches, loader, padding_fraction, shard, train_batches
from trainer.decode import greedy_labels, word_error_rate
from trainer.model import CTCModel, ctc_loss


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher describes (deepspeed, torchrun or srun env); return (rank, world)."""
    # The shared-memory op serves only inference all-reduce; skipping it saves a minute of g++ per fresh node.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name())
    return dist.get_rank(), dist.get_world_size()


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


def train(engine, project: ProjectConfig, dataset: SpeechDataset, dev: SpeechDataset, tokenizer, out_dir: str,
          state: SamplerState):
    """Run until run.max_steps optimizer steps from ``state``; log, then checkpoint and evaluate at the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run, data = project.run, project.data
    all_batches = length_batches(dataset.utts, data.max_frames_per_batch)
    log0(f"{len(all_batches)} training batches per epoch over {world} rank(s), "
         f"padding {100 * padding_fraction(dataset.utts, all_batches):.1f}% of frames")
    meter, started, history, first_step = Meter(), time.time(), [], engine.global_steps
    while engine.global_steps < run.max_steps:
        batches = train_batches(dataset.utts, data.max_frames_per_batch, run.seed, state.epoch, rank, world)
        if not batches:
            raise RuntimeError(f"{world} ranks and max_frames_per_batch={data.max_frames_per_batch} "
                               f"leave no training batch for every rank ({len(dataset)} utterances)")
        skipped = 0
        dataset.epoch = state.epoch
        engine.train()
        for batch in loader(dataset, batches[state.position:], data.num_workers):
            state.position += 1
            loss, ctc, aux, _ = forward_loss(engine, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()  # DeepSpeed advances it in step()
            engine.step()
            skipped += batch["skipped"]
            meter.add(int(batch["lengths"].sum()), loss=loss.item(), ctc=ctc.item(), aux=aux.item())
            step = engine.global_steps
            if boundary and (step % run.log_every == 0 or step == run.max_steps):
                history.append(log_progress(engine, meter, step, first_step, run.max_steps, state.epoch, started))
                meter = Meter()
            if step >= run.max_steps:
                break
        report_skipped(skipped, state.epoch)
        if state.position == len(batches):
            state.epoch, state.position = state.epoch + 1, 0
    save(engine, project, out_dir, state)
    result = evaluate(engine, dev, tokenizer, data.max_frames_per_batch, data.num_workers)
    log0(f"dev: loss {result['loss']:.3f}  WER {result['wer']:.2f}%  ({result['utterances']} utterances)")
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps({"train": history, "dev": result}, indent=1))
    return history, result


def report_skipped(skipped: int, epoch: int):
    """All ranks' count of utterances whose audio failed to decode in this epoch (a collective call)."""
    total = torch.tensor([skipped], device=deepspeed.get_accelerator().current_device_name())
    dist.all_reduce(total)
    if total.item():
        log0(f"epoch {epoch}: skipped {total.item()} utterances whose audio could not be read")


def log_progress(engine, meter: Meter, step: int, first_step: int, max_steps: int, epoch: int, started: float):
    elapsed = time.time() - meter.start
    m = meter.means()
    fps = meter.frames * dist.get_world_size() / max(elapsed, 1e-9)  # input frames (10 ms), all ranks
    eta = (time.time() - started) / max(step - first_step, 1) * (max_steps - step)
    row = {"step": step, "epoch": epoch, **m, "lr": engine.get_lr()[0], "frames_per_s": fps}
    log0(f"step {step}/{max_steps} ep {epoch} loss {m['loss']:.3f} ctc {m['ctc']:.3f} aux {m['aux']:.4f} "
         f"lr {row['lr']:.2e} {fps:,.0f} frames/s ETA {eta / 60:.1f} min")
    return row


@torch.no_grad()
def evaluate(engine, dataset: SpeechDataset, tokenizer, max_frames: int, workers: int = 0) -> dict:
    """Dev loss and greedy-CTC WER over the whole set; ranks step in lockstep, filler batches discarded."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    mine = shard(length_batches(dataset.utts, max_frames), rank, world, fill=True)
    rows, loss_sum = [], 0.0
    for (ids, filler), batch in zip(mine, loader(dataset, [ids for ids, _ in mine], workers)):
        loss, _, _, out = forward_loss(engine, batch)
        if filler or not batch["weight"].any():
            continue
        loss_sum += loss.item() * len(batch["index"])
        hyps = [tokenizer.decode(h) for h in greedy_labels(out.log_probs, out.lengths)]
        rows += [(dataset.utts[i].text, h) for i, h in zip(batch["index"].tolist(), hyps)]
    gathered = [None] * world
    dist.all_gather_object(gathered, (rows, loss_sum))
    rows = [r for part, _ in gathered for r in part]
    if not rows:
        raise RuntimeError("no dev utterance could be decoded")
    refs, hyps = zip(*rows)
    return {"loss": sum(s for _, s in gathered) / len(rows), "wer": word_error_rate(list(refs), list(hyps)),
            "utterances": len(rows), "examples": [{"ref": r, "hyp": h} for r, h in rows[:5]]}


def _rng_file(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank()}.pt")


def resume(engine, out_dir: str) -> SamplerState:
    """Continue from the newest checkpoint in out_dir, if there is one: weights, optimizer and scheduler
    states, step, every rank's random state (dropout, SpecAugment) and the data position, so the run goes
    on exactly as an uninterrupted one would."""
    ckpt = os.path.join(out_dir, "checkpoints")
    if not os.path.exists(os.path.join(ckpt, "latest")):
        return SamplerState()
    path, client = engine.load_checkpoint(ckpt)
    rng = torch.load(_rng_file(ckpt, client["tag"]), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    log0(f"resumed from {path} at step {engine.global_steps}")
    return SamplerState(**client["sampler"])


def save(engine, project: ProjectConfig, out_dir: str, state: SamplerState) -> str:
    """DeepSpeed checkpoint (dense states, one file per expert, ZeRO shards) plus config, data position and
    each rank's random state."""
    tag = f"step{engine.global_steps}"
    ckpt = os.path.join(out_dir, "checkpoints")
    engine.save_checkpoint(ckpt, tag=tag, client_state={
        "project_config": project.model_dump(), "step": engine.global_steps, "tag": tag,
        "sampler": {"epoch": state.epoch, "position": state.position}})
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, _rng_file(ckpt, tag))
    dist.barrier()
    log0(f"saved checkpoint {ckpt}/{tag}")
    return tag
