"""Transcription, evaluation, routing analysis and run plots on consolidated models of real two-rank runs."""
import csv
import json
import shutil

import pytest
from safetensors.torch import save_file

from tests.support.builders import run_tool as tool
from tools.harness import launch, tiny_config
from tools.make_cuts import make_cuts
from trainer.config import ProjectConfig
from trainer.data.text import normalize
from trainer.model.ctc import CTCModel

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    for mode, run in trained.items():
        proc = tool("tools/consolidate_checkpoint.py", str(run), "--out", str(out / mode))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {mode: out / mode for mode in trained}


def manifest_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_transcribe_files_and_a_manifest(models, corpus, tmp_path):
    rows = manifest_rows(corpus / "dev.jsonl")
    files = [str(corpus / rows[i]["audio_filepath"]) for i in range(3)]
    proc = tool("tools/transcribe.py", "--model", str(models["omni"]), *files, "--manifest", str(corpus / "dev.jsonl"),
                "--out", str(tmp_path / "hyps.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 + len(rows) and [ln.split("\t")[0] for ln in lines[:3]] == files
    written = manifest_rows(tmp_path / "hyps.jsonl")
    assert len(written) == len(lines) and written[3]["ref"] == rows[0]["text"]
    assert all(isinstance(r["text"], str) for r in written)


def test_evaluate_table_matches_the_trainers_own_dev_wer(models, trained, corpus, tmp_path):
    # dev as a Lhotse cut set (long recordings, relative paths): it must score as the trainer's manifest did
    dev = make_cuts(str(corpus / "dev.jsonl"), str(tmp_path / "cuts" / "dev.jsonl.gz"), join=3)
    proc = tool("tools/evaluate.py", "--model", f"omni={models['omni']}", "--model", f"switch={models['switch']}",
                "--test", str(dev), "--test", str(corpus / "test.jsonl"), "--cuts_root", str(tmp_path / "cuts"),
                "--out", str(tmp_path / "wer"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader(open(tmp_path / "wer.csv")))
    assert rows[0] == ["model", "dev WER", "test WER", "dev CER", "test CER", "average WER", "average CER"]
    assert [r[0] for r in rows[1:]] == ["omni", "switch"]
    for r in rows[1:]:
        assert abs(float(r[5]) - (float(r[1]) + float(r[2])) / 2) <= 0.006
        assert abs(float(r[6]) - (float(r[3]) + float(r[4])) / 2) <= 0.006
    # The fp32 run: same features, precision and decoding as the trainer's own evaluation.
    trainer_dev = json.loads((trained["omni"] / "results.json").read_text())["dev"]["sets"]["dev"]
    assert float(rows[1][1]) == pytest.approx(trainer_dev["wer"], abs=0.006)
    assert float(rows[1][3]) == pytest.approx(trainer_dev["cer"], abs=0.006)
    assert (tmp_path / "wer.md").read_text().startswith("| model | dev WER | test WER | dev CER |")


def test_evaluation_does_not_depend_on_batch_size_or_world_size(models, trained, corpus, tmp_path):
    """Nothing is dropped at evaluation: the same WER with small and large batches, on 1 and 2 ranks."""
    tables = []
    for frames in (300, 20000):  # from a few utterances per batch to the whole dev set in one
        proc = tool("tools/evaluate.py", "--model", f"omni={models['omni']}", "--test", f"dev={corpus / 'dev.jsonl'}",
                    "--max_frames", str(frames), "--out", str(tmp_path / f"wer{frames}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        tables.append(list(csv.reader(open(tmp_path / f"wer{frames}.csv"))))
    assert tables[0] == tables[1]
    two_ranks = json.loads((trained["omni"] / "results.json").read_text())["dev"]
    run = tmp_path / "run"
    shutil.copytree(trained["omni"], run)
    config = next(trained["omni"].parent.glob("omni-*.json"))  # the config the fixture trained with
    proc = launch(str(config), corpus, run, 1, ["--eval_only", "--reset_optimizer"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_rank = json.loads((run / "eval_step16.json").read_text())
    assert one_rank["sets"]["dev"]["wer"] == two_ranks["sets"]["dev"]["wer"]
    assert one_rank["sets"]["dev"]["loss"] == pytest.approx(two_ranks["sets"]["dev"]["loss"], rel=1e-5)
    loads = [[x for layer in r["routing"]["layers"] for x in layer["load"]] for r in (one_rank, two_ranks)]
    assert loads[0] == pytest.approx(loads[1])


@pytest.mark.parametrize("mode", ["omni", "switch"])
def test_analyze_routing_writes_usage_dependency_and_an_utterance_map(models, corpus, tmp_path, mode):
    out = tmp_path / "analysis"
    proc = tool("tools/analyze_routing.py", "--model", str(models[mode]), "--manifest", str(corpus / "dev.jsonl"),
                "--out", str(out), "--utterance", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "routing.json").read_text())
    assert summary["mode"] == mode and len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert abs(sum(layer["usage"]) - 1) < 1e-6 and 0 <= layer["router_entropy"] <= 1.3863
    for key in ("nmi", "cramers_v"):
        m = summary[key]
        assert all(0 <= v <= 1 + 1e-9 for row in m for v in row)
        assert m[0][1] == pytest.approx(m[1][0])
    duration = manifest_rows(corpus / "dev.jsonl")[2]["duration"]
    stack = json.loads((models[mode] / "config.json").read_text())["project_config"]["model"]["frame_stacking"]
    choices = summary["utterance"]["choices"]  # one per encoder frame: 10 ms x frame_stacking
    assert len(choices) == 2 and abs(len(choices[0]) - duration * 100 / stack) <= 1
    for png in ("dependency.png", "utterance.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_plot_runs(trained, tmp_path):
    proc = tool("tools/plot_runs.py", f"omni={trained['omni']}", str(trained["switch"]), "--out",
                str(tmp_path / "curves.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG and "omni (" in proc.stdout and "switch (" in proc.stdout


def test_tools_name_wrong_paths_and_checkpoints_of_another_kind(trained, models, corpus, tmp_path):
    ds = tool("tools/transcribe.py", "--model", str(trained["omni"]), "--manifest", str(corpus / "dev.jsonl"))
    assert ds.returncode == 2 and "run tools/consolidate_checkpoint.py first" in ds.stderr
    gone = tool("tools/evaluate.py", "--model", str(models["omni"]), "--test", str(tmp_path / "no.jsonl"), "--out",
                str(tmp_path / "x"))
    assert gone.returncode == 2 and str(tmp_path / "no.jsonl") in gone.stderr
    (tmp_path / "noise.wav").write_text("not audio")
    bad = tool("tools/transcribe.py", "--model", str(models["omni"]), str(tmp_path / "noise.wav"))
    assert bad.returncode == 2 and f"{tmp_path / 'noise.wav'}: not a readable audio file" in bad.stderr
    not_run = tool("tools/plot_runs.py", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert not_run.returncode == 2 and f"{tmp_path}: no metrics.jsonl" in not_run.stderr
    for script in ("consolidate_checkpoint", "transcribe", "evaluate", "analyze_routing", "plot_runs", "train_ngram"):
        helped = tool(f"tools/{script}.py", "--help")
        assert helped.returncode == 0 and "usage:" in helped.stdout


def test_a_causal_cape_model_trains_consolidates_transcribes_and_evaluates(corpus, tmp_path):
    """One run with both options (each is unit-tested in unit/model/test_ctc): the consolidated model records them and
    scores its dev set as the trainer did."""
    variant = {"positions": "cape", "causal": True}
    sets = [arg for k, v in variant.items() for arg in ("--set", f"model.{k}={json.dumps(v)}")]
    run = tmp_path / "run"
    proc = launch(tiny_config(tmp_path, run={"max_steps": 6}), corpus, run, 1, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tool("tools/consolidate_checkpoint.py", str(run), "--out", str(tmp_path / "model")).returncode == 0
    recorded = json.loads((tmp_path / "model" / "config.json").read_text())["project_config"]["model"]
    assert all(recorded[k] == v for k, v in variant.items())
    rows = manifest_rows(corpus / "dev.jsonl")
    heard = tool("tools/transcribe.py", "--model", str(tmp_path / "model"), str(corpus / rows[0]["audio_filepath"]))
    assert heard.returncode == 0 and heard.stdout.startswith(str(corpus / rows[0]["audio_filepath"]) + "\t")
    scored = tool("tools/evaluate.py", "--model", f"m={tmp_path / 'model'}", "--test", f"dev={corpus / 'dev.jsonl'}",
                  "--out", str(tmp_path / "wer"))
    assert scored.returncode == 0, scored.stderr[-3000:]
    dev = json.loads((run / "results.json").read_text())["dev"]["sets"]["dev"]
    table = list(csv.reader(open(tmp_path / "wer.csv")))
    assert [float(x) for x in table[1][1:3]] == pytest.approx([dev["wer"], dev["cer"]], abs=0.006)


def test_a_roster_through_the_tools_k1_and_a_cold_roster_transcribe_as_plain_and_a_dense_model_is_refused(
        models, corpus, tmp_path):
    dev = str(corpus / "dev.jsonl")
    plain = tool("tools/transcribe.py", "--model", str(models["switch"]), "--manifest", dev)
    assert plain.returncode == 0, plain.stderr[-3000:]
    for flags in (["--roster", "1"], ["--roster", "3", "--roster_temperature", "1e-6"]):
        same = tool("tools/transcribe.py", "--model", str(models["switch"]), "--manifest", dev, *flags)
        assert same.returncode == 0 and same.stdout == plain.stdout, (flags, same.stderr[-2000:])
    seeded = [tool("tools/transcribe.py", "--model", str(models["switch"]), "--manifest", dev, "--roster", "4",
                   "--roster_temperature", "3", "--seed", seed).stdout for seed in ("5", "5", "6")]
    assert seeded[0] == seeded[1] and seeded[0] != plain.stdout
    dense = tmp_path / "dense"  # a consolidated dense model: the omni folder's files, its config made dense
    meta = json.loads((models["omni"] / "config.json").read_text())
    meta["project_config"]["moe"]["mode"] = "dense"
    project = ProjectConfig.model_validate(meta["project_config"])
    dense.mkdir()
    shutil.copyfile(models["omni"] / "tokenizer.model", dense / "tokenizer.model")
    save_file(CTCModel(project.model, project.moe, meta["vocab_size"]).state_dict(), str(dense / "model.safetensors"))
    (dense / "config.json").write_text(json.dumps(meta))
    refused = tool("tools/evaluate.py", "--model", str(dense), "--test", dev, "--roster", "2", "--out",
                   str(tmp_path / "x"))
    assert refused.returncode == 2 and "a dense model has no router, so no roster of experts" in refused.stderr
    assert tool("tools/evaluate.py", "--model", str(dense), "--test", dev, "--out", str(tmp_path / "y")).returncode == 0


def test_a_word_ngram_of_the_training_texts_decodes_in_the_beam_through_evaluate(models, corpus, tmp_path):
    """tools/train_ngram.py builds KenLM's lmplz from its pinned source on first use (minutes, once per machine)."""
    made = tool("tools/train_ngram.py", "--manifest", str(corpus / "train.jsonl"), "--order", "3", "--out",
                str(tmp_path / "lm"))
    assert made.returncode == 0, made.stderr[-3000:]
    words = set((tmp_path / "lm" / "words.txt").read_text().split())
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    assert words == {w for t in texts for w in normalize(t).split()}
    assert "ngram 3=" in (tmp_path / "lm" / "lm.arpa").read_text()[:200]
    results = {}
    for name, flags in (("greedy", []), ("arpa", ["--lm", str(tmp_path / "lm" / "lm.arpa")]),
                        ("binary", ["--lm", str(tmp_path / "lm" / "lm.bin"), "--lm_words",
                                    str(tmp_path / "lm" / "words.txt")])):
        decoder = ["--decoder", "beam", "--beam", "10"] if flags else []
        proc = tool("tools/evaluate.py", "--model", f"omni={models['omni']}", "--test", str(corpus / "dev.jsonl"),
                    *decoder, *flags, "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["omni"]["dev"]
        assert results[name]["seconds"] > 0 and results[name]["audio_seconds"] > 0
    assert results["arpa"]["wer"] == results["binary"]["wer"]  # one model in two formats
    no_beam = tool("tools/evaluate.py", "--model", str(models["omni"]), "--test", str(corpus / "dev.jsonl"), "--lm",
                   str(tmp_path / "lm" / "lm.arpa"), "--out", str(tmp_path / "z"))
    assert no_beam.returncode == 2 and "--lm decodes with the beam: add --decoder beam" in no_beam.stderr
