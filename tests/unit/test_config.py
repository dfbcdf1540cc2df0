"""The run config: the shipped configs load, and bad keys are errors that name the file and the key."""
import json

import pytest

from tools.harness import ROOT
from trainer.config import ConfigError, load_config, parse_assignment, reference_table, with_overrides


CPU = ["ds_configs/omni.json", "ds_configs/switch.json", "ds_configs/dense.json"]
PAPER = ["ds_configs/paper/omni_8x84m.json", "ds_configs/paper/switch_8x84m.json", "ds_configs/paper/dense_84m.json"]


@pytest.mark.parametrize("path", CPU + PAPER)
def test_shipped_configs_load(path):
    ds, project = load_config(path)
    assert "omni_router" not in ds and ds["zero_optimization"]["stage"] in (1, 2)


@pytest.mark.parametrize("family", [CPU, PAPER])
def test_shipped_configs_differ_only_in_routing(family):
    loaded = [json.load(open(p)) for p in family]
    for cfg in loaded:
        cfg["omni_router"]["moe"].pop("mode")
        cfg["omni_router"]["run"].pop("output_dir")  # where a run writes is named after it, as its
        for key in ("output_path", "job_name"):  # TensorBoard folder and job are
            cfg.get("tensorboard", {}).pop(key, None)
    assert loaded[0] == loaded[1] == loaded[2]


def write(tmp_path, cfg) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return str(path)


@pytest.mark.parametrize("section,key,value,words", [
    ("moe", "num_expert", 4, "omni_router.moe.num_expert"),
    ("moe", "num_experts", "4", "omni_router.moe.num_experts"),
    ("model", "d_model", 4.5, "omni_router.model.d_model"),
    ("moe", "mode", "hash", "omni_router.moe.mode"),
    ("moe", "top_k", 3, "omni_router.moe.top_k"),
    ("run", "max_steps", True, "omni_router.run.max_steps"),
])
def test_unknown_or_ill_typed_key_is_named(tmp_path, section, key, value, words):
    path = write(tmp_path, {"omni_router": {section: {key: value}}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and words in str(e.value)


def test_phrases_without_a_word_list_are_refused(tmp_path):
    zero = {"zero_optimization": {"stage": 1}}
    path = write(tmp_path, {**zero, "omni_router": {"data": {"corpus": {"text": "phrases"}}}})
    with pytest.raises(ConfigError,
                       match="omni_router.data.corpus.*'phrases' needs a word list: set data.corpus.words"):
        load_config(path)
    load_config(write(tmp_path, {**zero, "omni_router": {"data": {"corpus": {"text": "phrases", "words": 500}}}}))


def test_zero_stage_3_with_moe_is_refused_but_allowed_for_dense(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 3}, "omni_router": {"moe": {"mode": "omni"}}})
    with pytest.raises(ConfigError, match="zero_optimization.stage: 3 is refused with MoE"):
        load_config(path)
    load_config(write(tmp_path, {"zero_optimization": {"stage": 3}, "omni_router": {"moe": {"mode": "dense"}}}))


def test_zero_stage_0_is_refused(tmp_path):
    for cfg in ({"zero_optimization": {"stage": 0}}, {}):
        with pytest.raises(ConfigError, match="zero_optimization.stage: 0 .or absent. is refused"):
            load_config(write(tmp_path, cfg))


def test_invalid_json_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.json: line 2 column"):
        load_config(write(tmp_path, '{"a": 1,\n "b": }'))


@pytest.mark.parametrize("key,hint", [("omni-router", "did you mean 'omni_router'?"),
                                      ("optimiser", "did you mean 'optimizer'?"), ("qqqq", "")])
def test_an_unknown_top_level_key_is_named_with_the_closest_valid_one(tmp_path, key, hint):
    path = write(tmp_path, {"zero_optimization": {"stage": 1}, key: {"moe": {"mode": "switch"}}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: unknown top-level key '{key}': neither 'omni_router' nor a DeepSpeed key"
                            + (f"; {hint}" if hint else ""))


def test_every_top_level_key_of_the_shipped_configs_and_deepspeeds_monitors_is_known(tmp_path):
    monitors = {k: {"enabled": False} for k in ("tensorboard", "wandb", "csv_monitor", "comet")}
    load_config(write(tmp_path, {"zero_optimization": {"stage": 1}, "flops_profiler": {"enabled": False},
                                 "wall_clock_breakdown": False, "comms_logger": {"enabled": False}, **monitors}))


@pytest.mark.parametrize("key", ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"])
def test_deepspeed_batch_keys_are_refused_for_the_one_batch_setting(tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key}: remove; the batch is one setting, omni_router.data.batch_frames"):
        load_config(write(tmp_path, {key: 4, "zero_optimization": {"stage": 1}}))


def test_rsample_is_refused_for_top2(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 1},
                            "omni_router": {"moe": {"top_k": 2, "noisy_gate_policy": "RSample"}}})
    with pytest.raises(ConfigError, match="RSample samples the one choice of top-1; for top-2 use second_expert"):
        load_config(path)


def test_readme_key_table_is_the_one_generated_from_the_config():
    assert reference_table() in (ROOT / "README.md").read_text()


def test_set_overrides_any_key_and_names_a_bad_one():
    _, project = load_config("ds_configs/omni.json")
    changed = with_overrides(project, [parse_assignment(a) for a in (
        "run.max_steps=5", "moe.lb_coef=0.02", "data.specaugment.time_masks=0", "run.output_dir=runs/x")])
    assert (changed.run.max_steps, changed.moe.lb_coef, changed.data.specaugment.time_masks,
            changed.run.output_dir) == (5, 0.02, 0, "runs/x")
    with pytest.raises(ConfigError, match="omni_router.moe.lb_cof"):
        with_overrides(project, [parse_assignment("moe.lb_cof=0.1")])
    with pytest.raises(ConfigError, match=r"--set run.max_steps.x: omni_router.run.max_steps is not a section"):
        with_overrides(project, [parse_assignment("run.max_steps.x=1")])
    with pytest.raises(ConfigError, match=r"^a test: omni_router.run.max_steps: Input should be a valid integer"):
        with_overrides(project, {"run.max_steps": "5"}, origin="a test")  # strict: no silent conversion
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("run.max_steps")


@pytest.mark.parametrize("factors", [[0], [0.9, 1.0, 3.0], [-1.1]])
def test_a_speed_factor_outside_half_to_double_is_a_config_error_naming_the_key(factors):
    _, project = load_config("ds_configs/omni.json")
    assert with_overrides(project, {"data.speed_perturb": [0.5, 0.9, 1.1, 2.0]}).data.speed_perturb[-1] == 2.0
    with pytest.raises(ConfigError, match=r"omni_router\.data\.speed_perturb: .*must lie in \[0\.5, 2\.0\]"):
        with_overrides(project, [parse_assignment(f"data.speed_perturb={json.dumps(factors)}")])


def test_a_corpus_key_of_an_older_config_names_its_new_place(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "omni.json").read_text())
    cfg["omni_router"]["data"]["corpus_dir"] = "/data/corpus"
    with pytest.raises(ConfigError, match=r"omni_router\.data\.corpus_dir: .* \(moved: use data\.corpus\.dir\)"):
        load_config(write(tmp_path, cfg))
