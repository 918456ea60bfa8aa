"""Error bars for what the evaluations report: means clustered by prompt (the n samples of one
prompt are not independent) and a percentile bootstrap over prompts for the win rate."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def clustered_mean_stderr(values: Tensor, n: int) -> tuple[float, float]:
    """Mean of P*n values (n consecutive per prompt) and its standard error clustered by prompt: the
    n samples of a prompt are not independent, so the error is that of the P per-prompt means."""
    per_prompt = values.double().view(-1, n).mean(1)  # (P,)
    se = per_prompt.std().item() / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return per_prompt.mean().item(), se


def win_rate_interval(rewards_a: Tensor, rewards_b: Tensor, n: int = 1, level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the paired win rate of a over b (ties 1/2; align.math.bon.win_rate),
    resampling prompts with replacement: P*n pairs, n consecutive per prompt."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a, b = torch.as_tensor(rewards_a).double(), torch.as_tensor(rewards_b).double()
    if a.shape != b.shape or a.numel() == 0 or a.numel() % n:
        raise ValueError(f"rewards_a and rewards_b need the same non-empty shape (P * n,) with n = {n}; got "
                         f"{tuple(a.shape)}, {tuple(b.shape)}")
    wins = ((a > b).double() + 0.5 * (a == b).double()).view(-1, n).mean(1)  # (P,) per-prompt win rates
    return paired_interval(wins, level, resamples, seed)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, under a fair coin over the wins + losses prompts
    where two methods differ (ties dropped), of a split at least as uneven as this one. McNemar's
    exact test when each prompt is a success or failure for each method."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins}, {losses}")
    k = wins + losses
    if k == 0:
        return 1.0
    tail = sum(math.comb(k, i) for i in range(min(wins, losses) + 1)) / 2**k
    return min(1.0, 2 * tail)


def paired_interval(diffs: Tensor, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt paired differences (one value per
    prompt: method a minus method b on the same prompt), resampling prompts with replacement."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = torch.as_tensor(diffs).double().flatten()
    if d.numel() == 0:
        raise ValueError("diffs: expected one value per prompt, got none")
    g = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (resamples, len(d)), generator=g)].mean(1)
    tail = (1 - level) / 2
    return torch.quantile(means, tail).item(), torch.quantile(means, 1 - tail).item()


def paired_verdict(a: Tensor, b: Tensor, level: float = 0.95, seed: int = 0) -> dict:
    """The rule behind a claim "a is better than b on the same prompts": per-prompt values of each
    (P,); True when the bootstrap interval of the mean difference a - b lies above 0, False when it
    lies below, None (inconclusive) when it contains 0. With the exact sign test over the prompts
    where they differ, and the counts."""
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"a and b need one value per prompt each, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a - b
    low, high = paired_interval(d, level, seed=seed)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return {"mean_diff": d.mean().item(), "ci": [low, high], "level": level, "prompts": len(d), "a_better": wins,
            "b_better": losses, "sign_p": sign_test(wins, losses),
            "verdict": True if low > 0 else False if high < 0 else None}
