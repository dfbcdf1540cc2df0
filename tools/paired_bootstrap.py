"""Is system A's WER lower than B's, beyond what the test utterances and the seeds happen to be? Paired statistics.

Bisani and Ney's bootstrap for ASR ("Bootstrap estimates for confidence intervals in ASR performance
evaluation", ICASSP 2004): resample the test utterances with replacement and recompute both systems' WER on the
same resample; the spread of the difference over resamples is its uncertainty from the choice of utterances.
Here A and B come in seed pairs (per seed the two modes see the same data order and draws), so each resample
is drawn once and used for every seed, and the difference on it is the mean over seeds of A's WER minus B's.
That interval is the uncertainty from the test utterances of the mean over these trained seeds; how much a
new seed would move it is the seeds' own spread, given beside it as a t-interval over the per-seed differences
(``seed_low``, ``seed_high``). Over several test sets (an out-of-domain average) each set is resampled on its
own and the per-set differences are averaged, as the average WER is.

Input, per set: ``errors[system][seed]`` = {utterance key: (word errors, reference words)}; keys present in
every run are paired (an utterance unreadable in one run is left out of all).
"""
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student's t, 1..10 dof


@dataclass
class Paired:
    """A - B in WER points (negative: A is better), and A - B relative to B's WER."""
    difference: float  # on the full sets, mean over seeds (and sets)
    low: float  # 2.5th percentile over resamples
    high: float  # 97.5th percentile
    p_better: float  # share of resamples where A's WER is lower
    per_seed: list  # the full-set difference of each seed (mean over sets)
    relative: float  # difference / B's WER, on the full sets

    @property
    def seed_interval(self) -> tuple:
        """The 95% t-interval of the mean of the per-seed differences (None with one seed)."""
        n = len(self.per_seed)
        if n < 2:
            return None
        half = T_975[min(n - 1, len(T_975)) - 1] * float(np.std(self.per_seed, ddof=1)) / n ** 0.5
        return self.difference - half, self.difference + half

    @property
    def separated(self) -> bool:
        """The 95% interval excludes zero."""
        return self.high < 0 or self.low > 0


def _arrays(a_seeds: list[dict], b_seeds: list[dict]):
    """(A errors [S, U], B errors [S, U], words [U]) over the utterances every run scored."""
    keys = sorted(set.intersection(*(set(r) for r in a_seeds + b_seeds)), key=str)
    errors = [np.array([[run[k][0] for k in keys] for run in runs], dtype=np.float64) for runs in (a_seeds, b_seeds)]
    words = np.array([a_seeds[0][k][1] for k in keys], dtype=np.float64)
    return errors[0], errors[1], words


def paired_bootstrap(sets: list[tuple[list[dict], list[dict]]], resamples: int = RESAMPLES,
                     seed: int = 0) -> Paired:
    """A vs B over ``sets``, each ``(A's runs, B's runs)`` in seed order (one dict per seed; see the module's
    docstring). The per-set WER differences (mean over seeds) are averaged over sets, on the full sets and on
    each resample."""
    rng = np.random.default_rng(seed)
    full, draws, per_seed, b_wer = [], [], [], []
    for a_seeds, b_seeds in sets:
        if len(a_seeds) != len(b_seeds):
            raise ValueError(f"unpaired seeds: {len(a_seeds)} runs of A, {len(b_seeds)} of B")
        a_SU, b_SU, words_U = _arrays(a_seeds, b_seeds)
        diff_S = 100 * (a_SU.sum(1) - b_SU.sum(1)) / words_U.sum()
        per_seed.append(diff_S)
        full.append(diff_S.mean())
        b_wer.append(100 * b_SU.sum(1).mean() / words_U.sum())
        idx_RU = rng.integers(0, len(words_U), size=(resamples, len(words_U)))
        draws.append((100 * (a_SU[:, idx_RU].sum(-1) - b_SU[:, idx_RU].sum(-1)) / words_U[idx_RU].sum(-1)).mean(0))
    mean_R = np.mean(draws, axis=0)
    difference = float(np.mean(full))
    return Paired(difference, float(np.percentile(mean_R, 2.5)), float(np.percentile(mean_R, 97.5)),
                  float((mean_R < 0).mean()), [float(x) for x in np.mean(per_seed, axis=0)],
                  difference / float(np.mean(b_wer)))
