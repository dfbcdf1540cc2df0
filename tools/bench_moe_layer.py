"""MoE layer forward + backward against a dense FFN of equal active FLOPs, ratios measured in one run.

    python tools/bench_moe_layer.py                     # E in {4, 8, 16}, tokens in {2k, 8k, 16k}, 2 threads
    python tools/bench_moe_layer.py --device cuda --dtype bf16

Top-1 routing, d_model 256, FFN 1024 (the dense FFN and every expert). Rows: DeepSpeed's stock MoE layer
(``TopKGate`` and its loop over experts, capacity factor 1), this trainer's capacity mode (its gate and the
grouped expert matmul, capacity factor 1) and its dropless mode. Each variant is timed in short interleaved
rounds (the order rotates); a ratio is the median over rounds of the variant's mean divided by the dense FFN's
mean in the same round (paired, so a slow spell of the machine cancels), and the dense time is the median of
its per-round means.
"""
import argparse
import os
import statistics
import time

import torch

from trainer.config import MoEConfig
from trainer.model.ctc import MoEFeedForward, feed_forward, make_gate
from trainer.runtime import distributed


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="4,8,16")
    p.add_argument("--tokens", default="2048,8192,16384")
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--steps", type=int, default=2, help="timed forward+backward passes per variant per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return p.parse_args()


def variants(E: int, args) -> dict:
    """name -> callable(x [1, T, D], real [1, T]) -> output, each a fresh module of the same sizes."""
    from deepspeed.moe.layer import MoE
    d, f = args.d_model, args.ffn
    stock = MoE(d, feed_forward(d, f), num_experts=E, ep_size=1, k=1, capacity_factor=1.0, min_capacity=0,
                use_rts=False)
    stock.set_deepspeed_parallelism()
    mine = {}
    for dropless in (False, True):
        cfg = MoEConfig(mode="switch", num_experts=E, capacity_factor=1.0, min_capacity=0, dropless=dropless)
        layer = MoEFeedForward(d, f, cfg, 1, 0, make_gate(d, cfg), init_key="bench")
        layer.moe.set_deepspeed_parallelism()
        mine["dropless" if dropless else "capacity"] = layer
    dense = feed_forward(d, f)
    modules = {"dense": dense, "deepspeed": stock, **mine}
    for m in modules.values():
        m.to(args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32).train()
    return {"dense": lambda x, real: dense(x),
            "deepspeed": lambda x, real: stock(x)[0],
            "capacity": lambda x, real: mine["capacity"](x, real, int(real.sum()))[0],
            "dropless": lambda x, real: mine["dropless"](x, real, 0)[0]}


def time_variants(fns: dict, T: int, args) -> dict:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(1, T, args.d_model, device=args.device, dtype=dtype, requires_grad=True)
    real = torch.ones(1, T, dtype=torch.bool, device=args.device)
    names, times = list(fns), {n: [] for n in fns}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fns[name](x, real).float().square().mean().backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
    ratios = {n: statistics.median(a / b for a, b in zip(t, times["dense"])) for n, t in times.items()}
    return statistics.median(times["dense"]), ratios


def main():
    args = parse_args()
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29537").items():
        os.environ.setdefault(k, v)
    torch.set_num_threads(args.threads)
    distributed.init()
    torch.manual_seed(0)
    print(f"top-1, d_model {args.d_model}, FFN {args.ffn}, {args.dtype} on {args.device}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} forward+backward; ratio = MoE layer / dense FFN")
    print(f"{'E':>3} {'tokens':>7} {'dense ms':>9} {'deepspeed':>10} {'capacity':>9} {'dropless':>9}")
    for E in [int(e) for e in args.experts.split(",")]:
        fns = variants(E, args)
        for T in [int(t) for t in args.tokens.split(",")]:
            dense_s, ratio = time_variants(fns, T, args)
            print(f"{E:>3} {T:>7} {dense_s * 1000:9.1f} " + " ".join(
                f"{ratio[n]:>{w}.2f}x" for n, w in (("deepspeed", 9), ("capacity", 8), ("dropless", 8))))


if __name__ == "__main__":
    main()
