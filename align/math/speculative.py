"""Speculative rejection (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection",
arXiv 2410.20290): best-of-N that stops paying for completions the reward already ranks low.

Start N continuations per prompt; at each decision point (a completion length in tokens) score the
partial completions with the reward and keep only the top ceil(m * (1 - rejection_rate)) of the m
still running; finish the survivors and return the best by the full completion's reward. The paper
picks the decision point from the memory budget; here the points are fixed token counts, so the
cost in generated tokens is known in advance (`expected_tokens`). A partial score is a noisy proxy for
the final one, so early or aggressive rejection trades reward for tokens; jobs/bench/speculative
measures that trade against plain best-of-n.
"""
from __future__ import annotations

import math

import torch


def survivors(n: int, rejection_rate: float, decisions: int) -> list[int]:
    """Continuations left after each of `decisions` rejections, starting from n (never below 1)."""
    if n < 1 or not 0 <= rejection_rate < 1:
        raise ValueError(f"need n >= 1 and 0 <= rejection_rate < 1, got {n}, {rejection_rate}")
    counts, m = [], n
    for _ in range(decisions):
        m = max(1, math.ceil(m * (1 - rejection_rate)))
        counts.append(m)
    return counts


def expected_tokens(n: int, max_new_tokens: int, rejection_rate: float, decision_tokens: list[int]) -> int:
    """Tokens drawn per prompt when no completion ends early: n rows up to the first decision point,
    the survivors of each decision up to the next, the last survivors to max_new_tokens."""
    bounds = [*decision_tokens, max_new_tokens]
    counts = [n, *survivors(n, rejection_rate, len(decision_tokens))]
    return sum(c * (b - a) for c, a, b in zip(counts, [0, *decision_tokens], bounds))


def rows_to_keep(partial_rewards: torch.Tensor, keep: int, exempt_last: bool = False) -> torch.Tensor:
    """Rows to keep from partial_rewards (P, m): the `keep` highest of each prompt (ties to the lower
    index), plus its last row when `exempt_last` (an independent sample that is never rejected).
    Returns sorted row indices into the flattened (P*m) batch, keep (+1) per prompt."""
    P, m = partial_rewards.shape
    candidates = partial_rewards[:, :-1] if exempt_last else partial_rewards
    if not 1 <= keep <= candidates.shape[1]:
        raise ValueError(f"keep must be in [1, {candidates.shape[1]}], got {keep}")
    # A stable descending sort keeps the lower index first among equal rewards.
    order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :keep]  # (P, keep)
    if exempt_last:
        order = torch.cat([order, torch.full((P, 1), m - 1, dtype=order.dtype, device=order.device)], 1)
    order = order.sort(dim=1).values
    return (order + torch.arange(P, device=order.device)[:, None] * m).flatten()


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..m-1 along the last dim of x (..., m), tied entries sharing the mean of their ranks."""
    below = (x[..., None, :] < x[..., :, None]).sum(-1)  # entries smaller than each
    ties = (x[..., None, :] == x[..., :, None]).sum(-1)  # entries equal to each, itself included
    return below.to(torch.float64) + (ties.to(torch.float64) - 1) / 2


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of x and y (P, m): the Pearson correlation of their
    average ranks; NaN for a row where either is constant (no ranking to agree with)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / ((rx * rx).sum(-1) * (ry * ry).sum(-1)).sqrt()


def best_survives(partial: torch.Tensor, final: torch.Tensor, keep: int) -> torch.Tensor:
    """Per prompt, whether keeping the `keep` best partial scores (rows_to_keep's rule) keeps a row
    with the best final reward, i.e. whether that rejection leaves best-of-m's answer reachable.
    partial, final: (P, m). Rejection at random keeps it with probability keep/m."""
    P, m = final.shape
    kept = rows_to_keep(partial, keep).view(P, keep) - torch.arange(P, device=final.device)[:, None] * m
    return final.gather(1, kept).max(1).values == final.max(1).values
