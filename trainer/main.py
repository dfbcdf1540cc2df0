"""``deepspeed trainer/main.py --deepspeed_config ds_configs/omni.json``: the file launchers run.

The run itself is ``trainer.run.main``. Run as a file, Python puts this folder first on ``sys.path``, where
``config.py``, ``data/`` or ``model/`` would shadow any library of that name; the repository root takes its
place, so the package is imported as a package (installed or not).
"""
import os
import sys


def _main():
    here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == here:
        sys.path[0] = os.path.dirname(here)
    from trainer.runtime import distributed
    from trainer.run import main
    distributed.end_process(main())


if __name__ == "__main__":
    _main()
