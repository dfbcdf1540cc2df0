"""Routing telemetry and the metrics file.

Per MoE layer, over a dev set: expert load fractions, mean router entropy, dropped-route fraction, capacity
used; and for every pair of adjacent MoE layers the normalised mutual information of their top-1 choices,
which is permutation-invariant (relabelling one layer's experts leaves it unchanged): the dependency between
layers that Omni-Router's shared router is meant to raise.
"""
import json
from pathlib import Path

import torch
import torch.distributed as dist


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
    """[E, E] counts of (expert in one layer, expert in another) over the frames both routed (choice >= 0)."""
    real = (a >= 0) & (b >= 0)
    idx = (a[real] * num_experts + b[real]).cpu()
    return torch.bincount(idx, minlength=num_experts * num_experts).view(num_experts, num_experts).float()


class RoutingMeter:
    """Sums over batches of each layer's RoutingStats."""

    def __init__(self):
        self.layers = []

    def add(self, routing: list):
        if not self.layers:
            E = len(routing[0].expert_counts)
            self.layers = [{"counts": torch.zeros(E), "routes": 0.0, "dropped": 0.0, "entropy": 0.0, "frames": 0.0,
                            "used": 0.0, "calls": 0} for _ in routing]
            self.joint = [torch.zeros(E, E) for _ in routing[1:]]
        for acc, s in zip(self.layers, routing):
            frames = float((s.first_choice >= 0).sum())
            acc["counts"] += s.expert_counts.float().cpu()
            acc["routes"] += float(s.routes)
            acc["dropped"] += float(s.dropped)
            acc["entropy"] += float(s.entropy) * frames
            acc["frames"] += frames
            acc["used"] += float(s.expert_counts.max()) / s.capacity
            acc["calls"] += 1
        for joint, a, b in zip(self.joint, routing, routing[1:]):
            joint += contingency(a.first_choice, b.first_choice, joint.shape[0])

    def all_reduce(self):
        """Sum every rank's accumulators (a collective: each rank must call it, with the same layer count)."""
        if not self.layers:
            return
        flat = torch.cat([torch.cat([a["counts"], torch.tensor([a[k] for k in ("routes", "dropped", "entropy",
                                                                             "frames", "used", "calls")])])
                          for a in self.layers] + [j.flatten() for j in self.joint]).double()
        device = flat.new_empty(0, device="cuda").device if dist.get_backend() == "nccl" else flat.device
        flat = flat.to(device)
        dist.all_reduce(flat)  # NCCL needs the tensor on the GPU, gloo takes it where it is
        flat = flat.cpu()
        E, at = len(self.layers[0]["counts"]), 0
        for a in self.layers:
            a["counts"] = flat[at:at + E].float()
            for i, k in enumerate(("routes", "dropped", "entropy", "frames", "used", "calls")):
                a[k] = flat[at + E + i].item()
            at += E + 6
        for i in range(len(self.joint)):
            self.joint[i] = flat[at:at + E * E].view(E, E).float()
            at += E * E

    def summary(self) -> dict:
        layers = [{"load": (a["counts"] / a["counts"].sum().clamp(min=1)).tolist(),
                   "entropy": a["entropy"] / max(a["frames"], 1), "dropped": a["dropped"] / max(a["routes"], 1),
                   "capacity_used": a["used"] / max(a["calls"], 1)} for a in self.layers]
        return {"layers": layers, "adjacent_nmi": [nmi(j) for j in getattr(self, "joint", [])]}


class MetricsFile:
    """JSON lines, one row per log or evaluation, appended by rank 0 (flushed per row: a crash loses none)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, row: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row, allow_nan=True) + "\n")


def entropy_of(probs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over real frames of the router distribution's entropy (nats)."""
    h = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    return (h * real.float()).sum() / real.float().sum().clamp(min=1.0)

