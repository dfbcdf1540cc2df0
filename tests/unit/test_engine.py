"""Building this rank's model (trainer.engine.build_model): the kernels it chooses for the run's device."""
from tests.support.builders import VOCAB, tiny_plan, tiny_project
from trainer.engine import build_model
from trainer.runtime.deepspeed_contract import local_experts


def test_the_model_built_for_a_cpu_run_uses_one_matmul_per_expert():
    model = build_model(tiny_plan(tiny_project("omni")), VOCAB)
    assert [local_experts(b.ffn.moe).grouped_mm for b in model.blocks] == [False] * 3
