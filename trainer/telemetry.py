"""Routing telemetry, running training sums, and the run's log: console, metrics file and DeepSpeed's monitor.

Per MoE layer, over a dev set: expert load fractions, mean router entropy, dropped-route fraction, capacity
used; and for every pair of adjacent MoE layers the normalised mutual information of their top-1 choices,
which is permutation-invariant (relabelling one layer's experts leaves it unchanged): the dependency between
layers that Omni-Router's shared router is meant to raise.
"""
import json
import os
import time
from pathlib import Path

import torch

from trainer.runtime import distributed


def nmi(joint: torch.Tensor) -> float:
    """2 I(X;Y) / (H(X) + H(Y)) of a contingency table; 0 when either side is constant."""
    p = joint.double() / joint.sum().clamp(min=1)
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (px.unsqueeze(1) * py.unsqueeze(0))[nz]).log()).sum().item()
    hx = -(px[px > 0] * px[px > 0].log()).sum().item()
    hy = -(py[py > 0] * py[py > 0].log()).sum().item()
    return 0.0 if hx + hy == 0 else max(0.0, 2 * mi / (hx + hy))


def cramers_v(joint: torch.Tensor) -> float:
    """Cramer's V of a contingency table, sqrt(chi2 / (n (min(r, c) - 1))) over its non-empty rows and
    columns; 0 when either side is constant."""
    t = joint.double()
    t = t[t.sum(1) > 0][:, t.sum(0) > 0]
    k = min(t.shape) - 1
    n = t.sum().item()
    if k < 1 or n == 0:
        return 0.0
    expected = t.sum(1, keepdim=True) * t.sum(0, keepdim=True) / n
    chi2 = ((t - expected).square() / expected).sum().item()
    return min(1.0, (chi2 / (n * k)) ** 0.5)


def contingency(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E, E] counts of (expert in one layer, expert in another) over the frames both routed (choice >= 0),
    on their device (sized by E, not by the data: no host sync)."""
    both = ((a >= 0) & (b >= 0)).float()
    idx = (a * num_experts + b).clamp(min=0)
    return torch.zeros(num_experts * num_experts, device=a.device).index_add_(0, idx, both).view(
        num_experts, num_experts)


def _stacked(values: list) -> torch.Tensor:
    """[L, ...] float32 of one tensor per MoE layer."""
    return torch.stack(values).float()


class RoutingMeter:
    """Sums over batches of each MoE layer's RoutingStats, laid out from the model (not from what a rank saw),
    so every rank all-reduces the same tensors even when its share of a dev set is empty."""

    def __init__(self, num_layers: int, num_experts: int):
        L, E = num_layers, num_experts
        self.sums = {"kept": torch.zeros(L, E), "routes": torch.zeros(L), "dropped": torch.zeros(L),
                     "entropy": torch.zeros(L), "frames": torch.zeros(L), "used": torch.zeros(L),
                     "calls": torch.zeros(L), "joint": torch.zeros(max(L - 1, 0), E, E)}

    def add(self, routing: list):
        """One batch's RoutingStats, one per MoE layer, summed on their device (no host sync)."""
        if not routing:
            return
        s = self.sums = {k: v.to(routing[0].kept_E.device) for k, v in self.sums.items()}
        s["kept"] += _stacked([r.kept_E for r in routing])
        s["routes"] += _stacked([r.routes for r in routing])
        s["dropped"] += _stacked([r.dropped for r in routing])
        s["entropy"] += _stacked([r.entropy_sum for r in routing])
        s["frames"] += _stacked([r.frames for r in routing])
        s["used"] += _stacked([r.kept_E.max() / r.capacity for r in routing])
        s["calls"] += 1
        for i, (a, b) in enumerate(zip(routing, routing[1:])):
            s["joint"][i] += contingency(a.first_choice_S, b.first_choice_S, s["joint"].shape[-1])

    def all_reduce(self):
        """Sum every rank's accumulators (a collective: every rank calls it, recorded something or not)."""
        self.sums = {k: v.float() for k, v in distributed.sum_over_ranks(self.sums).items()}

    def summary(self) -> dict:
        """Per layer: load, router entropy, dropped share, capacity used; adjacent-layer NMI."""
        s = self.sums
        layers = [{"load": (s["kept"][i] / s["kept"][i].sum().clamp(min=1)).tolist(),
                   "entropy": float(s["entropy"][i] / s["frames"][i].clamp(min=1)),
                   "dropped": float(s["dropped"][i] / s["routes"][i].clamp(min=1)),
                   "capacity_used": float(s["used"][i] / s["calls"][i].clamp(min=1))}
                  for i in range(len(s["routes"]))]
        return {"layers": layers, "adjacent_nmi": [nmi(j) for j in s["joint"]]}


class TrainMeter:
    """Running sums between two log lines: losses (each rank's share of the global mean) and, per MoE layer,
    routes requested and dropped at the training capacity. They stay on the compute device until the log line,
    so a step costs no host sync here."""

    def __init__(self, num_layers: int):
        self.start, self.steps, self.frames = time.time(), 0, 0
        self.sums = {"loss": torch.zeros(4), "routes": torch.zeros(num_layers), "dropped": torch.zeros(num_layers)}

    def add(self, input_frames: int, loss, routing: list):
        """One micro-batch's losses and routing counts (kept on the device until ``reduce``)."""
        self.steps += 1
        self.frames += input_frames
        step = {"loss": torch.stack([loss.total, loss.ctc, loss.lb, loss.z]).detach().float()}
        if routing:
            step["routes"] = torch.stack([r.routes for r in routing]).float()
            step["dropped"] = torch.stack([r.dropped for r in routing]).float()
        for k, v in step.items():
            self.sums[k] = self.sums[k].to(v.device) + v

    def reduce(self) -> dict:
        """Global means over the interval (a collective: every rank calls it at the same step)."""
        s = distributed.sum_over_ranks({**self.sums, "n": torch.tensor([float(self.steps), float(self.frames)])})
        rank_steps, frames = float(s["n"][0]), float(s["n"][1])
        loss = (s["loss"] / max(rank_steps, 1.0)).tolist()  # the mean of the ranks' shares is the global value
        return {"loss": loss[0], "ctc": loss[1], "lb": loss[2], "z": loss[3],
                "dropped_per_layer": (s["dropped"] / s["routes"].clamp(min=1)).tolist(),
                "input_frames": frames, "elapsed": time.time() - self.start}


class MetricsFile:
    """JSON lines, one row per log or evaluation, appended by rank 0 (flushed per row: a crash loses none).
    Each (kind, step) is written once: a resumed run first drops the rows written after its checkpoint, which
    it is about to compute again, so plots and tables read one curve."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.written = set()

    def resume_at(self, step: int):
        """Keep the rows up to ``step`` (the checkpoint resumed from); rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
                self.written.add((row.get("kind"), row.get("step")))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, row: dict):
        """Append a row once per (kind, step): a rerun of a step does not repeat it."""
        key = (row["kind"], row["step"])
        if self.enabled and key not in self.written:
            self.written.add(key)
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")



class RunLogger:
    """One row, three sinks: the console (rank 0), ``metrics.jsonl`` and DeepSpeed's monitor (TensorBoard, CSV,
    W&B as the DeepSpeed config enables them)."""

    def __init__(self, out_dir: Path, monitor, max_steps: int):
        self.rank0 = distributed.rank() == 0
        self.metrics = MetricsFile(Path(out_dir) / "metrics.jsonl", self.rank0)
        self.monitor, self.max_steps = monitor, max_steps

    def _monitor(self, step: int, values: dict):
        if self.monitor.enabled and self.rank0:
            self.monitor.write_events([(k, float(v), step) for k, v in values.items()])

    def train(self, row: dict, eta_s: float):
        """A training row to the log (rank 0), TensorBoard and metrics.jsonl."""
        drops = " ".join(f"{100 * x:.1f}" for x in row["dropped_per_layer"])
        distributed.log0(
            f"step {row['step']}/{self.max_steps} ep {row['epoch']} loss {row['loss']:.4f} ctc {row['ctc']:.4f} "
            f"lb {row['lb']:.3f} z {row['z']:.3f} lr {row['lr']:.2e} |g| {row['grad_norm'] or 0:.2f} "
            f"{row['frames_per_s']:,.0f} frames/s " + (f"dropped% [{drops}] " if drops else "")
            + f"ETA {eta_s / 60:.1f} min")
        self.metrics.write(row)
        self._monitor(row["step"], {f"train/{k}": v for k, v in row.items()
                                    if k not in ("kind", "step", "dropped_per_layer") and v is not None})

    def evaluation(self, result: dict):
        """An evaluation's sets and routing to the log (rank 0), TensorBoard and metrics.jsonl."""
        for name, r in result["sets"].items():
            distributed.log0(f"dev {name}: loss {r['loss']:.4f}  WER {r['wer']:.2f}%  CER {r['cer']:.2f}%  "
                             f"({r['utterances']} utterances)")
        distributed.log0(f"dev mean WER {result['mean_wer']:.2f}% CER {result['mean_cer']:.2f}% over "
                         f"{len(result['sets'])} set(s) at step {result['step']}")
        layers = result["routing"]["layers"]
        for i, layer in enumerate(layers):
            load = " ".join(f"{x:.2f}" for x in layer["load"])
            distributed.log0(f"  MoE layer {i}: load [{load}] entropy {layer['entropy']:.3f} dropped "
                             f"{100 * layer['dropped']:.1f}% capacity used {100 * layer['capacity_used']:.0f}%")
        if result["routing"]["adjacent_nmi"]:
            distributed.log0("  adjacent-layer NMI of expert choices: "
                             + " ".join(f"{x:.3f}" for x in result["routing"]["adjacent_nmi"]))
        self.metrics.write(result)
        values = {f"dev/{name}/{k}": r[k] for name, r in result["sets"].items() for k in ("loss", "wer", "cer")}
        values.update({"dev/mean_wer": result["mean_wer"], "dev/mean_cer": result["mean_cer"]}, **{
            f"routing/layer{i}/{k}": layer[k] for i, layer in enumerate(layers)
            for k in ("entropy", "dropped", "capacity_used")})
        values.update({f"routing/nmi_{i}_{i + 1}": x for i, x in enumerate(result["routing"]["adjacent_nmi"])})
        self._monitor(result["step"], values)
