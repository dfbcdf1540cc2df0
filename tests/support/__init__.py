"""Helpers of the tests, no tests: tiny models, plans and batches (``builders``), test audio and manifests
(``audio``), functions run on N gloo ranks (``ranks``), and a throw-away SLURM cluster (``slurm_cluster``).
What the tests share with the fault drill (launches, the tiny run config, fakes) is in ``tools/harness.py``."""
