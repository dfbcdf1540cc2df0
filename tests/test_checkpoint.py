"""Checkpoint checks that need no process group: which rank verifies which file, and the run folder's tokenizer
restored from a checkpoint's copy (the run-level cases: test_robustness)."""
import shutil

import pytest

from trainer import checkpoint
from trainer.text import Tokenizer

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
