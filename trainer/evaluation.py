"""Evaluation on dev sets during a run: CTC loss per frame, greedy-CTC WER and CER, and routing telemetry.

Every rank steps through the same number of batches (filler batches are computed for the MoE all-to-all, then
discarded) and enters every collective, whatever its share of a set. Nothing is dropped at evaluation, so the
result does not depend on batch-mates, batch size or world size.
"""
from typing import Callable, Optional

import torch

from trainer.data.batches import SpeechDataset, length_batches, loader, shard
from trainer.decode import error_rates, greedy_labels
from trainer.engine import forward
from trainer.runtime import distributed
from trainer.runtime.exits import RunError
from trainer.telemetry import RoutingMeter


class EvaluationError(RunError, RuntimeError):
    """A dev set that yields nothing to score; worded for the user."""


@torch.no_grad()
def evaluate_set(engine, dataset: SpeechDataset, tokenizer, max_frames: int, workers: int,
                 routing: RoutingMeter, progress: Optional[Callable] = None) -> dict:
    """Loss (CTC per encoder frame), WER, CER and five examples over one dev set; routing sums go into
    ``routing``."""
    rank, world = distributed.rank(), distributed.world()
    engine.eval()
    mine = shard(length_batches(dataset.utts, max_frames), rank, world)
    rows, ctc_total, frames_total = [], 0.0, 0.0
    for (ids, filler), batch in zip(mine, loader(dataset, [ids for ids, _ in mine], workers)):
        batch = dataset.on_device(batch, engine.device)
        out, ctc, frames = forward(engine, batch)
        if progress:
            progress()
        if filler or not batch["weight"].any():
            continue
        routing.add(out.routing)
        ctc_total += float(ctc.sum())
        frames_total += float(frames)
        hyps = [tokenizer.decode(h) for h in greedy_labels(out.log_probs, out.lengths)]
        rows += [(dataset.utts[i].text, h) for i, h in zip(batch["index"].tolist(), hyps)]
    gathered = distributed.gather_objects((rows, ctc_total, frames_total))
    rows = [r for part, _, _ in gathered for r in part]
    if not rows:
        raise EvaluationError("no dev utterance could be decoded")
    refs, hyps = zip(*rows)
    return {"loss": sum(c for _, c, _ in gathered) / max(sum(f for _, _, f in gathered), 1.0),
            **error_rates(list(refs), list(hyps)), "utterances": len(rows),
            "examples": [{"ref": r, "hyp": h} for r, h in rows[:5]]}


def evaluate_dev_sets(engine, dev_sets: dict, tokenizer, max_frames: int, workers: int, moe_layers: int,
                      num_experts: int, progress: Optional[Callable] = None) -> dict:
    """Every dev set, their unweighted mean WER, CER and loss, and routing telemetry over all of them."""
    routing = RoutingMeter(moe_layers, num_experts)
    sets = {name: evaluate_set(engine, ds, tokenizer, max_frames, workers, routing, progress)
            for name, ds in dev_sets.items()}
    routing.all_reduce()
    return {"kind": "eval", "step": engine.global_steps, "sets": sets,
            "mean_wer": sum(r["wer"] for r in sets.values()) / len(sets),
            "mean_cer": sum(r["cer"] for r in sets.values()) / len(sets),
            "mean_loss": sum(r["loss"] for r in sets.values()) / len(sets), "routing": routing.summary()}
