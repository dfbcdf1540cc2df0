"""The benchmarks run and print their figures (smoke runs at tiny sizes; the figures are not asserted), and the
routing comparison runs end to end."""
import json
import re
from pathlib import Path

import pytest

from tests.support.builders import run_tool
from tools.harness import tiny_config

pytestmark = pytest.mark.slow


def test_bench_step_prints_a_row_per_mode_and_the_ratio(tmp_path):
    proc = run_tool("tools/bench_step.py", "--config", tiny_config(tmp_path), "--frames", "400", "--utt_frames", "100",
                    "--rounds", "2", "--steps", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("dense", "switch", "omni"):
        assert any(line.startswith(mode) and "," in line for line in proc.stdout.splitlines()), proc.stdout
    assert "omni/switch step-time ratio:" in proc.stdout and "switch/dense step-time ratio:" in proc.stdout


def test_bench_data_prints_throughput_and_profile(corpus):
    proc = run_tool("tools/bench_data.py", "--manifest", str(corpus / "dev.jsonl"), "--workers", "0,2",
                    "--utterances", "20", "--shard_size", "5", "--repeats", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device / loader" in proc.stdout and "shards / files" in proc.stdout and "in 4 shards" in proc.stdout
    assert "x real time on cpu (one thread)" in proc.stdout and "log-mel" in proc.stdout
    assert len([ln for ln in proc.stdout.splitlines() if ln.strip().startswith(("0 ", "2 "))]) == 2


def test_bench_moe_layer_prints_a_ratio_per_variant(tmp_path):
    proc = run_tool("tools/bench_moe_layer.py", "--experts", "4", "--tokens", "256", "--d_model", "32", "--ffn",
                    "64", "--rounds", "1", "--steps", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = [line.split() for line in proc.stdout.splitlines() if line.split()[:2] == ["4", "256"]]
    assert len(row) == 6 and all(x.endswith("x") for x in row[3:])


def test_compare_routing_trains_each_mode_once_evaluates_and_reports(tmp_path, corpus):
    """Two modes, one seed, locally: a second call trains nothing again and writes the same report (all three
    modes run on the SLURM cluster in test_slurm)."""
    out = tmp_path / "cmp"
    args = ["-m", "tools.compare_routing", "--config", tiny_config(tmp_path, run={"max_steps": 2}), "--seeds", "7",
            "--modes", "dense", "omni",
            "--out", str(out), "--test", f"test_ood={corpus / 'test_ood.jsonl'}", "--", "--corpus_dir", str(corpus)]
    first = run_tool(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (out / "report.md").read_text()
    for mode in ("dense", "omni"):
        results = json.loads((out / "runs" / f"{mode}-seed7" / "results.json").read_text())
        assert results["dev"]["step"] == 2
        cfg = json.loads((out / "configs" / f"{mode}-seed7.json").read_text())["omni_router"]
        assert (cfg["moe"]["mode"], cfg["run"]["seed"]) == (mode, 7)
        assert f"| {mode} | 1 | " in report
    assert "| mode | seeds | test_ood WER | test_ood CER | OOD average WER | OOD average CER |" in report
    assert "| omni vs dense |" in report and "switch" not in report
    paired = re.search(r"^\| dense \| OOD average \| ([+-]\d+\.\d\d) \| [+-][\d.]+% \| "
                       r"\[([+-][\d.]+), ([+-][\d.]+)\] \| ([\d.]+) \| [+-][\d.]+ \| (yes|no) \| - \|$", report,
                       re.M)  # the paired bootstrap, one seed
    assert paired and float(paired[2]) <= float(paired[1]) <= float(paired[3]), report
    assert paired[5] == ("yes" if float(paired[3]) < 0 or float(paired[2]) > 0 else "no")
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG") and (out / "routing.png").exists()
    assert json.loads((corpus / "corpus.json").read_text())["seed"] == 1234  # seed 7 trained on the same corpus
    second = run_tool(*args)
    assert second.returncode == 0 and second.stderr.count("finished, not trained again") == 2
    assert (out / "report.md").read_text() == report


def test_a_planned_comparison_gives_every_run_its_own_tensorboard_folder(tmp_path):
    from tools.compare_routing import plan
    tasks = plan("ds_configs/paper/omni_8x84m.json", ["dense", "switch", "omni"], [1, 2], tmp_path)
    boards = []
    for name, config, run in tasks:
        board = json.loads(config.read_text())["tensorboard"]
        assert board["enabled"] and board["job_name"] == name and Path(board["output_path"]).parent == run
        boards.append(board["output_path"])
    assert len(set(boards)) == len(tasks) == 6


def test_the_ood_average_is_the_suites_sets_by_default_and_the_sets_named_ood_otherwise():
    from tools.compare_routing import default_tests, ood_sets
    from trainer.data.corpus import OOD_SUITE
    defaults = default_tests("ds_configs/omni.json")
    assert "test_ood" in dict(defaults) and ood_sets(defaults, defaults=True) == list(OOD_SUITE)
    given = [("clean", "c.jsonl"), ("other_ood", "o.jsonl")]
    assert ood_sets(given, defaults=False) == ["other_ood"]
