"""A reward kind added by one module and nothing else: `tests.plugins.toy_reward:char_count` scores a
completion by its length in characters, times `weight`. Configs name it with its
module; Ray workers import the module when they first look the kind up."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align.rewards.base import PointScorer
from align.rewards.registry import register_reward
from align.runtime.config import require


@dataclass
class CharCountParams:
    weight: float = 1.0  # reward = weight * characters in the completion

    def __post_init__(self):
        require(self.weight > 0, "weight", "a number > 0", self.weight)


class CharCount:
    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, prompts, completions, ids=None, tokenizer=None) -> torch.Tensor:
        return torch.tensor([self.weight * len(c) for c in completions], dtype=torch.float64)


@register_reward("char_count", params=CharCountParams)
def build(params: CharCountParams, path, device) -> PointScorer:
    return PointScorer(CharCount(params.weight))
