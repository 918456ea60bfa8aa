"""Reward kind `combined`: several rewards made one (Wang et al. 2402.00742). Each component's mean
r_i is LSC-transformed, log sigmoid(r_i - r_ref,i(x)), and the transforms summed (sum_of_lsc: the
log-probability that y is good on every property), or the raw rewards summed (sum_raw, the baseline).

r_ref,i(x) is the `reference_quantile` of r_i over the completions of x in the same call (its
`groups`). In best-of-n those are the n samples from pi_0, the reference the transform asks for;
callers scoring completions of another policy must score pi_0 samples with them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from align.rewards.base import RewardScores, Scorer
from align.rewards.registry import build_scorer, check_spec, register_reward
from align.runtime.config import require


@dataclass
class CombinedParams:
    components: list[dict] = field(default_factory=list)  # >= 2 reward specs, e.g. [{kind: vader}, {kind: brevity, max_words: 12}]
    combine: Literal["sum_of_lsc", "sum_raw"] = "sum_of_lsc"  # sum of log sigmoid(r_i - r_ref_i(x)), or of raw r_i
    reference_quantile: float = 0.5  # r_ref_i(x) = this quantile of r_i over the prompt's pi_0 samples; [0, 1]

    def __post_init__(self):
        require(len(self.components) >= 2, "components", "a list of >= 2 rewards when kind is 'combined'", self.components)
        require(0 <= self.reference_quantile <= 1, "reference_quantile", "a number in [0, 1]", self.reference_quantile)
        self.components = [check_spec(c, f"components[{i}]") for i, c in enumerate(self.components)]


class CombinedScorer(Scorer):
    def __init__(self, scorers: list[Scorer], method: str = "sum_of_lsc", quantile: float = 0.5):
        if method not in ("sum_of_lsc", "sum_raw"):
            raise ValueError(f"combine must be 'sum_of_lsc' or 'sum_raw', got {method!r}")
        self.scorers, self.method, self.quantile = scorers, method, quantile

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        from align.math.scoring import combine_rewards, reference_reward

        parts = torch.stack([s.score(prompts, completions, ids, tokenizer).mean for s in self.scorers])  # (k, N)
        if self.method == "sum_raw":
            return RewardScores(parts.sum(0), torch.zeros(len(completions), dtype=torch.float64), parts)
        combined = torch.empty(len(completions), dtype=torch.float64)
        keys = groups if groups is not None else prompts
        for key in dict.fromkeys(keys):  # one reference per prompt's group of samples
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
            group = parts[:, rows].unsqueeze(1)  # (k, 1, m)
            refs = torch.stack([reference_reward(g, self.quantile) for g in group])  # (k, 1)
            combined[rows] = combine_rewards(group, "sum_of_lsc", refs)[0]
        return RewardScores(combined, torch.zeros_like(combined), parts)


@register_reward("combined", params=CombinedParams, nested="components", scores_within_prompt=True)
def build(params: CombinedParams, path, device) -> CombinedScorer:
    return CombinedScorer([build_scorer({"device": device, **c}) for c in params.components], params.combine,
                          params.reference_quantile)
