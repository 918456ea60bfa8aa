"""Speculative rejection (Sun et al. 2024, "Fast Best-of-N Decoding via Speculative Rejection",
arXiv 2410.20290): best-of-N that stops paying for completions the reward already ranks low.

Start N continuations per prompt; at each decision point (a completion length in tokens) score the
partial completions with the reward and keep only the top ceil(m * (1 - rejection_rate)) of the m
still running; finish the survivors and return the best by the full completion's reward. The paper
picks the decision point from the memory budget; here the points are fixed token counts, so the
cost in generated tokens is known in advance (`expected_tokens`). A partial score is a noisy proxy for
the final one, so early or aggressive rejection trades reward for tokens; jobs/bench_speculative
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
