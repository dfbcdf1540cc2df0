"""tools/train_tokenizer.py: a tokenizer trained on a manifest's texts, and the same batches with it from
DataLoader workers."""
import torch

from tools.train_tokenizer import main as train_tokenizer
from trainer.config import DataConfig
from trainer.data.batches import SpeechDataset, length_batches, loader
from trainer.data.sources import read_manifest
from trainer.data.text import Tokenizer


def test_tokenizer_tool_and_workers_give_the_same_batches(tmp_path, corpus):
    out = tmp_path / "sp.model"
    assert train_tokenizer(["--manifest", str(corpus / "train.jsonl"), "--vocab_size", "40", "--out", str(out)]) == 0
    tok = Tokenizer(str(out))
    assert tok.decode(tok.encode("The Crosswise, dimension!")) == "the crosswise dimension"
    assert train_tokenizer(["--manifest", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    utts, _ = read_manifest(str(corpus / "dev.jsonl"), 20.0)
    ds = SpeechDataset(utts, tok, DataConfig(cache_features=False), 80, train=False)
    batches = length_batches(utts, 3000)
    serial = [b["feats"] for b in loader(ds, batches, 0)]
    parallel = [b["feats"] for b in loader(ds, batches, 2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and len(serial) == len(parallel)
