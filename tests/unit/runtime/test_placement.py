"""Which accelerator a rank takes on its node (``trainer.runtime.placement.device_index``); the same rule through a real
SLURM cluster is in tests/scenarios/test_slurm.py."""
import pytest

from trainer.runtime.placement import device_index


def test_a_rank_takes_its_local_rank_among_all_visible_gpus_and_the_only_one_it_sees():
    assert [device_index(r, "0,1,2,3") for r in range(4)] == [0, 1, 2, 3]  # every task sees the node's GPUs
    assert [device_index(r, v) for r, v in enumerate(["0", "1", "2", "3"])] == [0, 0, 0, 0]  # one GPU per task
    assert device_index(5, "GPU-8f6c") == 0  # a site's --gpu-bind may name devices by UUID
    assert [device_index(r, "") for r in range(3)] == [0, 1, 2]  # no variable: the launcher's LOCAL_RANK
    assert device_index(1, "-1") == 1 and device_index(1, "NoDevFiles") == 1  # no GPU at all (CPU runs)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 but CUDA_VISIBLE_DEVICES=0,1 names 2 device"):
        device_index(3, "0,1")
