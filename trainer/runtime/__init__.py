"""The runtime: what a process of a distributed run needs, whatever it trains.

- ``distributed``: every collective of the project, one device rule, timeouts, the process's end
- ``placement``: which accelerator a rank takes on its node
- ``locks``: the output folder's heartbeat lock (no flock needed)
- ``stopping``: signals from the launcher, SLURM or a user become a save and exit 75
- ``exits``: the exit statuses, carried by the errors that end a run
- ``host_syncs``: counts the host syncs of a step, as a GPU would make them
- ``integrity``: checkpoint files opened only when they are safe to unpickle
- ``deepspeed_config``, ``deepspeed_contract``: what this project relies on of DeepSpeed, in one place each

Imports nothing else of ``trainer``: the data, the model and the run build on it.
"""
