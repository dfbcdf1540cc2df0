"""Checkpoint consolidation and re-sharding, on checkpoints written by two real ranks with ep_size 2."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.builders import batch, ds_dict, run_tool as tool, tiny_plan
from tests.support.ranks import run_ranks
from tools.harness import launch, tiny_config
from trainer.config import ProjectConfig
from trainer.engine import build_engine, build_model
from trainer.export import load_consolidated
from trainer.runtime.deepspeed_contract import MODEL_STATES

pytestmark = pytest.mark.slow


def probe() -> dict:
    return batch(7, n_mels=80, lengths=(160, 123, 90))


def _engine_log_probs(tag_dirs: list[str]) -> list[torch.Tensor]:
    """Load each DeepSpeed checkpoint into a real engine at this world size; their log-probs on the probe batch
    (several engines in one process: one start-up for all)."""
    return [_log_probs(tag_dir) for tag_dir in tag_dirs]


def _log_probs(tag_dir: str) -> torch.Tensor:
    saved = torch.load(Path(tag_dir) / MODEL_STATES, map_location="cpu", weights_only=False)
    project = ProjectConfig.model_validate(saved["project_config"])
    plan = tiny_plan(project, ds_dict(stage=1))
    model = build_model(plan, saved["module"]["head.weight"].shape[0] - 1)
    engine = build_engine(plan, model)
    engine.load_checkpoint(str(Path(tag_dir).parent), tag=Path(tag_dir).name, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.eval()
    with torch.no_grad():
        return engine(probe()["feats"], probe()["lengths"]).log_probs


def newest(run) -> str:
    return str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text())


@pytest.mark.parametrize("mode", ["omni", "switch"])
def test_consolidated_logits_equal_the_engines_and_resharded_checkpoints_load_at_ep1_and_ep2(trained, tmp_path,
                                                                                            mode):
    run = trained[mode]
    proc = tool("tools/consolidate_checkpoint.py", str(run), "--out", str(tmp_path / "model"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    routers = [k for k in weights if k.endswith("gate.wg.weight")]
    assert len(routers) == (1 if mode == "omni" else 2)  # the shared router once
    assert len([k for k in weights if ".deepspeed_experts." in k]) == 2 * 4 * 4  # layers x experts x tensors
    assert all(t.dtype == torch.float32 for t in weights.values())
    model, meta = load_consolidated(str(tmp_path / "model"))
    assert meta["step"] == 16 and (tmp_path / "model" / "tokenizer.model").exists()
    with torch.no_grad():
        mine = model(probe()["feats"], probe()["lengths"]).log_probs

    for ep in (1, 2):
        out = tmp_path / f"ep{ep}"
        proc = tool("tools/consolidate_checkpoint.py", newest(run), "--ep_size", str(ep), "--to_deepspeed", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
    # The trained checkpoint and its re-sharded copies, each in a real engine at its own world size.
    two = run_ranks(_engine_log_probs, 2, [newest(run), newest(tmp_path / "ep2")])
    one = run_ranks(_engine_log_probs, 1, [newest(tmp_path / "ep1")])
    outs = [t for rank_outs in two + one for t in rank_outs]
    assert len(outs) == 2 * 2 + 1
    for rank_out in outs:
        torch.testing.assert_close(mine, rank_out, rtol=0, atol=1e-5)


def test_the_trainer_continues_from_a_resharded_checkpoint(trained, corpus, tmp_path):
    out = tmp_path / "ep1"
    proc = tool("tools/consolidate_checkpoint.py", str(trained["omni"]), "--to_deepspeed", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = launch(tiny_config(tmp_path, run={"max_steps": 20}), corpus, out, 1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step16'} at step 16 (optimizer reset)" in again.stdout
    assert json.loads((out / "results.json").read_text())["dev"]["step"] == 20


def test_consolidation_errors_name_the_path(trained, tmp_path):
    missing = tool("tools/consolidate_checkpoint.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and f"{tmp_path / 'nowhere'}: no such file or directory" in missing.stderr
    not_ckpt = tool("tools/consolidate_checkpoint.py", str(tmp_path), "--out", str(tmp_path / "m"))
    assert not_ckpt.returncode == 2 and "not a DeepSpeed checkpoint" in not_ckpt.stderr
    assert tool("tools/consolidate_checkpoint.py", str(trained["omni"]), "--out", str(tmp_path / "m")).returncode == 0
    twice = tool("tools/consolidate_checkpoint.py", str(tmp_path / "m"), "--out", str(tmp_path / "m2"))
    assert twice.returncode == 2 and "a consolidated model, not a DeepSpeed checkpoint" in twice.stderr
    odd = tool("tools/consolidate_checkpoint.py", str(trained["omni"]), "--ep_size", "3", "--to_deepspeed",
               str(tmp_path / "ep3"))
    assert odd.returncode == 2 and "--ep_size 3 does not divide num_experts (4)" in odd.stderr
    usage = tool("tools/consolidate_checkpoint.py", str(trained["omni"]))
    assert usage.returncode == 2 and "nothing to do" in usage.stderr
