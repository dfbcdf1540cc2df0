"""Host syncs of a training step, counted on CPU ranks as a GPU step would make them (trainer.runtime.host_syncs)."""
import pytest
import torch

from tests.support.builders import VOCAB, batch, tiny_plan
from tests.support.ranks import run_ranks
from trainer.runtime.host_syncs import count_host_syncs


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
