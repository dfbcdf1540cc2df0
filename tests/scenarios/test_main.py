"""The main job through the real deepspeed launcher, on a small slice of the embedded corpus."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.builders import run_tool
from tools.harness import ROOT, bad_manifest, launch, site_env, tiny_config
from tools.make_cuts import make_cuts
from tools.make_shards import make_shards
from trainer.data.batches import ShardSet
from trainer.data.sources import read_manifest
from trainer.runtime.deepspeed_contract import MODEL_STATES

pytestmark = pytest.mark.slow


def cut_sets(corpus, folder) -> list:
    """The corpus as Lhotse cut sets (Libriheavy's layout for training, whole recordings for dev): flags."""
    train = make_cuts(str(corpus / "train.jsonl"), str(folder / "train.jsonl.gz"), join=3)
    dev = make_cuts(str(corpus / "dev.jsonl"), str(folder / "dev.jsonl.gz"), join=3, whole=True)
    return ["--train_cuts", str(train), "--dev_cuts", str(dev), "--set", f"data.cuts_root={folder}"]


@pytest.mark.parametrize("mode,ranks,gas,source", [("omni", 1, 1, "manifest"), ("omni", 2, 1, "cuts"),
                                                   ("switch", 2, 2, "manifest"), ("dense", 1, 1, "manifest")])
def test_main_job_trains_saves_and_scores(tmp_path, corpus, mode, ranks, gas, source):
    out = tmp_path / "run"
    # The global batch is 2500 frames whatever the ranks; a per-rank cap of 625 frames needs 2 micro-batches.
    cap = {"max_frames_per_rank": 2500 // ranks // gas}
    extra = cut_sets(corpus, tmp_path / "cuts") if source == "cuts" else []
    proc = launch(tiny_config(tmp_path, mode, data=cap), corpus, out, ranks, extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    micro = 2500 // ranks // gas
    assert f"per step = {ranks} rank(s) x {gas} micro-batch(es) x {micro:,} frames" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    losses = [row["ctc"] for row in results["train"]]
    assert [row["step"] for row in results["train"]] == [4, 8, 12, 16, 20, 24]
    assert losses[-1] < losses[0]
    dev = results["dev"]["sets"]["dev"]
    assert dev["wer"] == results["dev"]["mean_wer"] and dev["utterances"] == 50
    assert dev["cer"] == results["dev"]["mean_cer"] and 0 < dev["cer"] <= 100
    assert dev["loss"] < losses[0]  # CTC per frame, the same unit as training's
    ckpt = out / "checkpoints" / "step24"
    assert (ckpt / "mp_rank_00_model_states.pt").exists()
    experts = sorted(p.name for p in ckpt.glob("layer_*_expert_*"))
    assert len(experts) == (0 if mode == "dense" else 2 * 4)  # 2 MoE layers x 4 experts, by global id
    ep = 1 if mode == "dense" else ranks
    assert f"{ranks} rank(s), ep_size {ep}" in proc.stdout
    assert ("cuts/train.jsonl.gz; dev sets: dev" in proc.stdout) == (source == "cuts")  # the sources read
    rng = [torch.load(ckpt / f"rng_rank{r}.pt", weights_only=True) for r in range(ranks)]
    assert all({"torch", "accelerator", "python"} <= set(state) for state in rng)
    if ranks == 2:  # each rank draws its own dropout masks
        assert not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_bad_config_fails_before_any_work(tmp_path, corpus):
    bad = tmp_path / "bad.json"
    cfg = json.loads(Path(tiny_config(tmp_path)).read_text())
    cfg["zero_optimization"]["stage"] = 3
    bad.write_text(json.dumps(cfg))
    proc = launch(str(bad), corpus, tmp_path / "run")
    assert proc.returncode != 0
    assert "zero_optimization.stage: 3 is refused with MoE" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_gpus_allocated_but_unusable_stop_the_run_before_anything_is_written(tmp_path, corpus):
    """This machine has no NVIDIA driver: with GPUs allocated, torch sees none, as with a driver older than the
    torch build needs. Under DeepSpeed's launcher SLURM's variable names the allocation (the launcher sets
    CUDA_VISIBLE_DEVICES itself); started by another launcher (srun, torchrun), CUDA_VISIBLE_DEVICES does. The
    key that allows the CPU on purpose is tested by the ``trained`` fixture's omni run."""
    config = tiny_config(tmp_path)
    proc = launch(config, corpus, tmp_path / "run", env={**os.environ, "SLURM_STEP_GPUS": "0"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "GPUs were allocated (SLURM_STEP_GPUS=0) but torch" in proc.stderr and "allow_cpu" in proc.stderr
    direct = subprocess.run([sys.executable, "trainer/main.py", "--deepspeed_config", config, "--output_dir",
                             str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert direct.returncode == 2 and "GPUs were allocated (CUDA_VISIBLE_DEVICES=0)" in direct.stderr
    assert not (tmp_path / "run").exists()


def test_a_rank_ends_without_interpreter_finalization(tmp_path, corpus):
    """Interpreter finalization can abort a rank whose run ended well (gloo's threads outlive
    ``destroy_process_group``; pytorch#179291). A rank's process ends with its status before it: an exit hook
    planted in every rank that would abort the process does not run, and the rank's own status comes out."""
    bad = tmp_path / "bad.json"
    cfg = json.loads(Path(tiny_config(tmp_path)).read_text())
    cfg["zero_optimization"]["stage"] = 3  # refused after the process group is joined
    bad.write_text(json.dumps(cfg))
    env = site_env(tmp_path / "site", "import atexit, os\natexit.register(os.abort)\n")  # in every rank
    proc = launch(str(bad), corpus, tmp_path / "run", env=env)
    assert "zero_optimization.stage: 3 is refused with MoE" in proc.stderr
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]


def shard_flags(corpus, folder) -> list:
    """The corpus's training set as Lhotse Shar shards of 8 utterances (8 shards, 4 a rank): flags. With the
    session corpus the ranks' batch counts then differ in epochs 1 to 3 (shards of 10 give equal counts)."""
    make_shards(read_manifest(str(corpus / "train.jsonl"), 20.0)[0], str(folder), shard_size=8)
    return ["--train_shards", str(folder), "--dev_manifest", str(corpus / "dev.jsonl")]


@pytest.mark.parametrize("mode,source,features_on", [("omni", "manifest", "loader"), ("switch", "shards", "device")])
def test_resumed_run_on_two_ranks_equals_an_uninterrupted_one(tmp_path, corpus, mode, source, features_on):
    """The interrupted run is the uninterrupted one's folder as it stood at its step-12 checkpoint (a
    preemption there), resumed to step 24, in bf16 (omni dropless, switch in capacity mode). The manifest run
    hears its utterances speed-perturbed, reverberated, noisy and through a telephone channel (``data.augment``,
    drawn from the seed, epoch and utterance). The sharded run resumes within its second epoch, in the middle of
    a rank's sequence of shards, whose batch counts differ between the ranks; it computes its features on the
    device, with SpecAugment masks (drawn in the loader, applied on the device)."""
    augment = {"speed_perturb": [0.9, 1.0, 1.1],
               "augment": {"noise_prob": 0.5, "reverb_prob": 0.3, "telephone_prob": 0.3}}
    config = tiny_config(tmp_path, mode, bf16={"enabled": True}, data_types={"grad_accum_dtype": "bf16"},
                         data={"features_on": features_on} | (
                             {"specaugment": {"freq_masks": 2, "time_masks": 2}} if features_on == "device" else
                             augment))
    extra = shard_flags(corpus, tmp_path / "shards") if source == "shards" else []
    extra += ["--set", "moe.dropless=false"] if mode == "switch" else []  # bf16 in both dispatches
    whole = launch(config, corpus, tmp_path / "whole", 2, extra + ["--set", "run.save_every=12"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert (f"from {tmp_path / 'shards'};" in whole.stdout) == (source == "shards")
    shutil.copytree(tmp_path / "whole", tmp_path / "split",
                    ignore=shutil.ignore_patterns(".lock", "step24", "results.json"))
    second = launch(config, corpus, tmp_path / "split", 2, extra)
    assert second.returncode == 0 and "resumed from" in second.stdout and "step12" in second.stdout, \
        second.stderr[-3000:]
    rows = {r["step"]: r for r in json.loads((tmp_path / "whole" / "results.json").read_text())["train"]}
    if source == "shards":  # every epoch ends where the first rank runs out of batches (1250 frames a batch)
        counts = [[len(list(ShardSet([str(tmp_path / "shards")], 20.0).batches(1250, 1234, e, r, 2)))
                   for r in (0, 1)] for e in range(4)]
        assert any(a != b for a, b in counts)
        ends = [sum(min(c) for c in counts[:e + 1]) for e in range(4)]
        assert [r["epoch"] for r in rows.values()] == [sum(s >= end for end in ends) for s in rows]
    resumed = json.loads((tmp_path / "split" / "results.json").read_text())["train"]
    assert [r["step"] for r in resumed] == [16, 20, 24]
    written = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in written] == [("train", s) for s in range(4, 25, 4)] + [("eval", 24)]
    for r in resumed:
        assert (r["loss"], r["ctc"], r["epoch"]) == (rows[r["step"]]["loss"], rows[r["step"]]["ctc"],
                                                     rows[r["step"]]["epoch"])
    if mode == "omni":  # bf16 ZeRO 1 dropless, as the paper configs: the consolidated model is its weights in fp32
        proc = run_tool("tools/consolidate_checkpoint.py", str(tmp_path / "split"), "--out", str(tmp_path / "model"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights = load_file(str(tmp_path / "model" / "model.safetensors"))
        saved = torch.load(tmp_path / "split" / "checkpoints" / "step24" / MODEL_STATES, weights_only=False)
        assert all(t.dtype == torch.float32 for t in weights.values())
        dense = [k for k in weights if ".deepspeed_experts." not in k]  # the shared router under its first name
        assert dense and all(saved["module"][k].dtype == torch.bfloat16 and torch.equal(weights[k],
                                                                                       saved["module"][k].float())
                             for k in dense)
    a, b = (tmp_path / run / "checkpoints" / "step24" for run in ("whole", "split"))
    for f in sorted(a.glob("*model_states.pt")):  # dense states and every expert file, by global id
        sa, sb = (torch.load(d / f.name, weights_only=False, map_location="cpu") for d in (a, b))
        sa, sb = (s.get("module", s) for s in (sa, sb))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f.name


def test_bad_data_is_skipped_by_two_ranks_or_refused_when_strict(tmp_path, corpus):
    manifest, n = bad_manifest(corpus, tmp_path)  # five bad rows after the n good ones
    cmd = ["--train_manifest", str(manifest), "--dev_manifest", str(corpus / "dev.jsonl")]
    proc = launch(tiny_config(tmp_path), corpus, tmp_path / "run", 2, cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"train.jsonl:{n + 1}: not JSON" in proc.stdout \
        and f"train.jsonl:{n + 5}: not UTF-8 (byte 0xef" in proc.stdout
    # The audio of rows n + 2 to n + 4 is not looked at before it is loaded: skipped, named and counted then.
    assert f"skipping {manifest}:{n + 2}: audio {tmp_path / 'nowhere.flac'} unreadable" in proc.stderr
    assert f"skipping {manifest}:{n + 3}" in proc.stderr and "skipped 3 utterances whose audio" in proc.stdout
    assert f"skipping {manifest}:{n + 4}" in proc.stderr and "4 samples are NaN or infinite" in proc.stderr
    strict = launch(tiny_config(tmp_path), corpus, tmp_path / "strict", 2, cmd + ["--strict_data"])
    assert strict.returncode == 2 and "unusable rows (strict_data)" in strict.stderr
    assert f"train.jsonl:{n + 1}: not JSON" in strict.stderr and f"train.jsonl:{n + 2}: audio" in strict.stderr
    assert not (tmp_path / "strict" / "checkpoints").exists()


def test_missing_cmvn_file_is_a_clear_error(tmp_path, corpus):
    cfg = json.loads(Path(tiny_config(tmp_path)).read_text())
    cfg["omni_router"]["data"]["global_cmvn"] = str(tmp_path / "nowhere.json")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = launch(str(tmp_path / "c.json"), corpus, tmp_path / "run", 2)
    assert proc.returncode != 0 and "data error" in proc.stderr and "nowhere.json" in proc.stderr


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block after ``heading`` in the README, as written (comments dropped,
    continued lines joined)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if line.startswith("#"):
            continue
        current += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


TINY = ("--set model.d_model=32 --set model.num_layers=2 --set model.num_heads=2 --set model.ffn_dim=64 "
        "--set data.vocab_size=48 --set data.batch_frames=2500 --set data.max_frames_per_rank=0 "
        "--set data.num_workers=0 --set run.max_steps=1")


def test_the_readme_libriheavy_commands_run_as_written_on_a_stand_in(tmp_path, corpus):
    """Libriheavy's layout under data/libriheavy made from the embedded corpus (tools/make_cuts.py); every
    command of the README's Libriheavy section, as written, with the model and batch shrunk by --set, to step 1."""
    repo = tmp_path / "repo"
    lhotse = repo / "data" / "libriheavy" / "upper_no_punc" / "lhotse"
    lhotse.mkdir(parents=True)
    for name in ("trainer", "tools", "ds_configs"):
        (repo / name).symlink_to(ROOT / name)
    for subset, split in (("large", "train"), ("small", "train"), ("dev", "dev")):  # paths under data/libriheavy
        written = make_cuts(str(corpus / f"{split}.jsonl"), str(repo / "data" / "libriheavy" / f"{subset}.jsonl.gz"))
        written.rename(lhotse / f"libriheavy_cuts_{subset}.jsonl.gz")
    commands = readme_commands("### Libriheavy, the paper's data")
    assert [c.split()[:3] for c in commands] == [["python", "-m", "tools.make_shards"]] + [
        ["deepspeed", "trainer/main.py", "--deepspeed_config"]] * 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    read = ["", "shards, read lazily, from data/libriheavy/shards/large;",
            "from data/libriheavy/upper_no_punc/lhotse/libriheavy_cuts_small.jsonl.gz;"]
    for i, command in enumerate(commands):
        flags = "" if i == 0 else f" {TINY} --set run.output_dir=runs/{i}"
        proc = subprocess.run(["bash", "-c", command + flags], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert read[i] in proc.stdout, proc.stdout[-2000:]
        if i:
            assert json.loads((repo / "runs" / str(i) / "results.json").read_text())["dev"]["step"] == 1
