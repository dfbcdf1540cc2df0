"""Which expert every real frame takes in every MoE layer, and how much the layers' choices depend on each other.

    python tools/analyze_routing.py --model models/omni --manifest dev.jsonl --out analysis/omni
    python tools/analyze_routing.py --model models/switch --manifest dev.jsonl --out analysis/switch

Writes into --out: routing.json (per-layer expert usage, mean router entropy and the entropy of the usage;
layer x layer normalised mutual information and Cramer's V of the top-1 choices, both invariant to how
each layer's experts are numbered; the temporal and depth structure, ``structure``), dependency.png (the two
heatmaps) and utterance.png (time x layer map of one utterance's choices). Switch and omni models give the
same files, to compare side by side.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from trainer.data.sources import DataError, read_sources  # noqa: E402
from trainer.export import CheckpointError  # noqa: E402
from trainer.inference import Recognizer  # noqa: E402
from trainer.telemetry import contingency, cramers_v, nmi  # noqa: E402


def collect(recognizer: Recognizer, utts: list, max_frames: Optional[int]) -> tuple[list, dict, list]:
    """(per layer: top-1 choice of every real frame, per utterance: [layers, frames] choices, per layer:
    summed router entropy over frames)."""
    flat, per_utt, entropy = None, {}, None
    for index, out in recognizer.outputs(utts, max_frames):
        if not out.routing:
            raise CheckpointError(f"{recognizer.meta['source']}: a dense model has no routing to analyse")
        if flat is None:
            flat, entropy = [[] for _ in out.routing], [0.0] * len(out.routing)
        steps = out.log_probs.shape[1]
        for layer, s in enumerate(out.routing):
            choice = s.first_choice_S.view(-1, steps).cpu()
            flat[layer].append(s.first_choice_S[s.first_choice_S >= 0].cpu())
            entropy[layer] += float(s.entropy_sum)
            for b, (i, n) in enumerate(zip(index, out.lengths.tolist())):
                per_utt.setdefault(i, []).append(choice[b, :n])
    return [torch.cat(x) for x in flat], per_utt, entropy


def summarise(flat: list, entropy: list, num_experts: int) -> dict:
    layers = []
    for choices, h in zip(flat, entropy):
        usage = torch.bincount(choices, minlength=num_experts).double() / max(len(choices), 1)
        usage_entropy = -sum(p * math.log(p) for p in usage.tolist() if p > 0)
        layers.append({"usage": usage.tolist(), "router_entropy": h / max(len(choices), 1),
                       "usage_entropy": usage_entropy})
    pairs = [[contingency(a, b, num_experts) for b in flat] for a in flat]
    return {"frames": len(flat[0]), "layers": layers, "nmi": [[nmi(t) for t in row] for row in pairs],
            "cramers_v": [[cramers_v(t) for t in row] for row in pairs]}


def structure(per_utt: dict) -> dict:
    """How the choices hang together in time and depth, over utterances of [layers, frames] choices:
    ``run_length`` per layer, the mean length in frames of a run that keeps one expert (frames / runs: the
    paper's temporal segments); ``same_adjacent`` per pair of adjacent layers and ``same_all``, the share of
    frames whose expert has the same index there (chance with independent uniform choices: 1/E and
    1/E^(layers-1); meaningful for omni, whose layers index their experts by one router's columns; NMI is the
    measure that does not depend on numbering)."""
    frames = all_same = 0
    runs_L = same_L = None
    for choices_LT in per_utt.values():
        choices_LT = torch.stack(list(choices_LT)) if isinstance(choices_LT, (list, tuple)) else choices_LT
        L, T = choices_LT.shape
        if T == 0:
            continue
        if runs_L is None:
            runs_L, same_L = torch.zeros(L, dtype=torch.int64), torch.zeros(max(L - 1, 0), dtype=torch.int64)
        runs_L += 1 + (choices_LT[:, 1:] != choices_LT[:, :-1]).sum(1)
        same_L += (choices_LT[1:] == choices_LT[:-1]).sum(1)
        all_same += int((choices_LT == choices_LT[:1]).all(0).sum())
        frames += T
    return {"run_length": [frames / r for r in runs_L.tolist()],
            "same_adjacent": [s / frames for s in same_L.tolist()],
            "same_all": all_same / frames}


def heatmaps(summary: dict, title: str, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, name in zip(axes, ("nmi", "cramers_v"), ("normalised mutual information", "Cramer's V")):
        m = summary[key]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set(title=name, xlabel="MoE layer", ylabel="MoE layer", xticks=range(len(m)), yticks=range(len(m)))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{title}: dependency of top-1 expert choices ({summary['frames']} frames)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def utterance_map(choices: torch.Tensor, num_experts: int, step_s: float, title: str, path: Path):
    fig, ax = plt.subplots(figsize=(max(6, choices.shape[1] / 12), 1 + 0.5 * choices.shape[0]))
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    im = ax.imshow(choices.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5,
                   vmax=num_experts - 0.5, extent=(0, choices.shape[1] * step_s, choices.shape[0] - 0.5, -0.5))
    ax.set(xlabel="time (s)", ylabel="MoE layer", title=title, yticks=range(choices.shape[0]))
    fig.colorbar(im, ax=ax, ticks=range(num_experts), label="expert")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by tools/consolidate_checkpoint.py")
    p.add_argument("--manifest", action="append", required=True, help="dev manifest (repeatable)")
    p.add_argument("--out", required=True, help="folder for routing.json, dependency.png, utterance.png")
    p.add_argument("--utterance", type=int, default=0, help="index (in manifest order) of the mapped utterance")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_frames", type=int, default=None,
                   help="padded 10 ms frames per batch (default: one rank's micro-batch of the run; "
                        "no route is dropped, so it changes no result)")
    args = p.parse_args(argv)
    try:
        recognizer = Recognizer(args.model, args.device)
        utts = read_sources(args.manifest, [], float("inf"), strict=False)[0]
        if not 0 <= args.utterance < len(utts):
            raise DataError(f"--utterance {args.utterance}: the manifests hold {len(utts)} usable utterances")
        flat, per_utt, entropy = collect(recognizer, utts, args.max_frames)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.utterance not in per_utt:
        print(f"error: utterance {args.utterance} ({utts[args.utterance].audio}) could not be read", file=sys.stderr)
        return 2
    moe, model = recognizer.project.moe, recognizer.project.model
    summary = {**summarise(flat, entropy, moe.num_experts), **structure(per_utt)}
    choices = torch.stack(per_utt[args.utterance])
    title = f"{moe.mode}, {moe.num_experts} experts"
    summary.update(model=str(Path(args.model).resolve()), mode=moe.mode, num_experts=moe.num_experts,
                   utterance={"audio": utts[args.utterance].audio, "choices": choices.tolist()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(summary, indent=1))
    heatmaps(summary, title, out / "dependency.png")
    name = Path(utts[args.utterance].audio).name
    utterance_map(choices, moe.num_experts, model.frame_stacking * 0.01, f"{title}: {name}", out / "utterance.png")
    for i, layer in enumerate(summary["layers"]):
        print(f"MoE layer {i}: usage [{' '.join(f'{u:.2f}' for u in layer['usage'])}] router entropy "
              f"{layer['router_entropy']:.3f} usage entropy {layer['usage_entropy']:.3f}")
    adjacent = [summary["nmi"][i][i + 1] for i in range(len(flat) - 1)]
    print(f"adjacent-layer NMI {' '.join(f'{x:.3f}' for x in adjacent)}; {summary['frames']} frames; wrote {out}")
    print(f"mean run of one expert (frames) per layer {' '.join(f'{x:.2f}' for x in summary['run_length'])}; same "
          f"expert index in adjacent layers {' '.join(f'{x:.3f}' for x in summary['same_adjacent'])}, in all "
          f"{summary['same_all']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
