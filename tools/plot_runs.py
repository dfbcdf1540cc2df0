"""Training and dev curves of several runs in one PNG, from each run's metrics.jsonl.

    python tools/plot_runs.py runs/dense runs/switch runs/omni --out curves.png
    python tools/plot_runs.py dense=runs/dense omni=runs/omni --out curves.png

Four panels against the step: training CTC loss, dev loss, dev WER and dev CER (unweighted means over dev sets).
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("train", "ctc", "training CTC loss"), ("eval", "mean_loss", "dev loss"),
          ("eval", "mean_wer", "dev WER (%)"), ("eval", "mean_cer", "dev CER (%)")]


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics file; a line that is not JSON is an error naming the file and line."""
    path = run / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run}: no metrics.jsonl (not a run folder of this trainer)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="[NAME=]run folder (the trainer's --output_dir)")
    p.add_argument("--out", required=True, help="PNG file")
    args = p.parse_args(argv)
    runs = {}
    try:
        for value in args.runs:
            name, sep, path = value.partition("=")
            name, path = (name, path) if sep else (Path(value).name, value)
            runs[name] = read_metrics(Path(path))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    for ax, (kind, key, title) in zip(axes, PANELS):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if kind == "eval" else None, markersize=3, label=name)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: {', '.join(f'{n} ({len(r)} rows)' for n, r in runs.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
