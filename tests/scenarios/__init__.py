"""Scenarios, all marked slow: tests that start processes (the deepspeed launcher, gloo ranks, SLURM daemons,
tools as subprocesses, holder processes)."""
