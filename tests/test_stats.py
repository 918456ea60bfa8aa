"""Error bars (align/math/stats.py): the clustered standard error and the bootstrap interval of the win
rate, whose coverage is checked on a distribution with a known win rate."""
import math

import pytest
import torch

from align.math.stats import win_rate_interval


def test_win_rate_interval_edges_and_errors():
    a, b = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.0])
    assert win_rate_interval(a, b) == (1.0, 1.0)  # every pair won: no spread
    assert win_rate_interval(b, b) == (0.5, 0.5)  # every pair tied: 1/2 exactly
    with pytest.raises(ValueError, match="same non-empty shape"):
        win_rate_interval(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="n = 2"):
        win_rate_interval(torch.zeros(3), torch.zeros(3), n=2)
    with pytest.raises(ValueError, match="level"):
        win_rate_interval(a, b, level=1.0)


def test_win_rate_interval_covers_the_true_win_rate():
    """a ~ N(0.3, 1), b ~ N(0, 1): the win rate is Phi(0.3 / sqrt(2)). Over 300 data sets of 100
    pairs, the 90% interval holds it in close to 90% of them (binomial sd 1.7%)."""
    truth = 0.5 * (1 + math.erf(0.3 / math.sqrt(2) / math.sqrt(2)))
    g = torch.Generator().manual_seed(0)
    hits = 0
    for k in range(300):
        a, b = torch.randn(100, generator=g) + 0.3, torch.randn(100, generator=g)
        low, high = win_rate_interval(a, b, level=0.9, resamples=1000, seed=k)
        hits += low <= truth <= high
    assert 0.84 <= hits / 300 <= 0.95, hits / 300


def test_clustered_interval_is_wider_than_one_that_ignores_the_clusters():
    """Samples of one prompt agree (a prompt effect): resampling prompts, not samples, widens the
    interval, as the clustered standard error does."""
    g = torch.Generator().manual_seed(1)
    effect = torch.randn(40, 1, generator=g).repeat(1, 8)  # 40 prompts x 8 samples
    a = (effect + 0.3 * torch.randn(40, 8, generator=g)).view(-1)
    b = torch.zeros(320)
    low_c, high_c = win_rate_interval(a, b, n=8)
    low_i, high_i = win_rate_interval(a, b, n=1)
    assert high_c - low_c > 1.5 * (high_i - low_i)


def test_sign_test_is_the_exact_binomial_tail():
    from align.math.stats import sign_test

    assert sign_test(2, 0) == 0.5  # 16/16 against 14/16 good prompts, the two where they differ
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == sign_test(0, 10) == 2 / 1024
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    with pytest.raises(ValueError, match="wins and losses"):
        sign_test(-1, 2)


def test_paired_verdict_reads_the_interval_of_the_mean_difference():
    from align.math.stats import paired_interval, paired_verdict

    assert paired_interval(torch.full((7,), 0.25)) == (0.25, 0.25)
    a = torch.tensor([1.0] * 16)
    b = torch.tensor([1.0] * 14 + [0.0] * 2)
    v = paired_verdict(a, b)
    assert (v["a_better"], v["b_better"], v["sign_p"], v["prompts"]) == (2, 0, 0.5, 16)
    # A resample misses both differing prompts with probability (14/16)^16 = 0.12 > 0.025: inconclusive.
    assert v["mean_diff"] == 0.125 and v["ci"][0] == 0.0 and v["verdict"] is None
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g, dtype=torch.float64)
    assert paired_verdict(base + 1.0, base)["verdict"] is True
    assert paired_verdict(base - 1.0, base)["verdict"] is False
    noise = torch.randn(64, generator=g, dtype=torch.float64)
    assert paired_verdict(base + 0.001 * noise, base)["verdict"] is None
    with pytest.raises(ValueError, match="one value per prompt"):
        paired_verdict(torch.zeros(3), torch.zeros(4))
