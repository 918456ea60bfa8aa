"""Reward kind `brevity`: max_words minus the completion's word count, a second programmatic property
for two-reward tasks. Its scale (words) differs from VADER's ([-1, 1]) on purpose: a raw sum is
dominated by it, the LSC sum (kind `combined`) is not."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align.rewards.base import PointScorer
from align.rewards.registry import register_reward
from align.runtime.config import require


@dataclass
class BrevityParams:
    max_words: int = 12  # reward = max_words - words in the completion (positive when at most max_words)

    def __post_init__(self):
        require(self.max_words >= 1, "max_words", "an integer >= 1", self.max_words)


class BrevityReward:
    def __init__(self, max_words: int = 12):
        if max_words < 1:
            raise ValueError(f"max_words must be an integer >= 1, got {max_words!r}")
        self.max_words = max_words

    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        return torch.tensor([float(self.max_words - len(c.split())) for c in completions], dtype=torch.float64)


@register_reward("brevity", params=BrevityParams)
def build(params: BrevityParams, path, device) -> PointScorer:
    return PointScorer(BrevityReward(params.max_words))
