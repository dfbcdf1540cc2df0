"""tools/analyze_routing.py: the structure of a routing, on constructed choices."""
import torch

from tools.analyze_routing import structure


def test_the_routing_structure_of_a_constructed_routing_comes_out_exact():
    """Two utterances, 3 layers: runs of known lengths in time, known agreement across layers."""
    a = torch.tensor([[0, 0, 0, 1, 1, 2],    # runs 3, 2, 1
                      [0, 0, 0, 1, 1, 1],    # runs 3, 3
                      [2, 2, 2, 2, 2, 2]])   # one run of 6
    b = torch.tensor([[3, 3], [3, 3], [3, 0]])
    s = structure({0: a, 1: list(b)})
    assert s["run_length"] == [8 / 4, 8 / 3, 8 / 3]
    assert s["same_adjacent"] == [(5 + 2) / 8, (0 + 1) / 8] and s["same_all"] == 1 / 8
