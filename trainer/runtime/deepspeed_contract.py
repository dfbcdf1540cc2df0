"""Every place the trainer relies on DeepSpeed 0.19.8 beyond its documented API, in one module.

When the pin moves, check each item against the new source (``deepspeed/moe/``, ``deepspeed/runtime/engine.py``,
``deepspeed/runtime/lr_schedules.py``) and run the tests:
1. ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`` before ``init_distributed`` skips a JIT
   C++ build that only inference all-reduce uses.
2. ``MoE.deepspeed_moe`` is the ``MOELayer``; we replace its ``gate`` and ``experts``; it calls
   ``experts(buffer)`` with buffer [ep_size, num_local_experts, capacity, d_model].
3. An expert parameter has ``allreduce = False`` and a ``group_name`` (as ``Experts.__init__`` marks them).
4. The engine saves and loads experts through the ``MoE`` module's state dict, by the keys
   ``.deepspeed_moe.experts.deepspeed_experts.<local id>.``; ``GroupedExperts``' hooks present its stacked
   tensors under those names.
5. ``MOELayer.forward`` calls ``gate(tokens, used_token, sparse_routes=True, use_tutel)``, passing ``used_token``
   through untouched (we pass a ``RouteCall``); the gate returns the 7-tuple ``(l_aux, capacity, num_experts,
   indices [k, S] int32 (-1: dropped), locations [k, S] int32, gates [k, S], expert_counts [E])``.
6. ``TopKGate`` (``wg``, ``k``, ``capacity_factor``, ``min_capacity``, ``drop_tokens``, ``noisy_gate_policy``,
   ``top2_2nd_expert_sampling``, ``_set_ep_group``), ``gumbel_rsample``, ``multiplicative_jitter``.
7. Checkpoint files: ``mp_rank_00_model_states.pt`` holds the non-expert weights and the client state;
   ``layer_{L}_expert_{E}_mp_rank_00_model_states.pt`` one expert by MoE-layer index and *global* id.
8. The expert-parallel group of rank r is the consecutive ranks ``r // ep_size * ep_size ...``: its place in it
   is ``r % ep_size`` (``utils/groups.py``).
9. A config scheduler's ``step(last_batch_iteration)`` sets its position: n - 1 after n optimizer steps.
10. Every checkpoint file goes through ``engine.checkpoint_engine`` (``save(state_dict, path)``, ``load(path,
    map_location)``); its optimizer files hold, besides tensors, ``LossScaler``/``DynamicLossScaler``,
    ``ZeroStageEnum`` and ``fragment_address``.
11. Who reads what in ``load_checkpoint`` (``loading_ranks``): every rank the dense states; the ranks of ep rank
    r the experts ``r * n_local ...``; rank i alone ``[bf16_]zero_pp_rank_i_...optim_states.pt`` (ZeRO 1/2);
    the ranks of ep rank r ``expp_rank_r_...optim_states.pt`` (no ZeRO).
12. ``deepspeed_config.known_keys`` reads DeepSpeed's source for its config keys; ``contiguous_gradients:
    false`` with expert parallelism reduces expert gradients wrongly (refused by ``zero_for_world``).
13. On one node the ``deepspeed`` runner forwards no signal to ``deepspeed.launcher.launch``, which forwards
    SIGTERM/SIGINT to the ranks, SIGKILLs them 30 s later and exits 1 (or with the first failed rank's status).
"""
import re

import deepspeed.ops
from deepspeed.moe.sharded_moe import TopKGate, gumbel_rsample, multiplicative_jitter
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from trainer.runtime import integrity

__all__ = ["TopKGate", "gumbel_rsample", "multiplicative_jitter"]  # re-exported for trainer.model.routing

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_" + re.escape(MODEL_STATES))
EXPERT_PARAM = re.compile(r"\.deepspeed_experts\.(\d+)\.")  # in a state-dict name: the expert's index
SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # plain data in optimizer files
ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
EXPP_FILE = re.compile(r"expp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


class VerifiedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save/torch.load engine that hashes what it writes (``written``: path -> SHA-256, for
    the checkpoint's record) and loads without running code (``integrity.load``)."""

    def __init__(self, zipfile_serialization: bool):
        super().__init__()
        self.zipfile_serialization, self.written = zipfile_serialization, {}

    def save(self, state_dict, path: str):
        """Write ``state_dict`` and note its sha256."""
        self.written[str(path)] = integrity.save(state_dict, path, self.zipfile_serialization)

    def load(self, path: str, map_location=None):
        """Read a checkpoint file, refusing types outside ``SAFE_GLOBALS``."""
        return integrity.load(path, SAFE_GLOBALS, map_location)


def install_checkpoint_engine(engine) -> VerifiedCheckpointEngine:
    """Replace the engine's checkpoint engine by ours (DeepSpeed's other engines are refused, not wrapped)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"checkpoint engine {type(current).__name__} is not supported; remove the DeepSpeed "
                         "config's checkpoint engine settings (the trainer writes checkpoints with torch.save)")
    engine.checkpoint_engine = VerifiedCheckpointEngine(current.zipfile_serialization)
    return engine.checkpoint_engine


def is_deepspeed_launcher(cmdline: list[str]) -> bool:
    """Whether a process's command line is DeepSpeed's per-node launcher."""
    return "deepspeed.launcher.launch" in cmdline


def is_deepspeed_runner(cmdline: list[str]) -> bool:
    """The ``deepspeed`` command: ``python .../bin/deepspeed ...``."""
    return any(arg.rsplit("/", 1)[-1] == "deepspeed" for arg in cmdline[:2])


def skip_shm_comm_build():
    """Skip the shared-memory op's JIT build (item 1)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def expert_file(layer: int, expert: int) -> str:
    """The file name of one expert's weights (item 7)."""
    return f"layer_{layer}_expert_{expert}_{MODEL_STATES}"


def install_gate(moe, gate):
    """Put ``gate`` in DeepSpeed's ``MoE`` layer in place of the one it built."""
    moe.deepspeed_moe.gate = gate


def install_experts(moe, experts):
    """Put ``experts`` (an ``Experts`` subclass built for the same local count and group) in place of DeepSpeed's."""
    moe.deepspeed_moe.experts = experts


def gate_of(moe):
    """The gate of a DeepSpeed ``MoE`` module (item 2)."""
    return moe.deepspeed_moe.gate


def local_experts(moe):
    """This rank's experts of a DeepSpeed ``MoE`` layer (a ``GroupedExperts`` once installed)."""
    return moe.deepspeed_moe.experts


def ep_rank(rank: int, ep_size: int) -> int:
    """A rank's place in its expert-parallel group: its local experts are global ``ep_rank * n_local + j``."""
    return rank % ep_size


def loading_ranks(name: str, world: int, ep_size: int, num_experts: int) -> list[int]:
    """The ranks of a run (``world`` ranks, ``ep_size``) that read the checkpoint file ``name`` when DeepSpeed
    loads the checkpoint; [] for a file DeepSpeed does not read (the trainer's own, or another layout's)."""
    n_local = max(1, num_experts // ep_size)
    if name == MODEL_STATES:
        return list(range(world))
    expert, zero, expp = EXPERT_FILE.fullmatch(name), ZERO_FILE.fullmatch(name), EXPP_FILE.fullmatch(name)
    if expert:
        return [r for r in range(world) if ep_rank(r, ep_size) == int(expert[2]) // n_local]
    if expp:
        return [r for r in range(world) if ep_rank(r, ep_size) == int(expp[1])]
    return [int(zero[1])] if zero and int(zero[1]) < world else []


def set_schedule_position(lr_scheduler, steps: int):
    """Put a config scheduler where it is after ``steps`` optimizer steps (not restarting its warm-up)."""
    if lr_scheduler is not None and steps > 0:
        lr_scheduler.step(steps - 1)
