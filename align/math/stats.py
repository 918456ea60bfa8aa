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
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(wins), (resamples, len(wins)), generator=g)
    means = wins[idx].mean(1)
    tail = (1 - level) / 2
    return torch.quantile(means, tail).item(), torch.quantile(means, 1 - tail).item()
