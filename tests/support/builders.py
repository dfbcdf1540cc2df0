"""What the unit and scenario tests build: tiny projects, plans, models and weights, batches, and the
repository's own commands run under this interpreter."""
import re
import subprocess
import sys
import zlib

import torch

from tools.harness import ROOT
from trainer.config import DataConfig, ModelConfig, MoEConfig, ProjectConfig
from trainer.model import objective
from trainer.model.ctc import CTCModel
from trainer.model.experts import PER_EXPERT_KEYS
from trainer.plan import RunPlan, plan_run

VOCAB = 20


def tiny_project(mode="omni", k=1, drop_tokens=False, layers=3, accumulation=1, **moe) -> ProjectConfig:
    """A tiny model; ``accumulation`` micro-batches per optimizer step on every rank, whatever the world."""
    import trainer.runtime.distributed as distributed
    frames = 1000 * accumulation * distributed.world()
    return ProjectConfig(model=ModelConfig(n_mels=8, frame_stacking=2, d_model=16, num_layers=layers, num_heads=2,
                                           ffn_dim=24, dropout=0.0),
                         moe=MoEConfig(mode=mode, num_experts=4, top_k=k, drop_tokens=drop_tokens, min_capacity=1,
                                       lb_coef=0.01, z_coef=0.001, **moe),
                         data=DataConfig(batch_frames=frames, max_frames_per_rank=1000))


def ds_dict(stage=1, lr=1e-3) -> dict:
    """DeepSpeed's keys of a test run; the batch keys are derived from the project (``data.batch_frames``)."""
    return {"optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}


def tiny_plan(project: ProjectConfig, ds: dict = None) -> RunPlan:
    """This rank's plan of a test run (``ds``: DeepSpeed's keys, ``ds_dict()`` unless given)."""
    import trainer.runtime.distributed as distributed
    return plan_run(ds or ds_dict(), project, distributed.rank(), distributed.world(), distributed.device())


def per_expert(named: dict, ep_rank: int = 0, n_local: int = 0) -> dict:
    """{name: tensor} with each stacked expert tensor (``...experts.w1`` [n, ...]) split into views under
    DeepSpeed's per-expert names and *global* ids, as a one-rank model names them: local expert j on ep rank r
    is global r * n_local + j."""
    out = {}
    for name, t in named.items():
        m = re.fullmatch(r"(.*\.experts\.)(w1|b1|w2|b2)", name)
        if not m:
            out[name] = t
            continue
        for j in range(t.shape[0]):
            out[f"{m[1]}deepspeed_experts.{ep_rank * n_local + j}.{PER_EXPERT_KEYS[m[2]]}"] = t[j]
    return out


def fill_weights(model, ep_rank=0, n_local=None):
    """Give every parameter (every expert's slice) values drawn from its global name, so experts differ and
    every layout agrees."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            for global_name, view in per_expert({name: p}, ep_rank, n_local or 0).items():
                g = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
                view.copy_(torch.randn(view.shape, generator=g) * 0.3)


def build(mode, k=1, **kw):
    """A tiny model (``tiny_project(mode, k, **kw)``) with ``fill_weights``' values, and its project."""
    p = tiny_project(mode, k, **kw)
    model = CTCModel(p.model, p.moe, VOCAB)
    fill_weights(model)
    return model, p


def local_loss(model, b, moe):
    """The objective of one process holding the whole batch (world 1: the global per-frame mean)."""
    out = model(b["feats"], b["lengths"])
    ctc = objective.ctc_sums(out, b["targets"], b["target_lengths"], b["weight"]).sum()
    totals = objective.step_totals(out, objective.real_frames(out, b["weight"]), ctc, False)
    return objective.loss(ctc, out, totals, moe, 1), out


def batch(seed: int, n_mels=8, lengths=(13, 10, 7)) -> dict:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    feats = torch.randn(len(lengths), T, n_mels, generator=g)
    for i, n in enumerate(lengths):
        feats[i, n:] = 0.0
    tl = torch.tensor([max(1, n // 4) for n in lengths])
    targets = torch.randint(1, VOCAB + 1, (len(lengths), int(tl.max())), generator=g)
    return {"feats": feats, "lengths": torch.tensor(lengths), "targets": targets, "target_lengths": tl,
            "weight": torch.ones(len(lengths))}


def union(*batches: dict) -> dict:
    """One batch holding the utterances of several, padded to the longest."""
    T = max(b["feats"].shape[1] for b in batches)
    L = max(b["targets"].shape[1] for b in batches)
    pad = torch.nn.functional.pad
    return {"feats": torch.cat([pad(b["feats"], (0, 0, 0, T - b["feats"].shape[1])) for b in batches]),
            "targets": torch.cat([pad(b["targets"], (0, L - b["targets"].shape[1])) for b in batches]),
            **{k: torch.cat([b[k] for b in batches]) for k in ("lengths", "target_lengths", "weight")}}


def run_tool(*args, timeout=600):
    """A script of the repository (tools/...) under this interpreter, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def queued_gpu_seed():
    """The seed torch gives the GPUs' generators when CUDA starts: on a machine where it has not started,
    torch.manual_seed queues its GPU half here (and formats a stack trace for it, at every call)."""
    return torch.cuda._lazy_seed_tracker.get_calls()
