"""tools/evaluate.py's output files."""
from pathlib import Path

from tools.evaluate import output_paths


def test_an_output_prefix_with_dots_keeps_them_and_a_given_suffix_is_not_doubled():
    # A grid's prefixes such as "beam/w0.5-s1" once all became "beam/w0.md": one file for every setting.
    assert output_paths("beam/w0.5-s1") == {ext: Path(f"beam/w0.5-s1{ext}") for ext in (".md", ".csv", ".json")}
    assert output_paths("results/wer.md")[".csv"] == Path("results/wer.csv")
    assert output_paths("results/wer")[".json"] == Path("results/wer.json")
