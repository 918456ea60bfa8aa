"""Best-of-n sampling as exact math over a finite outcome space: its law, its (worst, best) law.

Everything here takes two 1-D tensors, ``probs`` (pi_0 over V outcomes) and ``rewards`` (r of
each outcome), and computes in float64 so closed-form checks hold to ~1e-12; the win rates and KLs
that check BoN against its closed forms live here too. References: Beirami et al. 2401.01879;
Gui, Garbacea, Veitch 2406.00832 (BoNBoN); Amini, Vieira, Cotterell 2407.06057 (variational BoN).
See docs/algorithms.md, sections BoN and BoNBoN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Tolerance on sum(probs) == 1: loose enough for probs that came through float32, tight enough to
# catch unnormalized weights.
_SUM_TOL = 1e-6


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")


def _check_dist(probs: Tensor, name: str) -> Tensor:
    """Validate a finite distribution and return it as float64, renormalized."""
    if not isinstance(probs, Tensor) or probs.dim() != 1 or probs.numel() == 0:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got {shape}")
    p = probs.detach().to(torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite and nonnegative")
    total = p.sum().item()
    if abs(total - 1.0) > _SUM_TOL:
        raise ValueError(f"{name} must sum to 1, sums to {total:.9g}")
    # Renormalize so float32 rounding in the input does not show up as a 1e-7 error downstream.
    return p / p.sum()


def _check_rewards(rewards: Tensor, v: int, name: str = "rewards") -> Tensor:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or rewards.numel() != v:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {v} (same as probs), got {shape}")
    r = rewards.detach()
    if r.is_floating_point() and torch.isnan(r).any():
        raise ValueError(f"{name} must not contain NaN")
    return r


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """sum_{k < i} x_k for (L,) x; exact 0 at i = 0 (cumsum(x) - x can round to -1e-17)."""
    return torch.cat([x.new_zeros(1), torch.cumsum(x, 0)[:-1]])


def _reward_levels(rewards: Tensor, *masses: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Group outcomes by distinct reward level (ascending).

    Returns ``inverse`` (V,) mapping each outcome to its level, and for each mass vector (V,) its
    total per level (L,).
    """
    levels, inverse = torch.unique(rewards, sorted=True, return_inverse=True)
    out = []
    for m in masses:
        out.append(torch.zeros(levels.numel(), dtype=m.dtype).index_add_(0, inverse, m))
    return inverse, out


def bon_distribution(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact distribution of best-of-n sampling from ``probs`` under ``rewards``.

    Amini et al. 2407.06057 (Eq. for pi_bon over a finite space) and Gui et al. 2406.00832:
    the best of n iid draws has reward level r with probability F(r)^n - F^-(r)^n, where
    F(r) = P[R <= r] and F^-(r) = P[R < r] under ``probs``. Ties are broken uniformly among the
    tied samples, so a level's mass is shared among its outcomes in proportion to their
    probability. With distinct rewards this is the familiar pi_bon(y) = F(r(y))^n - F^-(r(y))^n.
    Because the draws are exchangeable, lowest-index tie-breaking (``bon_select``'s default)
    induces the same law.

    Args:
        probs: (V,) pi_0 over the outcomes; nonnegative, sums to 1.
        rewards: (V,) reward of each outcome (any real dtype; ties allowed).
        n: number of draws, >= 1.

    Returns:
        (V,) float64 tensor, pi_bon in the same outcome order.
    """
    _check_n(n)
    p = _check_dist(probs, "probs")
    r = _check_rewards(rewards, p.numel())
    inverse, (level_mass,) = _reward_levels(r, p)  # (V,), (L,)
    # F^- per level as an exclusive cumsum, so the lowest occupied level has F^- = 0 exactly.
    f_below = _exclusive_cumsum(level_mass)  # (L,)
    f_at = f_below + level_mass  # F per level
    # F^n - F^-^n = F^n * (1 - (1 - m/F)^n), written with log1p/expm1: the direct difference
    # cancels badly for large n and small level mass m.
    ratio = torch.where(f_at > 0, level_mass / f_at.clamp_min(1e-300), torch.zeros_like(f_at))
    level_bon = f_at.pow(n) * -torch.expm1(n * torch.log1p(-ratio))  # (L,)
    level_bon = torch.where(f_at > 0, level_bon, torch.zeros_like(level_bon))
    # Share each level's mass among its outcomes in proportion to p (uniform tie-breaking).
    share = torch.where(level_mass[inverse] > 0, p / level_mass[inverse].clamp_min(1e-300), 0.0)
    return level_bon[inverse] * share


def worst_best_joint(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    """Exact joint law P(worst = i, best = j) of the extremes of n iid draws from ``probs``.

    docs/algorithms.md, BoNBoN (the BoNBoN training pair of Gui et al. 2406.00832). With outcomes
    sorted by reward, CDF F and F^- just below, for i < j (inclusion-exclusion on "all draws in
    [i, j]" minus those missing i or j):
        (F_j - F^-_i)^n - (F_j - F_i)^n - (F^-_j - F^-_i)^n + (F^-_j - F_i)^n,
    and p_i^n on the diagonal (all n draws equal). Rewards must be distinct so that "worst" and
    "best" are outcomes, not tie classes.

    Args:
        probs: (V,) pi_0; nonnegative, sums to 1.
        rewards: (V,) distinct rewards.
        n: number of draws, >= 1.

    Returns:
        (V, V) float64 tensor J with J[i, j] = P(worst = i, best = j), indexed in the original
        (unsorted) outcome order; zero wherever r_i > r_j. Row sums are the law of the worst,
        column sums the law of the best (= bon_distribution).
    """
    _check_n(n)
    p = _check_dist(probs, "probs")
    r = _check_rewards(rewards, p.numel())
    if torch.unique(r).numel() != r.numel():
        raise ValueError("rewards must be distinct for worst_best_joint")
    order = torch.argsort(r)  # sorted position -> original index
    ps = p[order]
    f_below = _exclusive_cumsum(ps)  # F^-_k, (V,)
    f_at = f_below + ps  # F_k
    # Row index i = worst, column j = best; clamp rounding negatives before the power.
    a = (f_at[None, :] - f_below[:, None]).clamp_min(0).pow(n)  # (F_j - F^-_i)^n
    b = (f_at[None, :] - f_at[:, None]).clamp_min(0).pow(n)  # (F_j - F_i)^n
    c = (f_below[None, :] - f_below[:, None]).clamp_min(0).pow(n)  # (F^-_j - F^-_i)^n
    d = (f_below[None, :] - f_at[:, None]).clamp_min(0).pow(n)  # (F^-_j - F_i)^n
    joint = torch.triu(a - b - c + d, diagonal=1) + torch.diag(ps.pow(n))
    joint = joint.clamp_min(0)
    inv = torch.argsort(order)  # original index -> sorted position
    return joint[inv][:, inv]


def bon_select(
    rewards: Tensor, n: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Index of the best of n samples per prompt (docs/algorithms.md, BoN).

    Args:
        rewards: (P, n) rewards, or flat (P * n,) with ``n`` given (rows are consecutive groups).
        n: group size for flat input; if given with 2-D input it must equal rewards.shape[1].
        generator: if None (default) ties go to the lowest index, deterministically; otherwise
            ties are broken uniformly at random among the tied maxima using this generator
            (which must live on rewards' device).

    Returns:
        (P,) int64 tensor of column indices in [0, n).
    """
    if not isinstance(rewards, Tensor):
        raise ValueError(f"rewards must be a tensor, got {type(rewards).__name__}")
    if rewards.dim() == 1:
        if n is None:
            raise ValueError("n is required when rewards is 1-D (shape (P * n,))")
        _check_n(n)
        if rewards.numel() % n:
            raise ValueError(f"rewards length {rewards.numel()} is not a multiple of n={n}")
        rewards = rewards.reshape(-1, n)
    elif rewards.dim() == 2:
        if n is not None and n != rewards.shape[1]:
            raise ValueError(f"n={n} does not match rewards.shape[1]={rewards.shape[1]}")
    else:
        raise ValueError(f"rewards must be (P, n) or (P * n,), got {tuple(rewards.shape)}")
    if rewards.shape[1] == 0:
        raise ValueError("rewards must have at least one sample per prompt")
    if rewards.is_floating_point() and torch.isnan(rewards).any():
        raise ValueError("rewards must not contain NaN")
    if generator is None:
        return torch.argmax(rewards, dim=1)  # documented: first maximal index
    is_max = rewards == rewards.max(dim=1, keepdim=True).values  # (P, n)
    keys = torch.rand(rewards.shape, generator=generator, device=rewards.device)
    return torch.argmax(torch.where(is_max, keys, -1.0), dim=1)


def _paired(rewards_a: Tensor, rewards_b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = torch.as_tensor(rewards_a), torch.as_tensor(rewards_b)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(
            f"rewards_a and rewards_b must be non-empty with equal shapes, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.detach(), b.detach()


def win_rate(rewards_a: Tensor, rewards_b: Tensor) -> float:
    """Paired win rate of a over b with ties counted 1/2 (docs/algorithms.md, Evaluation).

    mean(1[a > b] + 0.5 * 1[a == b]) over elements of two equal-shape tensors. Returns a float.
    """
    a, b = _paired(rewards_a, rewards_b)
    return ((a > b).double() + 0.5 * (a == b).double()).mean().item()


def tie_rate(rewards_a: Tensor, rewards_b: Tensor) -> float:
    """Fraction of pairs with a == b (equal shapes). Returns a float."""
    a, b = _paired(rewards_a, rewards_b)
    return (a == b).double().mean().item()


def bon_win_rate_closed_form(n: int) -> float:
    """Win rate of BoN over pi_0 for continuous rewards: n / (n + 1) (Beirami et al. 2401.01879)."""
    _check_n(n)
    return n / (n + 1)


def bon_kl_closed_form(n: int) -> float:
    """KL(pi_bon || pi_0) = log n - (n - 1) / n for continuous rewards (Beirami et al. 2401.01879).

    An upper bound when rewards have ties.
    """
    _check_n(n)
    return math.log(n) - (n - 1) / n


def bon_log_ratio_estimate(chosen: Tensor, references: Tensor, n: int) -> Tensor:
    """Per BoN output, an estimate of log pi_bon(y|x) / pi_0(y|x) from independent pi_0 draws of the
    same prompt; its mean over outputs estimates KL(pi_bon || pi_0). With ties shared at random,
    pi_bon / pi_0 depends on y only through its reward level (Beirami et al. 2401.01879):

        (F(r)^n - F(r-)^n) / (F(r) - F(r-)),   and n F(r)^(n-1) where no other draw ties it,

    with F(r) = P(reward <= r), F(r-) = P(reward < r) under pi_0: the continuous law's
    log n + (n - 1) log F when rewards do not tie. F is estimated by the references' fractions,
    floored at 1 / (2k) for an output below every reference.

    chosen: (P, m) the selecting reward of each output; references: (P, k) that reward of k pi_0
    draws of the same prompt, independent of those outputs' candidates. Returns (P, m) float64."""
    _check_n(n)
    chosen, references = chosen.double(), references.double()
    if chosen.dim() != 2 or references.dim() != 2 or chosen.shape[0] != references.shape[0] or references.shape[1] < 1:
        raise ValueError(f"chosen (P, m) and references (P, k >= 1) with the same P, got {tuple(chosen.shape)} and "
                         f"{tuple(references.shape)}")
    k = references.shape[1]
    below = (references[:, None, :] < chosen[:, :, None]).sum(-1).double() / k  # F(r-)
    upto = ((references[:, None, :] <= chosen[:, :, None]).sum(-1).double() / k).clamp(min=0.5 / k)  # F(r)
    tied = upto > below
    level = (upto.pow(n) - below.pow(n)) / torch.where(tied, upto - below, torch.ones_like(upto))
    return torch.where(tied, level, n * upto.pow(n - 1)).log()


def kl_divergence(p: Tensor, q: Tensor) -> float:
    """KL(p || q) = sum_y p(y) log(p(y) / q(y)) for finite distributions (V,), in float64.

    Terms with p(y) = 0 contribute 0; p(y) > 0 with q(y) = 0 gives inf. Returns a float.
    """
    p64 = _check_dist(p, "p")
    q64 = _check_dist(q, "q")
    if p64.shape != q64.shape:
        raise ValueError(
            f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    support = p64 > 0
    if (q64[support] == 0).any():
        return math.inf
    ps, qs = p64[support], q64[support]
    return (ps * (ps.log() - qs.log())).sum().item()


def expected_win_rate(p_a: Tensor, p_b: Tensor, rewards: Tensor) -> float:
    """Exact P[r(A) > r(B)] + 0.5 * P[r(A) = r(B)] for independent A ~ p_a, B ~ p_b.

    The population version of ``win_rate`` (docs/algorithms.md, BoN closed forms). Computed by
    reward level in O(V log V): with per-level masses a_l, b_l and B^-_l = P_b[R < level l],
    the win rate is sum_l a_l * (B^-_l + b_l / 2).

    Args:
        p_a, p_b: (V,) distributions over the same outcomes.
        rewards: (V,) rewards (ties allowed).

    Returns:
        float.
    """
    a = _check_dist(p_a, "p_a")
    b = _check_dist(p_b, "p_b")
    if a.shape != b.shape:
        raise ValueError(
            f"p_a and p_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    r = _check_rewards(rewards, a.numel())
    _, (a_l, b_l) = _reward_levels(r, a, b)
    b_below = _exclusive_cumsum(b_l)
    return (a_l * (b_below + 0.5 * b_l)).sum().item()


def best_of_k_expectation(ranking: Tensor, grades: Tensor, k: int) -> Tensor:
    """E[grade of the best of k], estimated without bias from n >= k draws per prompt.

    ``ranking`` and ``grades`` are (P, n): what selects (the reward BoN ranks by) and what is measured
    (the same reward, a held-out judge, or a win indicator against pi_0). The best of a uniformly random
    k-subset of the n draws, ties in ``ranking`` broken uniformly, has expected grade
    sum_i C(i-1, k-1) / C(n, k) * g_(i) over the draws sorted by ranking (the i-th is the subset's best
    exactly when it is in the subset with k-1 of the i-1 below it), each g_(i) replaced by the mean
    grade of its tie group. For a 0/1 verifier ranking itself this is pass@k (Chen et al. 2107.03374,
    eq. 1); in general the U-statistic of the best-of-k curve drawn from one set of n samples.
    Returns (P,) float64.
    """
    r, g = torch.as_tensor(ranking, dtype=torch.float64), torch.as_tensor(grades, dtype=torch.float64)
    if r.dim() != 2 or r.shape != g.shape or r.shape[1] == 0:
        raise ValueError(f"ranking and grades must be equal (P, n) shapes with n >= 1, got {tuple(r.shape)} and {tuple(g.shape)}")
    n = r.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n = {n}], got {k}")
    order = r.argsort(dim=1, stable=True)
    r_sorted, g_sorted = r.gather(1, order), g.gather(1, order)
    # Probability that sorted position i (0-based) is the subset's best: C(i, k-1) / C(n, k).
    weight = torch.tensor([math.comb(i, k - 1) / math.comb(n, k) for i in range(n)], dtype=torch.float64)
    out = torch.empty(r.shape[0], dtype=torch.float64)
    for p in range(r.shape[0]):
        levels, group = torch.unique_consecutive(r_sorted[p], return_inverse=True)
        mass = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, group, weight)
        mean_grade = torch.zeros(len(levels), dtype=torch.float64).index_add_(0, group, g_sorted[p])
        mean_grade /= torch.bincount(group, minlength=len(levels)).double()
        out[p] = (mass * mean_grade).sum()
    return out
