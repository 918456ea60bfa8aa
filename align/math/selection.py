"""Choosing one of n samples per prompt: the reward each candidate is ranked by (the scorer's mean, or
a penalty for the reward model's uncertainty) and the rule that picks (argmax, or Regularized BoN).

    ranking_reward(scores, penalty, ...)   mean | ensemble (mean, worst, uncertainty-weighted) | laplace
    select(rewards, method, beta, ...)     argmax | rbon_kl | rbon_wd

Everything is a function of tensors over [prompts, n]; jobs.bon, the overoptimization study and the
serving endpoints all call these, so a remedy is a config value, not a code path.
"""
from __future__ import annotations

import torch
from torch import Tensor

PENALTIES = ("none", "ensemble", "laplace")
SELECTIONS = ("argmax", "rbon_kl", "rbon_wd")


def ranking_reward(mean: Tensor, var: Tensor | None = None, members: Tensor | None = None, penalty: str = "none",
                   ensemble_mode: str = "mean", coef: float = 0.0) -> Tensor:
    """The reward candidates are ranked by, shape of `mean` ([prompts, n]).

    penalty "none": the mean. "ensemble": align.math.scoring.ensemble_reward over `members` ([k, prompts, n])
    with `ensemble_mode` and `coef` (Coste et al. 2310.02743). "laplace": mu - coef * sigma with the
    predictive variance `var` (Yang et al. 2402.13210).
    """
    from align.math.scoring import ensemble_reward, penalized_reward

    if penalty == "none":
        return mean
    if penalty == "ensemble":
        if members is None:
            raise ValueError("penalty 'ensemble' needs the ensemble members' rewards (reward.kind: ensemble)")
        return ensemble_reward(members, ensemble_mode, coef)[0]
    if penalty == "laplace":
        if var is None:
            raise ValueError("penalty 'laplace' needs the predictive variance (reward.kind: laplace)")
        return penalized_reward(mean, var, coef)
    raise ValueError(f"penalty must be one of {' | '.join(PENALTIES)}, got {penalty!r}")


def select(rewards: Tensor, method: str = "argmax", beta: float = 0.0, logps: Tensor | None = None,
           cost: Tensor | None = None) -> Tensor:
    """Index of the chosen sample per prompt, int64 [prompts] (ties: the lowest index).

    rewards [prompts, n]; "rbon_kl" needs logps [prompts, n] (log pi_0(y_i | x)), "rbon_wd" the cost
    [prompts, n, n] between samples (Jinnai et al. 2404.01054); beta 0 is plain argmax for both.
    """
    from align.math.scoring import rbon_kl_select, rbon_wd_select

    if method == "argmax":
        return torch.argmax(rewards, dim=-1)
    if method == "rbon_kl":
        if logps is None:
            raise ValueError("selection 'rbon_kl' needs the samples' log-probs under pi_0 (logps)")
        return rbon_kl_select(rewards, logps, beta)
    if method == "rbon_wd":
        if cost is None:
            raise ValueError("selection 'rbon_wd' needs the cost between samples (cost)")
        return rbon_wd_select(rewards, cost, beta)
    raise ValueError(f"selection must be one of {' | '.join(SELECTIONS)}, got {method!r}")


def prompt_ranking(rewards: list[float], reward_var: list[float] | None = None,
                   reward_members: list[list[float]] | None = None, penalty: str = "none",
                   ensemble_mode: str = "mean", coef: float = 0.0) -> Tensor:
    """`ranking_reward` for one prompt's candidates as a scorer returns them (lists: rewards (n,),
    variances (n,), members per candidate (n, k)): the ranking as a [1, n] float64 tensor."""
    f64 = dict(dtype=torch.float64)
    mean = torch.tensor([rewards], **f64)
    var = torch.tensor([reward_var], **f64) if reward_var else None
    members = torch.tensor(reward_members, **f64).T.unsqueeze(1) if reward_members is not None else None  # (k, 1, n)
    return ranking_reward(mean, var, members, penalty, ensemble_mode, coef)
