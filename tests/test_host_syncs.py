"""Host syncs of a training step, counted on CPU ranks as a GPU step would make them (trainer.runtime.host_syncs)."""
import pytest
import torch

from tests.common import VOCAB, batch, tiny_plan
from tests.distributed import run_ranks
from trainer.runtime.host_syncs import count_host_syncs


def test_the_counter_sees_each_kind_of_host_read_and_nothing_else():
    x = torch.arange(6.0)
    with count_host_syncs() as log:
        y = (x * 2).cumsum(0)
        torch.zeros(4, dtype=torch.int64).index_add_(0, y.long() % 4, torch.ones(6, dtype=torch.int64))
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.int64), output_size=6)
    assert log.count == 0, log.summary()
    with count_host_syncs() as log:
        float(x.sum())
        x[x > 2]
        x.nonzero()
        torch.bincount(x.long())
        torch.repeat_interleave(x.long())
        x.tolist()
        x.cpu()
    assert [what for what, _ in log.events] == ["_local_scalar_dense.default", "index.Tensor", "nonzero.default",
                                                "bincount.default", "repeat_interleave.Tensor", "tolist", "cpu"]
    assert all(where.startswith("test_host_syncs.py") or where == "elsewhere" for _, where in log.events)


def test_with_a_device_given_reads_of_its_tensors_and_blocking_copies_to_it_count_and_host_reads_do_not():
    """On meta (as on a GPU) host and device tensors differ: ``int`` of a host tensor is no sync, a read of a
    device tensor is, and so is a copy to the device not asked to be non-blocking (``.to``, ``torch.tensor(...,
    device=)``); non-blocking copies are listed apart."""
    host, device = torch.arange(4), torch.empty(4, device="meta")
    with count_host_syncs("meta") as log:
        int(host.sum())
        host.tolist()
        host.to("meta", non_blocking=True)
        device.copy_(host, non_blocking=True)
        host.to("meta")
        device.copy_(host)
        torch.tensor([1.0, 2.0], device="meta")
        torch.full((), 3.0, device="meta")  # made on the device: no copy
        try:
            device.tolist()
        except (RuntimeError, NotImplementedError):  # meta holds no values; the read is counted first
            pass
    assert [what for what, _ in log.events] == ["blocking host-to-device copy"] * 3 + ["tolist"], log.events
    assert [what for what, _ in log.copies] == ["host-to-device copy"] * 2, log.copies


def _step_syncs(k: int) -> dict:
    """Syncs of one training forward+backward and one evaluation forward of the shipped 4-layer model, in
    capacity mode (dropping) and dropless mode, on this rank: {mode: (train events, eval events, MoE layers)}."""
    from trainer.config import load_config, with_overrides
    from trainer.engine import build_engine, build_model, forward, step_loss
    from trainer.runtime import distributed
    ds, shipped = load_config("ds_configs/omni.json")
    out = {}
    for dropless in (False, True):
        project = with_overrides(shipped, {"moe.dropless": dropless, "moe.drop_tokens": True, "moe.top_k": k})
        plan = tiny_plan(project, ds)
        engine = build_engine(plan, build_model(plan, VOCAB))
        b = batch(distributed.rank(), n_mels=80, lengths=(130, 100, 70 + 20 * distributed.rank()))
        with count_host_syncs() as train:
            loss, _, _ = step_loss(engine, plan, b)
            engine.backward(loss.total)
        engine.step()
        engine.eval()
        with count_host_syncs() as evaluation, torch.no_grad():
            forward(engine, b)
        out["dropless" if dropless else "capacity"] = (train.events, evaluation.events, project.model.num_layers)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world,k", [(1, 1), (2, 2)])
def test_a_step_syncs_once_for_capacity_once_for_its_outcome_and_once_per_layer_for_split_sizes(world, k):
    """Capacity mode: the capacity's frame count (with the group's max) and the step's outcome (all-reduced
    frames and flags: is the loss finite). Dropless: the outcome, and each MoE layer's split sizes. Evaluation
    (never dropping, dispatched without capacity): the split sizes."""
    for rank_result in run_ranks(_step_syncs, world, k):
        train, evaluation, layers = rank_result["capacity"]
        assert [w.split(" (")[1] for _, w in train] == ["group_max)", "step_totals)"], train  # for max_frames
        assert len(evaluation) == layers and all("dropless_moe" in w for _, w in evaluation), evaluation
        train, evaluation, layers = rank_result["dropless"]
        assert len(train) == layers + 1 and sum("dropless_moe" in w for _, w in train) == layers, train
        assert len(evaluation) == layers and all("dropless_moe" in w for _, w in evaluation), evaluation
