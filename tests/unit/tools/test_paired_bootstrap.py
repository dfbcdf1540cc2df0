"""tools/paired_bootstrap.py: the paired bootstrap over utterances and seeds; trainer.decode.utterance_errors."""
import random

from tools.paired_bootstrap import paired_bootstrap
from trainer.decode import error_rates, utterance_errors


def runs(errors_per_seed: list[list[int]], words: int = 10) -> list[dict]:
    return [{f"u{i}": (e, words) for i, e in enumerate(errors)} for errors in errors_per_seed]


def test_two_identical_systems_differ_by_an_interval_around_zero_and_are_not_separated():
    rng = random.Random(1)
    same = runs([[rng.randint(0, 10) for _ in range(200)] for _ in range(3)])
    r = paired_bootstrap([(same, same)])
    assert r.difference == 0 and r.low <= 0 <= r.high and r.p_better == 0 and not r.separated


def test_a_system_better_on_every_utterance_is_better_with_probability_one():
    rng = random.Random(2)
    b = [[rng.randint(2, 10) for _ in range(200)] for _ in range(3)]
    a = [[e - rng.randint(1, 2) for e in seed] for seed in b]
    r = paired_bootstrap([(runs(a), runs(b)), (runs(a), runs(b))])
    assert r.p_better == 1.0 and r.high < 0 and r.separated
    assert len(r.per_seed) == 3 and all(d < 0 for d in r.per_seed)


def test_two_systems_that_trade_utterances_evenly_are_not_separated():
    rng = random.Random(3)
    b = [[rng.randint(3, 7) for _ in range(300)] for _ in range(2)]
    a = [[e + rng.choice((-2, 2)) for e in seed] for seed in b]
    r = paired_bootstrap([(runs(a), runs(b))])
    assert r.low < 0 < r.high and 0.02 < r.p_better < 0.98


def test_the_full_set_difference_is_the_corpus_wer_difference_and_utterances_missing_in_a_run_are_left_out():
    refs = ["the cat sat on the mat", "a dog", "one two three four"]
    hyp_a = ["the cat sat on mat", "a dog", "one two three for"]
    hyp_b = ["the bat sat on a mat", "dog", ""]
    a = [dict(enumerate(utterance_errors(refs, hyp_a)))]
    b = [dict(enumerate(utterance_errors(refs, hyp_b)))]
    r = paired_bootstrap([(a, b)], resamples=10)
    expected = error_rates(refs, hyp_a)["wer"] - error_rates(refs, hyp_b)["wer"]
    assert abs(r.difference - expected) < 1e-9, (r.difference, expected)
    del b[0][2]  # unreadable in B's run: compared on the other two
    r = paired_bootstrap([(a, b)], resamples=10)
    expected = error_rates(refs[:2], hyp_a[:2])["wer"] - error_rates(refs[:2], hyp_b[:2])["wer"]
    assert abs(r.difference - expected) < 1e-9


def test_the_seed_interval_is_students_t_over_the_per_seed_differences():
    b = [[5] * 50, [5] * 50, [5] * 50]
    a = [[4] * 50, [5] * 50, [3] * 50]  # per seed -10, 0, -20 points (10 words each)
    r = paired_bootstrap([(runs(a), runs(b))], resamples=10)
    assert r.per_seed == [-10.0, 0.0, -20.0] and abs(r.difference + 10) < 1e-9
    low, high = r.seed_interval
    assert abs(low - (-10 - 4.303 * 10 / 3 ** 0.5)) < 1e-9 and abs(high - (-10 + 4.303 * 10 / 3 ** 0.5)) < 1e-9
    assert paired_bootstrap([(runs(a[:1]), runs(b[:1]))], resamples=10).seed_interval is None
