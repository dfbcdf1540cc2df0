"""Will this run be fast? About a minute on the real allocation answers it, before the job waits in a queue.

    deepspeed [--num_gpus N] tools/preflight.py --deepspeed_config CONFIG [trainer/main.py's data flags, --set ...]
    python tools/preflight.py --dry_run --gpus N [--gpu H100] --deepspeed_config CONFIG    # no GPU needed

``--dry_run`` answers the memory and sync questions on any machine, before an allocation: the configured step
on rank 0 of N GPUs, on meta tensors (``tools/dry_run.py``).

or under srun, one task per GPU, with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set as
slurm/train.sh sets them. The flags are trainer/main.py's (``trainer.start``: one start path; the
tool's own are listed by --help), and so is the start-up: the same checks, the same data (the embedded corpus
when no data is given; the tokenizer in the output folder, which the run then reuses; no checkpoint, no lock),
the same model and DeepSpeed engine. Rank 0 prints:

1. devices: each rank's accelerator, backend, GPU and CPU cores, and whether it was given GPUs that torch cannot
   use (``distributed.missing_gpus``: the run itself would refuse to start);
2. collectives at the step's sizes, timed after a warm-up (the slowest rank's mean over repetitions): the
   all-reduce of the dense gradient (non-expert parameters, in the engine's communication dtype) and the MoE
   all-to-all of one micro-batch's routed frames (dropless: uneven splits; capacity mode: the capacity buffer),
   with bus bandwidth as nccl-tests defines it (all-reduce 2(n-1)/n x bytes / time, all-to-all (n-1)/n x bytes /
   time), which is comparable with the link's rated speed whatever n;
3. the step: optimizer steps of the configured model at the configured batch on a synthetic batch (utterances
   of --utt_seconds of noise through the dataset's own feature path, random targets), as ``Trainer.train_step``
   makes them; the median step time, TFLOP/s and MFU (``model_flops``), peak memory, and the host syncs of one
   forward+backward (``trainer.runtime.host_syncs``) against the mode's budget, and on CUDA every sync the driver
   sees in one forward, backward and optimizer step (``torch.cuda.set_sync_debug_mode``: DeepSpeed's and the
   kernels' own included);
4. the loader: seconds of audio one loader process delivers on this rank's training batches, against what the
   step consumes, so the loader processes a rank needs against ``data.num_workers``;
5. verdicts.
"""
import argparse
import math
import os
import resource
import socket
import statistics
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param

from tools import gpu_specs
from tools.dry_run import FRAMES_PER_S, dry_run, sync_budget, synthetic_batch
from trainer.config import ModelConfig, MoEConfig
from trainer.data.batches import epoch_batches, loader
from trainer.engine import step_loss
from trainer.model.ctc import moe_blocks
from trainer.model.routing import train_capacity
from trainer.runtime import distributed
from trainer.runtime.exits import RunError
from trainer.runtime.host_syncs import count_host_syncs, cuda_syncs
from trainer.runtime.stopping import launcher_chain
from trainer.start import load_project, parse_args as start_args, start



def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(the tool's flags, trainer/main.py's flags): the tool's are taken out first, the rest is the trainer's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every other flag is trainer/main.py's (python trainer/main.py --help).")
    p.add_argument("--utt_seconds", type=float, default=15.0, help="utterance length of the synthetic batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (the median is reported)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of each collective")
    p.add_argument("--loader_seconds", type=float, default=20.0, help="how long the loader is read")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak (default: tools/gpu_specs.py, by the name torch reports)")
    p.add_argument("--dry_run", action="store_true", help="no GPU needed: the step on meta tensors (tools/dry_run.py)")
    p.add_argument("--gpus", type=int, default=1, help="with --dry_run: the GPUs of the run")
    p.add_argument("--gpu", default="H100", help="with --dry_run: the GPU (a name torch reports, or H100, H200, ...)")
    own, rest = p.parse_known_args(argv)
    return own, start_args(rest)


def sync():
    """The accelerator's queue drained, so that the clock measures work done, not work queued."""
    deepspeed.get_accelerator().synchronize()


def slowest(value: float) -> float:
    """The largest of every rank's ``value`` (a collective): the slowest rank sets the pace of all."""
    return max(distributed.gather_objects(value))


def rank_ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2,5'."""
    spans = []
    for r in sorted(ranks):
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


# -- 1. devices --------------------------------------------------------------------------------------------
def this_rank(missing: str) -> dict:
    """What this rank runs on: a GPU that is not what the allocation promised shows here first."""
    acc = deepspeed.get_accelerator()
    return {"host": socket.gethostname(), "device": str(distributed.device()), "kind": acc.device_name(),
            "backend": acc.communication_backend_name(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
            "cores": len(os.sched_getaffinity(0)), "missing": missing}


def report_devices(ranks: list[dict]):
    """One line per group of ranks alike (a 64-rank job prints one line per node, not 64)."""
    groups = {}
    for r, d in enumerate(ranks):
        key = (d["host"], d["kind"], d["backend"], d["gpu"], d["cores"], d["missing"])
        groups.setdefault(key, []).append(r)
    for (host, kind, backend, gpu, cores, missing), members in groups.items():
        print(f"{rank_ranges(members)} on {host}: {kind}{f' ({gpu})' if gpu else ''}, backend {backend}, "
              f"{cores} CPU cores each")
        if missing:
            print(f"  GPUs allocated but unusable: {missing}")


# -- 2. collectives ----------------------------------------------------------------------------------------
def timed_collective(fn, reps: int, warmup: int = 2) -> float:
    """Seconds per call of ``fn``, a collective every rank enters, on the slowest rank: the first calls set up
    connections (NCCL's communicators are made lazily), and the ranks start the timed calls together."""
    for _ in range(warmup):
        fn()
    sync()
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return slowest((time.perf_counter() - t0) / reps)


def all_reduce_time(nbytes: int, dtype: torch.dtype, reps: int) -> float:
    """The dense gradient's all-reduce, as ZeRO makes it: one buffer in the communication dtype.
    ``dist.all_reduce`` directly, not ``distributed.sum_over_ranks``: that one copies into float64 first, so
    it would move another number of bytes than the engine does."""
    buf = torch.zeros(nbytes // dtype.itemsize, dtype=dtype, device=distributed.device())
    return timed_collective(lambda: dist.all_reduce(buf), reps)


def a2a_splits(rows: int, ep_size: int, uneven: bool, seed: int) -> list[int]:
    """How this rank's ``rows`` routes split over the expert-parallel ranks: in dropless mode as a router
    might send them early in training (Dirichlet(1) shares, drawn per rank), in capacity mode in equal
    buffers."""
    if not uneven:
        return [rows // ep_size] * ep_size
    w = -torch.log(torch.rand(ep_size, generator=torch.Generator().manual_seed(seed)))
    splits = (w / w.sum() * rows).floor().long().tolist()
    splits[0] += rows - sum(splits)
    return splits


def all_to_all_time(rows: int, d_model: int, dtype: torch.dtype, uneven: bool, group, ep_size: int,
                    reps: int) -> float:
    """One MoE all-to-all (``distributed.all_to_all``, the call the dropless dispatch makes) of ``rows`` rows;
    the receive sizes come from the peers as in the trainer (``distributed.exchange_counts``)."""
    send = a2a_splits(rows, ep_size, uneven, seed=distributed.rank())
    recv = distributed.exchange_counts(torch.tensor(send).view(ep_size, 1), group).view(-1).tolist()
    x = torch.randn(rows, d_model, device=distributed.device()).to(dtype)
    return timed_collective(lambda: distributed.all_to_all(x, recv, send, group), reps)


def a2a_rows(project, encoder_frames: int) -> tuple[int, bool]:
    """(rows one rank sends per MoE all-to-all, whether the splits are uneven): dropless sends each routed
    frame's k routes; capacity mode sends the whole buffer, E experts x capacity (routing.train_capacity)."""
    moe = project.moe
    if moe.dropless:
        return encoder_frames * moe.top_k, True
    capacity = train_capacity(encoder_frames, moe.num_experts, moe.top_k, moe.capacity_factor, moe.min_capacity)
    return moe.num_experts * capacity, False


def bus_gbps(nbytes: float, seconds: float, n: int, factor) -> float:
    """nccl-tests' bus bandwidth: algorithm bandwidth (bytes / time) x the collective's factor for n ranks."""
    return nbytes / seconds * factor(n) / 1e9


# -- 3. the step -------------------------------------------------------------------------------------------
def model_flops(cfg: ModelConfig, moe: MoEConfig, utts: int, frames: int, vocab: int) -> float:
    """FLOPs of one training micro-batch of ``utts`` utterances of ``frames`` input frames each, counted as MFU
    counts them: the matrix products alone (norms, softmaxes, CTC and the optimizer left out), a multiply-add
    as 2 FLOPs, backward as twice forward (once for the input projection: the features need no gradient),
    expert FFNs for the k routes a frame takes (not capacity padding)::

        T' = ceil(frames / frame_stacking) encoder frames, N = utts x T'; D = d_model, F = ffn_dim,
        L blocks of which M MoE (moe_blocks), k = top_k, E = num_experts, V = vocab + 1 (blank)
        forward =  2 N (n_mels x frame_stacking) D          input projection
                 + L x 8 N D^2                              attention projections q, k, v, out
                 + L x 4 utts T'^2 D                        attention scores QK^T and their weighting of V
                 + (L - M) x 4 N D F  +  M x k x 4 N D F    dense FFN; k active experts per frame
                 + M x 2 N D E                              router (omni shares its weights, each layer runs it)
                 + 2 N D V                                  head
        training = 3 x forward - 2 N (n_mels x frame_stacking) D

    Attention is counted in full where causal (torch computes the masked scores too)."""
    T = -(-frames // cfg.frame_stacking)
    N, D, F, L = utts * T, cfg.d_model, cfg.ffn_dim, cfg.num_layers
    M = len(moe_blocks(cfg, moe))
    k, E = (moe.top_k, moe.num_experts) if M else (0, 0)
    frontend = 2 * N * cfg.n_mels * cfg.frame_stacking * D
    forward = (frontend + L * 8 * N * D * D + L * 4 * utts * T * T * D + (L - M) * 4 * N * D * F
               + M * k * 4 * N * D * F + M * 2 * N * D * E + 2 * N * D * (vocab + 1))
    return 3.0 * forward - frontend


def peak_tflops(gpu: str, half: bool, given) -> float | None:
    """The device's dense peak for the engine's precision: --peak_tflops, else the table; None if unknown."""
    return given or gpu_specs.peak_tflops(gpu, half)


def forward_backward(engine, plan, train_set, host_batch: dict):
    """One micro-batch as ``Trainer.train_step`` makes it, up to the optimizer: to the device (device-mode
    features are computed there), forward with the step's all-reduce, backward."""
    batch = train_set.on_device(host_batch, engine.device)
    loss, _, _ = step_loss(engine, plan, batch)
    engine.backward(loss.total)


def step_times(engine, plan, train_set, batch: dict, warmup: int, steps: int) -> list:
    """Seconds of each timed optimizer step (the plan's accumulation of micro-batches each), after ``warmup`` steps."""
    engine.train()
    times = []
    for s in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(plan.batch.accumulation):
            forward_backward(engine, plan, train_set, batch)
            engine.step()
        sync()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def peak_memory_gb(device: torch.device) -> tuple[float, str]:
    """(GB, what was measured): the accelerator's peak allocation, or on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9, "allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "max RSS"


# -- 4. the loader -----------------------------------------------------------------------------------------
def loader_rate(train_set, micro_frames: int, seed: int, seconds: float) -> tuple[float, float, int]:
    """(seconds of audio per second, seconds of audio per batch, batches) that one loader process (the rank
    itself, one thread, as a DataLoader worker runs) delivers of this rank's first training batches, read for
    about ``seconds``. A loader whose features are cached (small corpora) is faster from the second epoch on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batches = epoch_batches(train_set, micro_frames, seed, 0, distributed.rank(), distributed.world())
    audio, n, t0 = 0.0, 0, time.perf_counter()
    try:
        for batch in loader(train_set, batches, 0):
            audio += float((batch["lengths"] * (batch["weight"] > 0)).sum()) / FRAMES_PER_S
            n += 1
            if time.perf_counter() - t0 >= seconds:
                break
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    return (audio / elapsed if n else 0.0), (audio / n if n else 0.0), n


# -- 5. verdicts -------------------------------------------------------------------------------------------
def loader_verdict(needed: int, workers: int, demand: float, rate: float) -> str:
    """Whether the loader keeps up; with no workers the rank loads between steps, so loading adds to the step."""
    if workers == 0:
        return (f"loading runs in the rank between steps (data.num_workers 0): +{100 * demand / rate:.0f}% on "
                f"the step time; {needed} worker(s) per rank would hide it")
    if needed > workers:
        return f"data-bound: needs {needed} loader processes per rank, has {workers} (data.num_workers)"
    return f"the loader keeps up: needs {needed} loader process(es) per rank, has {workers}"


def main(argv=None) -> int:
    own, args = parse_args(argv)
    try:
        if own.dry_run:
            dry_run(own.gpus, own.gpu, *load_project(args))
            return 0
        missing = distributed.missing_gpus(bool(launcher_chain()))
        run = start(args, lock=False, refuse_cpu=False)  # the run's own start: its checks, data, model, engine
        results = measure(own, run.plan, run.engine, run.model, run.train_set, run.tokenizer.vocab_size, missing)
    except RunError as e:
        print(e.report(), file=sys.stderr)
        return e.status
    if distributed.rank() == 0:
        report(own, run.plan, run.engine, results)
    distributed.barrier()
    return 0


def measure(own, plan, engine, model, train_set, vocab: int, missing: str) -> dict:
    """Every measurement, on every rank (each section's collectives are entered by all); the figures of all
    ranks gathered, or their slowest."""
    project, split = plan.project, plan.batch
    r = {"devices": distributed.gather_objects(this_rank(missing)), "world": distributed.world()}
    comm_dtype = engine.communication_data_type
    dense = sum(p.numel() for p in model.parameters() if not is_moe_param(p)) * comm_dtype.itemsize
    r["all_reduce"] = (dense, comm_dtype, all_reduce_time(dense, comm_dtype, own.reps) if r["world"] > 1 else None)
    batch, B, T = synthetic_batch(train_set, split.micro_frames, own.utt_seconds, vocab,
                                  project.model.frame_stacking, seed=distributed.rank())
    r["batch"] = (B, T)
    routers = model.routers()
    if routers and plan.ep_size > 1:
        rows, uneven = a2a_rows(project, B * -(-T // project.model.frame_stacking))
        dtype = next(model.parameters()).dtype
        seconds = all_to_all_time(rows, project.model.d_model, dtype, uneven, routers[0].ep_group, plan.ep_size,
                                  own.reps)
        r["all_to_all"] = (rows * project.model.d_model * dtype.itemsize, dtype, uneven, seconds)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    times = step_times(engine, plan, train_set, batch, own.warmup, own.steps)
    r["step_s"] = slowest(statistics.median(times))
    with count_host_syncs(engine.device) as log:
        forward_backward(engine, plan, train_set, batch)
    engine.step()
    r["syncs"] = (log.count, log.summary())
    if engine.device.type == "cuda":
        with cuda_syncs() as driver:
            forward_backward(engine, plan, train_set, batch)
            engine.step()
        r["cuda_syncs"] = (driver.count, driver.summary())
    gb, what = peak_memory_gb(engine.device)
    r["memory"] = (slowest(gb), what)
    r["loader"] = distributed.gather_objects(loader_rate(train_set, split.micro_frames, project.run.seed,
                                                         own.loader_seconds))
    r["flops"] = model_flops(project.model, project.moe, B, T, vocab) * split.accumulation
    r["audio_per_step"] = B * T * split.accumulation / FRAMES_PER_S
    return r


def report(own, plan, engine, r: dict):
    """The sections and the verdicts, on rank 0."""
    project, split, world, verdicts = plan.project, plan.batch, r["world"], []
    params = sum(p.numel() for p in engine.module.parameters())
    dropless = " dropless" if project.moe.dropless and project.moe.mode != "dense" else ""
    print(f"preflight: mode {project.moe.mode}{dropless}, {params:,} parameters "
          f"on rank 0, {world} rank(s), ep_size {plan.ep_size}; {split.describe()}")
    print("== devices")
    report_devices(r["devices"])
    missing = [i for i, d in enumerate(r["devices"]) if d["missing"]]
    if missing:
        verdicts.append(f"GPUs allocated but unusable on {rank_ranges(missing)}: the run would refuse to start "
                        "(run.allow_cpu to train on the CPU on purpose)")

    print("== collectives")
    step_s = r["step_s"]
    nbytes, dtype, seconds = r["all_reduce"]
    if seconds is None:
        print("no collective (1 rank)")
    else:
        gbps = bus_gbps(nbytes, seconds, world, lambda n: 2 * (n - 1) / n)
        print(f"all-reduce of the dense gradient, {nbytes / 1e6:.2f} MB {str(dtype)[6:]} over {world} ranks: "
              f"{seconds * 1e3:.2f} ms, bus {gbps:.3g} GB/s")
        verdicts.append(f"gradient all-reduce takes {100 * seconds / step_s:.0f}% of the step (once per step, "
                        "if not overlapped with backward)")
    if "all_to_all" in r:
        nbytes, dtype, uneven, seconds = r["all_to_all"]
        gbps = bus_gbps(nbytes, seconds, plan.ep_size, lambda n: (n - 1) / n)
        calls = 4 * len(moe_blocks(project.model, project.moe)) * split.accumulation
        print(f"all-to-all of one MoE layer, {nbytes / 1e6:.2f} MB {str(dtype)[6:]} per rank over {plan.ep_size} "
              f"ranks ({'uneven splits, dropless' if uneven else 'capacity buffer, equal splits'}): "
              f"{seconds * 1e3:.2f} ms, bus {gbps:.3g} GB/s; {calls} per step")
        verdicts.append(f"all-to-all takes {100 * seconds * calls / step_s:.0f}% of the step ({calls} x "
                        f"{seconds * 1e3:.2f} ms)")
    elif world > 1:
        print("no all-to-all (" + ("dense" if project.moe.mode == "dense" else "ep_size 1: experts are local") + ")")

    print("== step")
    B, T = r["batch"]
    tflops = r["flops"] / step_s / 1e12
    gpu = r["devices"][0]["gpu"]
    half = engine.bfloat16_enabled() or engine.fp16_enabled()
    peak = peak_tflops(gpu, half, own.peak_tflops)
    print(f"{split.accumulation} micro-batch(es) of {B} x {T / FRAMES_PER_S:.1f} s ({B * T:,} frames) per rank; "
          f"median of {own.steps} steps after {own.warmup}: {step_s * 1e3:.1f} ms per step (slowest rank)")
    mfu = f"MFU {100 * tflops / peak:.0f}% of {peak:g} TFLOP/s" if peak else \
        f"peak unknown for {gpu or r['devices'][0]['kind']} (--peak_tflops)"
    print(f"{r['flops'] / 1e9:.3g} GFLOP per step per rank: {tflops:.3g} TFLOP/s per rank, {mfu}")
    verdicts.append(mfu if peak else f"{tflops:.3g} TFLOP/s per rank; MFU unknown: {mfu}")
    gb, what = r["memory"]
    print(f"peak memory {gb:.2f} GB ({what}, largest rank)")
    count, summary = r["syncs"]
    budget, mode = sync_budget(project, plan.ep_size, engine.device.type == "cpu")
    print(f"host syncs in one forward+backward: {count}" + (f"\n{summary}" if summary else ""))
    verdicts.append(f"host syncs per step: {count} ({mode} budget {budget})" + (" OVER BUDGET" if count > budget
                                                                               else ""))
    if "cuda_syncs" in r:
        count, summary = r["cuda_syncs"]
        print(f"syncs the CUDA driver saw in one forward, backward and optimizer step: {count}"
              + (f"\n{summary}" if summary else ""))

    print("== loader")
    rates = [x for x in r["loader"] if x[2]]
    if not rates:
        print("no training batch on any rank")
    else:
        rate = min(x[0] for x in rates)
        per_batch = statistics.mean(x[1] for x in rates)
        demand = per_batch * split.accumulation / step_s
        needed = max(1, math.ceil(demand / rate))
        print(f"one process delivers {rate:.0f} s of audio per s (slowest rank, {sum(x[2] for x in rates)} "
              f"batches read, {per_batch:.1f} s of audio per batch); the step consumes {demand:.1f} s/s per rank")
        verdicts.append(loader_verdict(needed, project.data.num_workers, demand, rate))

    print("== verdicts")
    for v in verdicts:
        print(f"- {v}")


if __name__ == "__main__":
    distributed.end_process(main())
