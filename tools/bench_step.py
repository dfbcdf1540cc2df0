"""Step time and frames per second of dense, switch and omni at matched active sizes.

    python tools/bench_step.py                                  # one process (CPU or one GPU)
    deepspeed --num_gpus 2 tools/bench_step.py --ep auto        # expert parallelism over two ranks

Synthetic log-mel batches of fixed shape isolate the model step (forward, backward, optimizer) from data loading.
Beside each step time: the host syncs of one forward+backward (``trainer.runtime.host_syncs``). Modes are timed in
short interleaved rounds (the order rotates every round), so that drift of the machine hits all of them alike: a
step time is the median over rounds of the mean step in a round, and a ratio is the median over rounds of the ratio
within a round (paired, so a slow spell of the machine cancels), with the quartiles of those per-round ratios beside
it.
"""
import argparse
import os
import statistics
import time

import torch

from trainer.config import load_config, with_overrides
from trainer.engine import build_engine, build_model, step_loss
from trainer.plan import plan_run
from trainer.runtime import distributed
from trainer.runtime.host_syncs import count_host_syncs


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ds_configs/omni.json", help="sizes and DeepSpeed keys come from here")
    p.add_argument("--modes", default="dense,switch,omni")
    p.add_argument("--frames", type=int, default=6000, help="input frames (10 ms) per rank per step")
    p.add_argument("--utt_frames", type=int, default=500, help="frames per utterance")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    p.add_argument("--ep", default="auto", help="ep_size ('auto' or an int)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--dropless", action="store_true", help="switch and omni in dropless mode")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def single_process_env():
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533").items():
        os.environ.setdefault(k, v)


def make_batch(args, n_mels, vocab):
    n = max(1, args.frames // args.utt_frames)
    g = torch.Generator().manual_seed(distributed.rank())
    return {"feats": torch.randn(n, args.utt_frames, n_mels, generator=g),
            "lengths": torch.full((n,), args.utt_frames),
            "targets": torch.randint(1, vocab, (n, args.utt_frames // 20), generator=g),
            "target_lengths": torch.full((n,), args.utt_frames // 20), "weight": torch.ones(n)}


def step_syncs(engine, plan, batch) -> int:
    """Host syncs of one training forward+backward (``trainer.runtime.host_syncs``); the step is also a warm-up."""
    engine.train()
    with count_host_syncs() as log:
        loss, _, _ = step_loss(engine, plan, batch)
        engine.backward(loss.total)
    engine.step()
    return log.count


def main():
    args = parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds: at least 2 (the ratios' quartiles need two rounds)")
    single_process_env()
    distributed.init()
    ds, base = load_config(args.config)
    if args.bf16:
        ds["bf16"] = {"enabled": True}
    ep = args.ep if args.ep == "auto" else int(args.ep)
    engines = {}
    for mode in args.modes.split(","):
        project = with_overrides(base, {"moe.mode": mode, "moe.ep_size": ep, "moe.dropless": args.dropless,
                                        "data.batch_frames": args.frames * distributed.world(),
                                        "data.max_frames_per_rank": 0})
        plan = plan_run(ds, project, distributed.rank(), distributed.world(), distributed.device())
        engines[mode] = (build_engine(plan, build_model(plan, 256)), plan)
    dev = next(iter(engines.values()))[0].device  # features and targets on the device, lengths on the host
    batch = {k: v.to(dev) if k in ("feats", "targets") else v for k, v in make_batch(args, base.model.n_mels,
                                                                                    256).items()}
    syncs = {m: step_syncs(engine, plan, batch) for m, (engine, plan) in engines.items()}
    times = {m: [] for m in engines}
    order = list(engines)
    for r in range(args.rounds + 1):  # round 0 warms up
        for mode in order[r % len(order):] + order[:r % len(order)]:  # rotate: no mode always runs last
            engine, plan = engines[mode]
            engine.train()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                loss, _, _ = step_loss(engine, plan, batch)
                engine.backward(loss.total)
                engine.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r:
                times[mode].append((time.perf_counter() - t0) / args.steps)
    if distributed.rank() == 0:
        world = distributed.world()
        frames = batch["lengths"].sum().item() * world
        print(f"{world} rank(s), {frames} input frames per step, device {engines[mode][0].device}, "
              f"{args.rounds} rounds x {args.steps} steps")
        print(f"{'mode':8} {'params':>12} {'ms/step':>9} {'spread ms':>10} {'frames/s':>10} {'host syncs':>10}")
        for mode, (engine, _) in engines.items():
            ms = statistics.median(times[mode]) * 1000
            spread = (max(times[mode]) - min(times[mode])) * 1000
            n = sum(p.numel() for p in engine.module.parameters())
            print(f"{mode:8} {n:>12,} {ms:9.1f} {spread:10.1f} {frames / ms * 1000:10,.0f} {syncs[mode]:>10}")
        for a, b in (("switch", "dense"), ("omni", "dense"), ("omni", "switch")):
            if a in times and b in times:
                ratios = [x / y for x, y in zip(times[a], times[b])]
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                print(f"{a}/{b} step-time ratio: {statistics.median(ratios):.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
