"""align/math/bon.py against brute force, closed forms, Monte Carlo and hand-worked cases."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from align.math.bon import (
    bon_distribution,
    bon_kl_closed_form,
    bon_select,
    bon_win_rate_closed_form,
    expected_win_rate,
    kl_divergence,
    tie_rate,
    win_rate,
    worst_best_joint,
)

F64 = torch.float64


def brute_force_bon(probs, rewards, n):
    """Enumerate all V^n tuples; uniform tie-breaking among the samples at the maximal reward."""
    out = torch.zeros(len(probs), dtype=F64)
    for tup in itertools.product(range(len(probs)), repeat=n):
        mass = math.prod(probs[k].item() for k in tup)
        top = max(rewards[k].item() for k in tup)
        tied = [k for k in tup if rewards[k].item() == top]
        for k in tied:
            out[k] += mass / len(tied)
    return out


def brute_force_joint(probs, rewards, n):
    v = len(probs)
    out = torch.zeros(v, v, dtype=F64)
    for tup in itertools.product(range(v), repeat=n):
        mass = math.prod(probs[k].item() for k in tup)
        worst = min(tup, key=lambda k: rewards[k].item())
        best = max(tup, key=lambda k: rewards[k].item())
        out[worst, best] += mass
    return out


PROBS4 = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=F64)
DISTINCT4 = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=F64)  # unsorted on purpose
TIED4 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)  # two levels of two outcomes


@pytest.mark.parametrize("rewards", [DISTINCT4, TIED4], ids=["distinct", "tied"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bon_distribution_matches_brute_force(rewards, n):
    got = bon_distribution(PROBS4, rewards, n)
    assert got.dtype == F64
    assert_close(got, brute_force_bon(PROBS4, rewards, n), rtol=0, atol=1e-12)


def test_bon_distribution_hand_worked_tie():
    # probs [.5, .25, .25], rewards [0, 1, 1], n = 2.
    # Level 0: F = .5, F^- = 0 -> .5^2 = .25.  Level 1: F = 1, F^- = .5 -> 1 - .25 = .75,
    # shared by p among the two tied outcomes (.25 each of .5) -> .375, .375.
    got = bon_distribution(torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.0, 1.0, 1.0]), 2)
    assert_close(got, torch.tensor([0.25, 0.375, 0.375], dtype=F64), rtol=0, atol=1e-15)


def test_bon_distribution_n1_is_pi0_and_zero_mass_outcomes_stay_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5], dtype=F64)
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0], dtype=F64)
    assert_close(bon_distribution(probs, rewards, 1), probs, rtol=0, atol=1e-15)
    # n = 3: outcome 1 (reward 1) wins only if all draws are it: .5^3; outcome 3 takes the rest.
    expected = torch.tensor([0.0, 0.125, 0.0, 0.875], dtype=F64)
    assert_close(bon_distribution(probs, rewards, 3), expected)


def test_bon_distribution_float32_probs_are_renormalized():
    # float32 softmax sums to 1 only to ~1e-7; the float64 result should still sum to 1 to 1e-12.
    probs = torch.softmax(torch.randn(1000, generator=torch.Generator().manual_seed(3)), 0)
    rewards = torch.arange(1000.0)
    assert abs(probs.double().sum().item() - 1.0) > 1e-12  # the premise
    assert abs(bon_distribution(probs, rewards, 4).sum().item() - 1.0) < 1e-12


def test_bon_distribution_validates_inputs():
    p, r = PROBS4, DISTINCT4
    with pytest.raises(ValueError, match="n must be"):
        bon_distribution(p, r, 0)
    with pytest.raises(ValueError, match="probs"):
        bon_distribution(p.view(2, 2), r, 2)
    with pytest.raises(ValueError, match="probs"):
        bon_distribution(torch.tensor([1.2, -0.2, 0.0, 0.0]), r, 2)
    with pytest.raises(ValueError, match="probs"):
        bon_distribution(p * 2, r, 2)
    with pytest.raises(ValueError, match="rewards"):
        bon_distribution(p, r[:3], 2)


@pytest.fixture(scope="module")
def large_space():
    """10,000 outcomes, log-normal probabilities, distinct Gaussian rewards."""
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(10_000, generator=g, dtype=F64).exp()
    probs /= probs.sum()
    rewards = torch.randn(10_000, generator=g, dtype=F64)
    assert torch.unique(rewards).numel() == rewards.numel()
    return probs, rewards


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_bon_matches_continuous_closed_forms(large_space, n):
    # With max p ~ 2e-3 the discrete values are within ~2e-5 of the continuous ones (KL at n = 32
    # is the worst); 1e-4 still separates n from n +- 1 everywhere (closed forms differ by > 1e-3).
    probs, rewards = large_space
    bon = bon_distribution(probs, rewards, n)
    assert abs(bon.sum().item() - 1.0) < 1e-12
    assert abs(expected_win_rate(bon, probs, rewards) - n / (n + 1)) < 1e-4
    assert abs(kl_divergence(bon, probs) - (math.log(n) - (n - 1) / n)) < 1e-4


def test_on_a_small_space_the_closed_forms_are_strict_upper_bounds():
    """Distinct rewards on a few outcomes: exact KL and win rate sit strictly below log n - (n-1)/n and
    n/(n+1) (the limit of vanishing outcome probabilities), e.g. uniform over 5 at n = 8."""
    uniform, ranks = torch.full((5,), 0.2, dtype=F64), torch.arange(5, dtype=F64)
    bon = bon_distribution(uniform, ranks, 8)
    assert kl_divergence(bon, uniform) == pytest.approx(1.0997354, abs=1e-6) and 1.0997354 < bon_kl_closed_form(8)
    assert expected_win_rate(bon, uniform, ranks) == pytest.approx(0.8629548, abs=1e-6) and 0.8629548 < bon_win_rate_closed_form(8)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        v = int(torch.randint(2, 8, (1,), generator=g))
        probs = torch.rand(v, generator=g, dtype=F64) ** 3
        probs /= probs.sum()
        rewards = torch.randn(v, generator=g, dtype=F64)
        for n in (2, 3, 8, 32):
            bon = bon_distribution(probs, rewards, n)
            assert kl_divergence(bon, probs) < bon_kl_closed_form(n)
            assert expected_win_rate(bon, probs, rewards) < bon_win_rate_closed_form(n)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_bon_kl_estimated_from_samples_recovers_the_closed_form(n):
    """Continuous rewards: BoN outputs (max of n Gaussian draws) against 4,000 independent reference
    draws per prompt; the mean of log n + (n-1) log F(r) is log n - (n-1)/n within sampling error."""
    from align.math.bon import bon_log_ratio_estimate

    g = torch.Generator().manual_seed(n)
    P, m, k = 4, 2000, 4000
    chosen = torch.randn(P, m, n, generator=g, dtype=F64).amax(-1)
    refs = torch.randn(P, k, generator=g, dtype=F64)
    est = bon_log_ratio_estimate(chosen, refs, n)
    assert est.shape == (P, m)
    stderr = est.std().item() / math.sqrt(P * m)
    assert abs(est.mean().item() - bon_kl_closed_form(n)) < 4 * stderr + 2e-3, (est.mean().item(), bon_kl_closed_form(n))
    if n == 1:
        assert torch.equal(est, torch.zeros(P, m, dtype=F64))


def test_bon_kl_estimated_from_samples_with_ties_is_the_level_laws():
    """Rewards on 4 levels: the estimate from references is the exact KL of BoN with ties shared,
    not the continuous formula (which would go negative here)."""
    from align.math.bon import bon_log_ratio_estimate

    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64)
    levels = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64)
    n, g = 4, torch.Generator().manual_seed(3)
    draws = levels[torch.multinomial(probs, 3000 * n + 20_000, replacement=True, generator=g)]
    chosen, refs = draws[: 3000 * n].view(1, 3000, n).amax(-1), draws[3000 * n :].view(1, -1)
    est = bon_log_ratio_estimate(chosen, refs, n)
    exact = kl_divergence(bon_distribution(probs, levels, n), probs)
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(est.numel()) + 5e-3, (est.mean().item(), exact)
    assert exact < bon_kl_closed_form(n)


def test_bon_with_ties_matches_monte_carlo_sampler():
    # Sampler: n iid draws, best reward, uniform among tied maxima (bon_select with a generator).
    probs = torch.tensor([0.1, 0.2, 0.15, 0.25, 0.2, 0.1], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 2.0], dtype=F64)
    n, draws = 3, 200_000
    g = torch.Generator().manual_seed(1)
    idx = torch.multinomial(probs, draws * n, replacement=True, generator=g).view(draws, n)
    pick = bon_select(rewards[idx], generator=g)
    outcome = idx[torch.arange(draws), pick]
    freq = torch.bincount(outcome, minlength=6).to(F64) / draws

    exact = bon_distribution(probs, rewards, n)
    assert abs(exact.sum().item() - 1.0) < 1e-12
    sigma = (exact * (1 - exact) / draws).sqrt().clamp_min(1e-12)
    assert ((freq - exact).abs() / sigma).max() < 5.0
    # The test has power: a rule that gives a tied level to its first outcome is many sigma off.
    wrong = exact.clone()
    wrong[1], wrong[2] = exact[1] + exact[2], 0.0
    assert ((freq - wrong).abs() / sigma).max() > 5.0


def test_bon_select_argmax_lowest_index_on_ties():
    rewards = torch.tensor([[1.0, 3.0, 3.0], [5.0, 2.0, 5.0], [0.0, 0.0, 0.0], [-1.0, -2.0, 4.0]])
    expected = torch.tensor([1, 0, 0, 2])
    assert torch.equal(bon_select(rewards), expected)
    assert torch.equal(bon_select(rewards.flatten(), n=3), expected)
    with pytest.raises(ValueError, match="n"):
        bon_select(rewards.flatten())
    with pytest.raises(ValueError, match="n=2"):
        bon_select(rewards, n=2)


def test_bon_select_random_ties_stay_among_maxima_and_cover_them():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 3.0]]).expand(3000, 4)
    picks = bon_select(rewards, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=4)
    assert counts[0] == 0
    # Each of the 3 tied indices gets ~1000 +- 26 (binomial sd); 850 is ~6 sd below.
    assert (counts[1:] > 850).all()


def test_win_rate_and_tie_rate_hand_worked():
    a = torch.tensor([3.0, 2.0, 5.0, 5.0])
    b = torch.tensor([1.0, 2.0, 4.0, 6.0])
    # wins at 0 and 2, tie at 1, loss at 3: (1 + 0.5 + 1 + 0) / 4 = 0.625; ties 1/4.
    assert win_rate(a, b) == pytest.approx(0.625, abs=1e-12)
    assert win_rate(b, a) == pytest.approx(0.375, abs=1e-12)
    assert tie_rate(a, b) == pytest.approx(0.25, abs=1e-12)
    with pytest.raises(ValueError, match="rewards_a"):
        win_rate(a, b[:3])


def test_expected_win_rate_and_kl_hand_worked():
    p_a = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    p_b = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    rewards = torch.tensor([0.0, 1.0, 1.0])
    # Level 0: a = .5, b = .2, nothing below -> .5 * (0 + .2 / 2) = .05.
    # Level 1: a = .5, b = .8, .2 below -> .5 * (.2 + .8 / 2) = .3.  Total .35.
    assert expected_win_rate(p_a, p_b, rewards) == pytest.approx(0.35, abs=1e-12)
    # KL([.5, .5, 0] || [.25, .25, .5]) = 2 * .5 * log 2 = log 2; reversed is infinite.
    q = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    assert kl_divergence(p_a, q) == pytest.approx(math.log(2), abs=1e-12)
    assert kl_divergence(q, p_a) == math.inf


def test_closed_forms():
    assert bon_win_rate_closed_form(3) == pytest.approx(0.75)
    assert bon_kl_closed_form(1) == 0.0
    assert bon_kl_closed_form(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="n"):
        bon_kl_closed_form(0)


def test_worst_best_joint_matches_brute_force_and_bon():
    n = 3
    joint = worst_best_joint(PROBS4, DISTINCT4, n)
    assert_close(joint, brute_force_joint(PROBS4, DISTINCT4, n), rtol=0, atol=1e-12)
    assert abs(joint.sum().item() - 1.0) < 1e-12
    assert_close(joint.sum(0), bon_distribution(PROBS4, DISTINCT4, n), rtol=0, atol=1e-12)
    # Diagonal = p^3; a worst with a higher reward than the best is impossible.
    assert_close(joint.diagonal(), PROBS4**3, rtol=0, atol=1e-15)
    assert (joint[DISTINCT4[:, None] > DISTINCT4[None, :]] == 0).all()


def test_worst_best_joint_large_space_marginals():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(200, generator=g, dtype=F64), 0)
    rewards = torch.randn(200, generator=g, dtype=F64)
    joint = worst_best_joint(probs, rewards, 8)
    assert abs(joint.sum().item() - 1.0) < 1e-12
    assert_close(joint.sum(0), bon_distribution(probs, rewards, 8), rtol=0, atol=1e-12)
    # Worst-of-n is best-of-n under negated rewards.
    assert_close(joint.sum(1), bon_distribution(probs, -rewards, 8), rtol=0, atol=1e-12)


def test_worst_best_joint_rejects_ties():
    with pytest.raises(ValueError, match="distinct"):
        worst_best_joint(PROBS4, TIED4, 2)


def brute_force_best_of_k(ranking, grades, k):
    """Every k-subset of the n draws, equally likely; the best by ranking, ties broken uniformly."""
    total, subsets = 0.0, list(itertools.combinations(range(len(ranking)), k))
    for subset in subsets:
        top = max(ranking[i] for i in subset)
        best = [i for i in subset if ranking[i] == top]
        total += sum(grades[i] for i in best) / len(best)
    return total / len(subsets)


def test_best_of_k_expectation_matches_every_subset_with_ties():
    """The U-statistic equals the average over all C(n, k) subsets, with rankings full of ties (a 0/1
    verifier) and grades from another reward; at k = n it is the argmax's (mean over tied) grade, and at
    k = 1 the plain mean."""
    from align.math.bon import best_of_k_expectation

    gen = torch.Generator().manual_seed(0)
    ranking = torch.randint(0, 3, (5, 7), generator=gen).double()
    grades = torch.randn(5, 7, generator=gen, dtype=F64)
    for k in range(1, 8):
        got = best_of_k_expectation(ranking, grades, k)
        want = torch.tensor([brute_force_best_of_k(ranking[p].tolist(), grades[p].tolist(), k) for p in range(5)], dtype=F64)
        assert_close(got, want, rtol=0, atol=1e-12)
    assert_close(best_of_k_expectation(ranking, grades, 1), grades.mean(1), rtol=0, atol=1e-12)
    # pass@k (Chen et al. 2107.03374): c of n right answers, ranked by themselves: 1 - C(n-c, k) / C(n, k).
    right = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0]], dtype=F64)
    for k in range(1, 9):
        assert best_of_k_expectation(right, right, k).item() == pytest.approx(1 - math.comb(6, k) / math.comb(8, k), abs=1e-12)
    with pytest.raises(ValueError, match=r"k must be in \[1, n = 7\], got 8"):
        best_of_k_expectation(ranking, grades, 8)
    with pytest.raises(ValueError, match="equal"):
        best_of_k_expectation(ranking, grades[:, :3], 2)
