"""Run a test function on N real processes joined over gloo, with a deadline instead of a hang."""
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from tools.harness import free_port


def _entry(rank, fn, world, port, out_dir, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from trainer.runtime import distributed
    distributed.init()
    torch.save(fn(*args), os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.barrier()
    distributed.end_process(0)  # as the trainer's ranks do: finalization with gloo's threads alive can abort


def run_ranks(fn, world: int, *args, deadline_s: float = 300.0) -> list:
    """fn(*args) on every rank; returns each rank's return value, rank order."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), out, args), nprocs=world, join=False,
                                 start_method="spawn")
        end = time.time() + deadline_s
        while not ctx.join(timeout=1.0):
            if time.time() > end:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within {deadline_s:.0f} s")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]
