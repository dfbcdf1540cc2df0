"""DeepSpeed glue: process groups, the engine, the training loop, evaluation and checkpoints."""
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

from trainer.config import ProjectConfig, resolve_ep_size
from trainer.data import SpeechDataset, collate, length_batches, loader, shard, train_batches
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
    cfg = json.loads(json.dumps(ds_config))
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
    ctc = ctc_loss(out, batch["targets"].to(dev), batch["target_lengths"].to(dev))
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


def train(engine, project: ProjectConfig, dataset: SpeechDataset, dev: SpeechDataset, tokenizer, out_dir: str):
    """Run until run.max_steps optimizer steps; log, checkpoint and evaluate at the end."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run = project.run
    meter, started, epoch = Meter(), time.time(), 0
    history = []
    while engine.global_steps < run.max_steps:
        batches = train_batches(dataset.utts, project.data.max_frames_per_batch, run.seed, epoch, rank, world)
        if not batches:
            raise RuntimeError(f"{world} ranks and max_frames_per_batch={project.data.max_frames_per_batch} "
                               f"leave no training batch for every rank ({len(dataset)} utterances)")
        for batch in loader(dataset, batches):
            engine.train()
            loss, ctc, aux, _ = forward_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            meter.add(int(batch["lengths"].sum()), loss=loss.item(), ctc=ctc.item(), aux=aux.item())
            step = engine.global_steps
            if engine.is_gradient_accumulation_boundary() and (step % run.log_every == 0 or step == run.max_steps):
                history.append(log_progress(engine, meter, step, run.max_steps, epoch, started, world))
                meter = Meter()
            if step >= run.max_steps:
                break
        epoch += 1
    save(engine, project, out_dir, tokenizer)
    result = evaluate(engine, dev, tokenizer, project.data.max_frames_per_batch)
    log0(f"dev: loss {result['loss']:.3f}  WER {result['wer']:.2f}%  ({result['utterances']} utterances)")
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps({"train": history, "dev": result}, indent=1))
    return history, result


def log_progress(engine, meter: Meter, step: int, max_steps: int, epoch: int, started: float, world: int) -> dict:
    elapsed = time.time() - meter.start
    m = meter.means()
    fps = meter.frames * world / max(elapsed, 1e-9)  # input frames (10 ms), all ranks
    eta = (time.time() - started) / step * (max_steps - step)
    row = {"step": step, "epoch": epoch, **m, "lr": engine.get_lr()[0], "frames_per_s": fps}
    log0(f"step {step}/{max_steps} ep {epoch} loss {m['loss']:.3f} ctc {m['ctc']:.3f} aux {m['aux']:.4f} "
         f"lr {row['lr']:.2e} {fps:,.0f} frames/s ETA {eta / 60:.1f} min")
    return row


@torch.no_grad()
def evaluate(engine, dataset: SpeechDataset, tokenizer, max_frames: int) -> dict:
    """Dev loss and greedy-CTC WER over the whole set; ranks step in lockstep, filler batches discarded."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.eval()
    rows, loss_sum = [], 0.0
    for ids, filler in shard(length_batches(dataset.utts, max_frames), rank, world, fill=True):
        batch = collate([dataset[i] for i in ids])
        loss, _, _, out = forward_loss(engine, batch)
        if filler:
            continue
        loss_sum += loss.item() * len(ids)
        hyps = [tokenizer.decode(h) for h in greedy_labels(out.log_probs, out.lengths)]
        rows += [(dataset.utts[i].text, h) for i, h in zip(ids, hyps)]
    gathered = [None] * world
    dist.all_gather_object(gathered, (rows, loss_sum))
    rows = [r for part, _ in gathered for r in part]
    refs, hyps = zip(*rows)
    return {"loss": sum(s for _, s in gathered) / len(rows), "wer": word_error_rate(list(refs), list(hyps)),
            "utterances": len(rows), "examples": [{"ref": r, "hyp": h} for r, h in rows[:5]]}


def save(engine, project: ProjectConfig, out_dir: str, tokenizer) -> str:
    """DeepSpeed checkpoint (dense states, one file per expert, ZeRO shards) plus config and tokenizer."""
    tag = f"step{engine.global_steps}"
    engine.save_checkpoint(os.path.join(out_dir, "checkpoints"), tag=tag,
                           client_state={"project_config": project.model_dump(), "step": engine.global_steps})
    log0(f"saved checkpoint {out_dir}/checkpoints/{tag}")
    return tag
