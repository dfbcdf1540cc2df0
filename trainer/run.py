"""A run, start to end: ``deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json [--num_gpus 2]``.

start (``trainer.start``: config -> plan -> lock -> datasets -> model and engine) -> resume -> train or evaluate.
Every way a run ends is an exit status, carried by its error (``trainer.runtime.exits``).
"""
import json
import sys

from trainer import checkpoint
from trainer.checkpoint import ResumeError
from trainer.loop import Trainer, TrainingError
from trainer.runtime import distributed, locks
from trainer.runtime.exits import RunError
from trainer.start import Started, parse_args, start


def main(argv=None) -> int:
    """The run on this rank, start to end; its exit status."""
    args = parse_args(argv)
    try:
        return train(args, start(args))  # every rank returns here, in step with the others or alone
    except RunError as e:
        print(e.report(), file=sys.stderr)
        return e.status
    finally:
        locks.release_all()  # a lock file is removed here: ranks end with os._exit, which runs no exit hook


def train(args, run: Started) -> int:
    """Resume, then train to ``run.max_steps`` or evaluate (``--eval_only``); the exit status."""
    trainer = Trainer(run.engine, run.plan, run.train_set, run.dev_sets, run.tokenizer)
    try:
        if args.resume == "never" and checkpoint.tags(trainer.checkpointer.dir):
            raise ResumeError(f"--resume never: {trainer.checkpointer.dir} already holds checkpoints; choose "
                              "another --output_dir (nothing there is overwritten)")
        if args.eval_only:
            return evaluate_only(trainer, run)
        if args.resume == "auto":
            trainer.resume(args.reset_optimizer)
        return trainer.fit()
    except RuntimeError as e:
        if isinstance(e, RunError) or not distributed.is_collective_failure(e):
            raise
        raise TrainingError(f"rank {distributed.rank()}, {trainer.phase}: a collective failed (timeout "
                            f"{run.plan.project.run.collective_timeout_s:.0f} s, run.collective_timeout_s): "
                            f"{str(e).splitlines()[0]}") from None


def evaluate_only(trainer: Trainer, run: Started) -> int:
    """The newest checkpoint's weights (whatever world size wrote them) on the dev sets, to eval_stepN.json."""
    if not trainer.resume(reset_optimizer=False, weights_only=True):
        raise TrainingError(f"--eval_only: no usable checkpoint in {trainer.checkpointer.dir}")
    result = trainer.evaluate()
    if run.plan.rank == 0:
        (run.plan.output_dir / f"eval_step{result['step']}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    distributed.end_process(main())
