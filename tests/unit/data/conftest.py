"""Fixtures of the data tests."""
import pytest

from trainer.data.text import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small tokenizer (30 pieces) trained on a few sentences, once per test module."""
    path = tmp_path_factory.mktemp("tok") / "t.model"
    return Tokenizer.train(["hello world", "a tone for testing", "the quick brown fox"] * 5, str(path), 30)
