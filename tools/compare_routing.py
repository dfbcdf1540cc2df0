"""The paper's experiment in one command: dense, switch and omni from one base config, K seeds each, every run
evaluated on every test set, and a report.

    python -m tools.compare_routing --config ds_configs/omni.json --seeds 1 2 3 --out runs/compare
    python -m tools.compare_routing ... --test clean=test_clean.jsonl --test other=test_other.jsonl --ood other \
        -- --train_manifest train.jsonl --dev_manifest dev.jsonl      # after --: flags of every training run

On a SLURM cluster, one job per (mode, seed), then the report:

    python -m tools.compare_routing plan --config ds_configs/paper/omni_8x84m.json --seeds 1 2 3 --out runs/cmp
    sbatch --array=0-8 slurm/compare.sh runs/cmp --train_manifest train.jsonl --dev_manifest dev.jsonl
    python -m tools.compare_routing report --out runs/cmp --test ...

Run ``MODE-seedS`` is the base config with ``moe.mode`` and ``run.seed`` set and nothing else: the same active
parameters per frame (top-1: one expert shaped like the dense FFN), and per seed the same data order in every
mode. Locally the runs go one after another through DeepSpeed's launcher; a finished run is not trained again
and an interrupted one resumes (the trainer's own resume). Each run is consolidated and scored with
``tools/evaluate.py``'s scoring. The report (``report.md``, ``curves.png``, ``routing.png``, ``routing-MODE/``):
per test set and over the OOD sets, WER and CER as mean +- standard deviation over seeds; the relative WER change
of omni vs dense and vs switch (the paper's -11.2% and -8.2%), and paired: each seed's difference and a bootstrap
over utterances and seeds with its 95% interval and the probability that omni is better (``paired_bootstrap``);
training-loss curves; per-layer expert load and
adjacent-layer NMI per mode at the last evaluation; one utterance's experts, time x layer, under switch and omni.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tools.analyze_routing import main as analyze  # noqa: E402
from tools.evaluate import named, score  # noqa: E402
from tools.paired_bootstrap import RESAMPLES, Paired, paired_bootstrap  # noqa: E402
from tools.plot_runs import read_metrics  # noqa: E402
from trainer.config import SECTION, ConfigError, load_config  # noqa: E402
from trainer.data.corpus import OOD_SUITE  # noqa: E402
from trainer.data.sources import read_test_set  # noqa: E402
from trainer.export import consolidate  # noqa: E402
from trainer.inference import Recognizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("dense", "switch", "omni")
TASKS = "tasks.txt"  # one "config output_dir" line per run, in array-index order


def plan(config: str, modes: list[str], seeds: list[int], out: Path) -> list[tuple[str, Path, Path]]:
    """Write one config per (mode, seed) and the task list; return [(name, config, run folder)]. Each run
    writes into its own folder, its DeepSpeed monitors included (TensorBoard, CSV: inside the run folder;
    W&B: its own job name)."""
    load_config(config)  # a bad base config is an error before anything is written
    base = json.loads(Path(config).read_text())
    (out / "configs").mkdir(parents=True, exist_ok=True)
    tasks = []
    for seed in seeds:
        for mode in modes:
            name = f"{mode}-seed{seed}"
            cfg = json.loads(json.dumps(base))
            section = cfg.setdefault(SECTION, {})
            section.setdefault("moe", {})["mode"] = mode
            section.setdefault("run", {}).update(seed=seed, output_dir=str(out / "runs" / name))
            for monitor in ("tensorboard", "csv_monitor", "wandb"):  # DeepSpeed's monitors: one place per run
                if cfg.get(monitor, {}).get("enabled"):
                    cfg[monitor].update(job_name=name, **({} if monitor == "wandb" else
                                                          {"output_path": str(out / "runs" / name / monitor)}))
            path = out / "configs" / f"{name}.json"
            path.write_text(json.dumps(cfg, indent=1))
            tasks.append((name, path, out / "runs" / name))
    (out / TASKS).write_text("".join(f"{c} {r}\n" for _, c, r in tasks))
    return tasks


def read_tasks(out: Path) -> list[tuple[str, Path, Path]]:
    if not (out / TASKS).exists():
        raise ConfigError(f"{out}: no {TASKS}; run 'plan' (or the local default) first")
    rows = [line.split() for line in (out / TASKS).read_text().splitlines() if line.strip()]
    return [(Path(run).name, Path(cfg), Path(run)) for cfg, run in rows]


def finished(run: Path) -> bool:
    """results.json is written once, at the end of a run that reached run.max_steps."""
    return (run / "results.json").exists()


def train(name: str, config: Path, run: Path, ranks: int, trainer_args: list[str]) -> int:
    if finished(run):
        print(f"{name}: finished, not trained again", file=sys.stderr)
        return 0
    print(f"{name}: training{' (resuming)' if (run / 'checkpoints').exists() else ''}", file=sys.stderr)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "trainer/main.py",
           "--deepspeed_config", str(config), *trainer_args]
    return subprocess.run(cmd, cwd=ROOT).returncode


def evaluate(run: Path, sets: dict, device: str) -> dict:
    """{test set: {"wer", "cer", ...}} of a finished run's newest checkpoint (consolidated once, kept)."""
    model = run / "model"
    if not (model / "config.json").exists():
        consolidate(str(run), str(model))
    recognizer = Recognizer(str(model), device)
    return {name: score(recognizer, utts, None) for name, utts in sets.items()}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def seeds_of(results: dict, mode: str) -> list[dict]:
    return [r for name, r in sorted(results.items()) if name.split("-seed")[0] == mode]


def error_table(results: dict, modes: list[str], sets: list[str], ood: list[str]) -> list[str]:
    """Markdown rows: a WER and a CER column per set and over the OOD sets, mean ± sd over seeds."""
    columns = sets + (["OOD average"] if ood else [])

    def rate(r: dict, col: str, metric: str) -> float:
        if col == "OOD average":
            return statistics.mean(r[s][metric] for s in ood)
        return r[col][metric]

    rows = ["| mode | seeds | " + " | ".join(f"{c} {m.upper()}" for c in columns for m in ("wer", "cer")) + " |",
            "|---|---|" + "---|" * (2 * len(columns))]
    for mode in modes:
        runs = seeds_of(results, mode)
        cells = [mean_sd([rate(r, c, m) for r in runs]) for c in columns for m in ("wer", "cer")]
        rows.append(f"| {mode} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


def relative_change(results: dict, modes: list[str], sets: list[str], ood: list[str]) -> list[str]:
    """Relative WER change of omni vs dense and vs switch, on seed means (the paper's headline metric)."""
    if "omni" not in modes:
        return []
    columns = sets + (["OOD average"] if ood else [])

    def wer(mode: str, col: str) -> float:
        runs = seeds_of(results, mode)
        pick = (lambda r: statistics.mean(r[s]["wer"] for s in ood)) if col == "OOD average" else \
            (lambda r: r[col]["wer"])
        return statistics.mean(pick(r) for r in runs)

    rows = ["| relative WER change | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for other in [m for m in ("dense", "switch") if m in modes]:
        cells = [f"{100 * (wer('omni', c) - wer(other, c)) / wer(other, c):+.1f}%" for c in columns]
        rows.append(f"| omni vs {other} | " + " | ".join(cells) + " |")
    return rows


def seed_of(name: str) -> int:
    return int(name.split("-seed")[1])


def paired(results: dict, mode: str, other: str, sets: list[str]) -> Paired:
    """``mode`` vs ``other`` over ``sets`` (their WERs averaged), paired by seed, bootstrapped over utterances."""
    seeds = sorted({seed_of(n) for n in results if n.startswith(mode + "-")}
                   & {seed_of(n) for n in results if n.startswith(other + "-")})
    runs = {m: [results[f"{m}-seed{s}"] for s in seeds] for m in (mode, other)}
    return paired_bootstrap([([r[t]["utterance_errors"] for r in runs[mode]],
                              [r[t]["utterance_errors"] for r in runs[other]]) for t in sets])


def paired_rows(results: dict, modes: list[str], sets: list[str], ood: list[str]) -> list[str]:
    """Omni against each other mode, per set and on the OOD average: the WER difference in points (negative:
    omni better), its 95% interval from the paired bootstrap over utterances (pooled over seeds), the
    probability that omni is better, each seed's difference, "separated" only where that interval excludes
    zero, and the t-interval over the seeds' differences (how much a new seed would move the mean)."""
    if "omni" not in modes:
        return []
    rows = ["| omni vs | set | WER difference (points) | relative | 95% interval | P(omni better) | per seed | "
            "separated | over seeds (t, 95%) |", "|---|---|---|---|---|---|---|---|---|"]
    columns = [(name, [name]) for name in sets] + ([("OOD average", ood)] if ood else [])
    for other in [m for m in ("switch", "dense") if m in modes]:
        for name, members in columns:
            r = paired(results, "omni", other, members)
            rows.append(f"| {other} | {name} | {r.difference:+.2f} | {100 * r.relative:+.1f}% | "
                        f"[{r.low:+.2f}, {r.high:+.2f}] | {r.p_better:.3f} | "
                        f"{' '.join(f'{d:+.1f}' for d in r.per_seed)} | {'yes' if r.separated else 'no'} | "
                        + (f"[{r.seed_interval[0]:+.2f}, {r.seed_interval[1]:+.2f}] |" if r.seed_interval else "- |"))
    return rows


def last_eval(run: Path) -> dict:
    evals = [r for r in read_metrics(run) if r.get("kind") == "eval"]
    return evals[-1] if evals else {}


def routing_rows(runs: dict, modes: list[str]) -> list[str]:
    rows = ["| mode | busiest expert's load per MoE layer | adjacent-layer NMI |", "|---|---|---|"]
    for mode in modes:
        evals = [last_eval(r) for name, r in sorted(runs.items()) if name.split("-seed")[0] == mode]
        layers = [e["routing"]["layers"] for e in evals if e.get("routing", {}).get("layers")]
        if not layers:
            continue
        busiest = [statistics.mean(max(run[i]["load"]) for run in layers) for i in range(len(layers[0]))]
        nmi = [statistics.mean(e["routing"]["adjacent_nmi"][i] for e in evals) for i in
               range(len(evals[0]["routing"]["adjacent_nmi"]))]
        rows.append(f"| {mode} | {' '.join(f'{x:.2f}' for x in busiest)} | {' '.join(f'{x:.2f}' for x in nmi)} |")
    return rows


def loss_by_step(runs: list[Path]) -> tuple[list[int], list[list[float]]]:
    """(the steps every run logged, [per step: each run's training CTC])."""
    logged = [{r["step"]: r["ctc"] for r in read_metrics(run) if r.get("kind") == "train"} for run in runs]
    steps = sorted(set.intersection(*(set(x) for x in logged))) if logged else []
    return steps, [[x[s] for x in logged] for s in steps]


def plots(runs: dict, modes: list[str], out: Path):
    """curves.png: training CTC per mode, the mean over seeds with their range shaded; routing.png: the busiest
    expert's load per layer on a 0-1 axis with the even share 1/E marked, and adjacent-layer NMI."""
    colours = dict(zip(MODES, ("tab:gray", "tab:blue", "tab:red")))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in modes:
        members = [r for n, r in sorted(runs.items()) if n.split("-seed")[0] == mode]
        steps, values = loss_by_step(members)
        if steps:
            ax.plot(steps, [statistics.mean(v) for v in values], color=colours[mode],
                    label=f"{mode} (mean of {len(members)} seed{'s' * (len(members) > 1)})")
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colours[mode],
                            alpha=0.2, linewidth=0)
    ax.set(title="training CTC loss per frame (shaded: range over seeds)", xlabel="step", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    experts = 0
    for mode in [m for m in modes if m != "dense"]:
        evals = [last_eval(r) for n, r in runs.items() if n.split("-seed")[0] == mode and last_eval(r)]
        if not evals:
            continue
        layers = evals[0]["routing"]["layers"]
        experts = len(layers[0]["load"])
        busiest = [statistics.mean(max(e["routing"]["layers"][i]["load"]) for e in evals) for i in range(len(layers))]
        nmi = [statistics.mean(e["routing"]["adjacent_nmi"][i] for e in evals)
               for i in range(len(evals[0]["routing"]["adjacent_nmi"]))]
        axes[0].plot(range(len(busiest)), busiest, marker="o", color=colours[mode], label=mode)
        axes[1].plot(range(len(nmi)), nmi, marker="o", color=colours[mode], label=mode)
        axes[0].set_xticks(range(len(busiest)))
        axes[1].set_xticks(range(len(nmi)), [f"{i}-{i + 1}" for i in range(len(nmi))])
    if experts:
        axes[0].axhline(1 / experts, color="black", linestyle="--", linewidth=1, label=f"even share 1/{experts}")
    axes[0].set(title="busiest expert's load fraction", xlabel="MoE layer", ylim=(0, 1))
    axes[1].set(title="adjacent-layer NMI of expert choices", xlabel="MoE layers", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "routing.png", dpi=120)
    plt.close(fig)


def routing_pictures(runs: dict, modes: list[str], manifest: str, out: Path, device: str) -> list[tuple[str, str]]:
    """[(mode, picture)]: the first utterance of ``manifest``, time x MoE layer, coloured by the expert each frame
    takes, under the first seed of switch and of omni (``tools/analyze_routing.py``'s map, beside its dependency
    heatmaps in routing-MODE/): the paper's qualitative figure."""
    pictures = []
    for mode in [m for m in ("switch", "omni") if m in modes]:
        run = next(r for n, r in sorted(runs.items()) if n.split("-seed")[0] == mode)
        args = ["--model", str(run / "model"), "--manifest", manifest, "--out", str(out / f"routing-{mode}"),
                "--device", device]
        if analyze(args) == 0:
            pictures.append((mode, f"routing-{mode}/utterance.png"))
    return pictures


def structure_rows(modes: list[str], out: Path) -> list[str]:
    """Markdown rows of each mode's routing structure from its ``routing-MODE/routing.json``."""
    rows = ["| mode | mean run of one expert (frames), per layer | same index, adjacent layers | same in all layers | "
            "adjacent-layer NMI |", "|---|---|---|---|---|"]
    for mode in modes:
        r = json.loads((out / f"routing-{mode}" / "routing.json").read_text())
        nmi = [r["nmi"][i][i + 1] for i in range(len(r["nmi"]) - 1)]
        rows.append(f"| {mode} | {' '.join(f'{x:.2f}' for x in r['run_length'])} | "
                    f"{' '.join(f'{x:.3f}' for x in r['same_adjacent'])} | {r['same_all']:.3f} | "
                    f"{' '.join(f'{x:.2f}' for x in nmi)} |")
    return rows


def report(out: Path, tests: list[tuple[str, str]], ood: list[str], device: str, cuts_root: str = "") -> str:
    """Evaluate every finished run on every test set and write report.md and the PNGs; return the Markdown."""
    tasks = read_tasks(out)
    runs = {name: run for name, _, run in tasks if finished(run)}
    if not runs:
        raise ConfigError(f"{out}: no finished run to report on")
    sets = {name: read_test_set(path, cuts_root) for name, path in tests}
    results = {}
    for name, run in sorted(runs.items()):
        cached = run / "test_results.json"
        old = json.loads(cached.read_text()) if cached.exists() else {}
        if set(old) == set(sets) and all("utterance_errors" in r for r in old.values()):
            results[name] = old
        else:
            results[name] = evaluate(run, sets, device)
            cached.write_text(json.dumps(results[name], indent=1))
    modes = [m for m in MODES if any(n.split("-seed")[0] == m for n in runs)]
    missing = sorted(n for n, _, _ in tasks if n not in runs)
    lines = ["# Dense vs Switch vs Omni-Router", "",
             f"{len(runs)} finished runs ({', '.join(sorted(runs))})"
             + (f"; not finished, left out: {', '.join(missing)}" if missing else "") + ".",
             f"OOD sets: {', '.join(ood) if ood else 'none given'}. WER and CER in %, mean ± standard deviation "
             "over seeds.", "", *error_table(results, modes, list(sets), ood), "",
             *relative_change(results, modes, list(sets), ood), "",
             "Paired: per seed the modes share data order and draws; a bootstrap over the test utterances (the same "
             f"resample for every seed, {RESAMPLES} resamples) gives the interval of the seed-mean difference; the "
             "last column is the t-interval over the seeds' differences.", "",
             *paired_rows(results, modes, list(sets), ood), "", "Routing at the last evaluation (dev sets):", "",
             *routing_rows(runs, modes), "", "![training loss](curves.png) ![routing](routing.png)", ""]
    mapped = next(((name, path) for name, path in tests if path.endswith(".jsonl")), None)  # a manifest
    pictures = routing_pictures(runs, modes, mapped[1], out, device) if mapped else []
    if pictures:
        lines += [f"Structure on {mapped[0]} (`tools/analyze_routing.py`, first seed of each mode): the mean run of "
                  "frames that keep one expert in a layer, the share of frames whose expert has the same index in "
                  "adjacent layers and in all layers (only omni's layers index experts by one router), and the "
                  "adjacent-layer NMI:", "", *structure_rows([mode for mode, _ in pictures], out), "",
                  f"One utterance of {mapped[0]}, the expert of every frame (time x MoE layer), first seed of each "
                  "mode:", "",
                  " ".join(f"![{mode}]({picture})" for mode, picture in pictures), ""]
    plots(runs, modes, out)
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def default_tests(config: str) -> list[tuple[str, str]]:
    """The embedded corpus's held-out sets: test (in-domain), test_ood (other voices and text) and the
    out-of-domain suite (``trainer.data.corpus.OOD_SUITE``: one condition changed in each)."""
    _, project = load_config(config)
    corpus = Path(project.data.corpus.dir).expanduser()
    return [(name, str(corpus / f"{name}.jsonl")) for name in ("test", "test_ood", *OOD_SUITE)]


def ood_sets(tests: list[tuple[str, str]], defaults: bool) -> list[str]:
    """The sets averaged as out-of-domain when none are named: the suite's seven one-change sets with the embedded
    corpus's default tests (test_ood, which changes voices and text at once, is reported beside them), else every
    set whose name holds "ood"."""
    return list(OOD_SUITE) if defaults else [name for name, _ in tests if "ood" in name]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", choices=["all", "plan", "report"], default="all",
                   help="all (default): plan, train one after another, report; plan: configs and the task list "
                        "for slurm/compare.sh; report: evaluate the finished runs and write the report")
    p.add_argument("--config", default="ds_configs/omni.json", help="the base config (its moe.mode is replaced)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", required=True, help="folder of the runs, their configs and the report")
    p.add_argument("--test", action="append", type=named, default=None,
                   help="[NAME=]manifest or Lhotse cut set (repeatable); default: the embedded corpus's test, "
                        "test_ood and out-of-domain suite")
    p.add_argument("--cuts_root", default="", help="folder relative audio paths of cut sets start from")
    p.add_argument("--ood", nargs="*", default=None, help="test sets averaged as out-of-domain (default: the "
                                                         "suite's with the default tests, else names containing "
                                                         "'ood')")
    p.add_argument("--num_gpus", type=int, default=1, help="ranks per local run")
    p.add_argument("--device", default="cpu", help="for evaluation")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, trainer_args = p.parse_args(argv[:cut]), argv[cut + 1:]
    out = Path(args.out)
    try:
        if args.stage in ("all", "plan"):
            tasks = plan(args.config, args.modes, args.seeds, out)
            print(f"{len(tasks)} runs planned in {out / TASKS}", file=sys.stderr)
        if args.stage == "all":
            for name, config, run in tasks:
                code = train(name, config, run, args.num_gpus, trainer_args)
                if code != 0:
                    print(f"error: {name} exited {code}; run the command again to resume it", file=sys.stderr)
                    return 1
        if args.stage in ("all", "report"):
            tests = args.test or default_tests(args.config if args.stage == "all" else str(read_tasks(out)[0][1]))
            ood = args.ood if args.ood is not None else ood_sets(tests, defaults=args.test is None)
            print(report(out, tests, ood, args.device, args.cuts_root))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
