"""Checkpoint checks that need no process group: whether a checkpoint folder is usable (``problem``,
``newest_usable``), which rank verifies which file, and the run folder's tokenizer restored from a checkpoint's
copy (the run-level cases: scenarios/test_robustness)."""
import json
import shutil

import pytest
import torch

from tools.harness import RunsCode, flip_byte
from trainer import checkpoint
from trainer.data.text import Tokenizer

TEXTS = [f"the {w} sat on the mat with a {v}" for w in ("cat", "dog", "bird", "fish") for v in ("hat", "bat", "cap")]


def test_each_file_is_verified_by_a_rank_that_loads_it_and_the_bytes_are_shared():
    files = {"mp_rank_00_model_states.pt": 50, **{f"layer_{n}_expert_{e}_mp_rank_00_model_states.pt": 20
                                                   for n in (0, 1) for e in range(4)},
             **{f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 100 for r in range(4)},
             **{f"rng_rank{r}.pt": 1 for r in range(4)}, "tokenizer.model": 5, "cmvn.json": 1}
    files = {k: {"bytes": v, "sha256": None} for k, v in files.items()}
    owner = checkpoint.share(files, 4, checkpoint.rank_readers(4, 2, 4))  # ep rank r % 2: experts 2r, 2r + 1
    assert all(owner[f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] == r for r in range(4))
    assert all(owner[f"rng_rank{r}.pt"] == r for r in range(4))
    assert all(owner[f"layer_{n}_expert_{e}_mp_rank_00_model_states.pt"] % 2 == e // 2
               for n in (0, 1) for e in range(4))
    load = [sum(files[n]["bytes"] for n in owner if owner[n] == r) for r in range(4)]
    assert sum(load) == sum(f["bytes"] for f in files.values()) and max(load) - min(load) <= 50


def run_folder(tmp_path, tags=("step4", "step8")):
    """A run folder whose tokenizer was copied into checkpoints with records (``publish``, as a save does)."""
    out = tmp_path / "run"
    Tokenizer.train(TEXTS, str(out / checkpoint.TOKENIZER), 20)
    for tag in tags:
        (out / "checkpoints" / tag).mkdir(parents=True)
        shutil.copyfile(out / checkpoint.TOKENIZER, out / "checkpoints" / tag / checkpoint.TOKENIZER)
        checkpoint.publish(out / "checkpoints", tag, {})
    return out


def test_a_damaged_tokenizer_is_restored_from_the_newest_checkpoint_copy_that_matches_its_record(tmp_path, capsys):
    out = run_folder(tmp_path)
    good = (out / checkpoint.TOKENIZER).read_bytes()
    (out / checkpoint.TOKENIZER).write_bytes(good[:100])
    (out / "checkpoints" / "step8" / checkpoint.TOKENIZER).write_bytes(good[:-1] + b"x")  # not as recorded
    assert checkpoint.restore_tokenizer(out)
    assert (out / checkpoint.TOKENIZER).read_bytes() == good
    said = capsys.readouterr().out
    assert f"{out / checkpoint.TOKENIZER}: not a readable sentencepiece model" in said
    assert f"restored from {out / 'checkpoints' / 'step4' / checkpoint.TOKENIZER}" in said
    assert Tokenizer(str(out / checkpoint.TOKENIZER)).vocab_size == 20
    assert checkpoint.restore_tokenizer(out) and not capsys.readouterr().out  # a readable one is left alone


def test_a_damaged_tokenizer_with_no_copy_to_restore_is_a_clear_error_and_a_missing_one_is_trained(tmp_path):
    out = run_folder(tmp_path, tags=())
    (out / checkpoint.TOKENIZER).write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"tokenizer.model: not a readable sentencepiece model .* no checkpoint in "
                                         r".* holds a copy .* Restore the file from a backup; or, .* delete it"):
        checkpoint.restore_tokenizer(out)
    (out / checkpoint.TOKENIZER).unlink()
    assert not checkpoint.restore_tokenizer(out)  # nothing to restore: the caller trains a new one


def checkpoint_folder(ckpt_dir, tag: str, publish: bool = True):
    """A checkpoint ``tag`` as a save leaves it: weights in a ``.pt`` file, a JSON file, and (``publish``) the
    record of every file with its size and SHA-256."""
    (ckpt_dir / tag).mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(64.0)}, "step": int(tag[4:])}, ckpt_dir / tag / "model_states.pt")
    (ckpt_dir / tag / checkpoint.CMVN).write_text('{"mean": [0.5, 0.25], "std": [1.0, 2.0]}')
    if publish:
        checkpoint.publish(ckpt_dir, tag, {})
    return ckpt_dir / tag


def test_a_complete_checkpoint_as_recorded_is_usable(tmp_path):
    folder = checkpoint_folder(tmp_path, "step4")
    assert json.loads((folder / checkpoint.RECORD).read_text())["files"].keys() == {"model_states.pt",
                                                                                  checkpoint.CMVN}
    assert checkpoint.problem(tmp_path, "step4") == ""
    assert (tmp_path / "latest").read_text() == "step4"


def test_a_checkpoint_without_its_record_is_incomplete(tmp_path):
    checkpoint_folder(tmp_path, "step4", publish=False)  # the save did not get as far as the record
    assert checkpoint.problem(tmp_path, "step4") == (f"{tmp_path / 'step4'}: incomplete (no complete.json; the save "
                                                     "did not finish)")


def test_a_recorded_file_that_is_missing_is_named(tmp_path):
    folder = checkpoint_folder(tmp_path, "step4")
    (folder / checkpoint.CMVN).unlink()
    assert checkpoint.problem(tmp_path, "step4") == f"{folder / checkpoint.CMVN}: missing"


def test_a_file_of_another_size_than_recorded_is_named_with_both_sizes(tmp_path):
    folder = checkpoint_folder(tmp_path, "step4")
    size = (folder / "model_states.pt").stat().st_size
    with open(folder / "model_states.pt", "ab") as f:
        f.write(b"\0" * 10)
    assert checkpoint.problem(tmp_path, "step4") == (f"{folder / 'model_states.pt'}: {size + 10} bytes, {size} "
                                                     "recorded")


@pytest.mark.parametrize("name", ["model_states.pt", checkpoint.CMVN])
def test_a_file_changed_at_the_same_size_is_caught_by_its_sha256(tmp_path, name):
    folder = checkpoint_folder(tmp_path, "step4")
    flip_byte(folder / name, 0x01)  # one bit: same size, every other check of the file would pass
    assert checkpoint.problem(tmp_path, "step4") == (f"{folder / name}: content differs from the SHA-256 recorded "
                                                     "when it was written (corrupted)")


def test_a_pt_file_that_would_run_code_when_loaded_is_refused_and_the_code_never_runs(tmp_path):
    folder = checkpoint_folder(tmp_path / "checkpoints", "step4", publish=False)
    marker = tmp_path / "RAN"
    torch.save({"module": {"w": torch.zeros(2)}, "note": RunsCode(marker)}, folder / "model_states.pt")
    checkpoint.publish(tmp_path / "checkpoints", "step4", {})  # recorded as it is: size and SHA-256 match
    why = checkpoint.problem(tmp_path / "checkpoints", "step4")
    assert why.startswith(f"{folder / 'model_states.pt'}: refused: it holds posix.system, which no checkpoint "
                          "of this trainer holds"), why
    assert not marker.exists()


def test_newest_usable_falls_back_to_the_newest_checkpoint_that_verifies_and_says_why_newer_ones_do_not(tmp_path):
    for tag in ("step4", "step8", "step12"):
        checkpoint_folder(tmp_path, tag)
    checkpoint_folder(tmp_path, "step16", publish=False)  # a save cut short
    (tmp_path / "step12" / checkpoint.CMVN).write_text("{}")  # another size
    assert checkpoint.newest_usable(tmp_path) == ("step8", [
        f"{tmp_path / 'step16'}: incomplete (no complete.json; the save did not finish)",
        f"{tmp_path / 'step12' / checkpoint.CMVN}: 2 bytes, 40 recorded"])
    (tmp_path / "step8" / "model_states.pt").unlink()
    (tmp_path / "step4" / checkpoint.RECORD).unlink()
    tag, warnings = checkpoint.newest_usable(tmp_path)
    assert tag == "" and len(warnings) == 4 and warnings[-1].endswith("incomplete (no complete.json; the save did "
                                                                      "not finish)")


def scored_checkpoint(ckpt_dir, tag: str, dev_wer):
    """A checkpoint folder whose dense states hold a record with ``dev_wer`` (None: saved without evaluation)."""
    (ckpt_dir / tag).mkdir(parents=True)
    record = checkpoint.Record(project_config={}, step=checkpoint.step_of(tag), dev_wer=dev_wer)
    torch.save(record.client_state(), ckpt_dir / tag / checkpoint.MODEL_STATES)


def test_the_run_keeps_its_newest_and_its_best_scored_checkpoints_and_prunes_the_rest(tmp_path):
    wers = {"step10": 40.0, "step20": None, "step30": 31.0, "step40": 35.0, "step50": 31.0, "step60": None,
            "step70": 33.0, "step80": None}
    for tag, wer in wers.items():
        scored_checkpoint(tmp_path, tag, wer)
    keep = checkpoint.Keep(last=2, best=3, also=set())
    # Best three by WER (the newer of two equal first): step50, step30, step70; and the newest two: step70, step80.
    assert keep.tags(tmp_path) == {"step50", "step30", "step70", "step80"}
    assert checkpoint.Keep(last=1, best=1, also=set()).tags(tmp_path) == {"step50", "step80"}
    assert checkpoint.Keep(last=0, best=1, also=set()).tags(tmp_path) == set(wers)
    # The best of a run written before records held their WER is kept by its name.
    assert checkpoint.Keep(last=1, best=1, also={"step20", "step99"}).tags(tmp_path) == {"step80", "step50", "step20"}
