"""Reward kind `vader`: VADER's compound sentiment of the completion, in [-1, 1]. The gold reward of
the embedded task (a positive movie-review continuation), a judge the project did not write."""
from __future__ import annotations

import torch

from align.rewards.base import PointScorer
from align.rewards.registry import register_reward


class VaderReward:
    """Compound sentiment in [-1, 1] of the completion alone."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        scores = [self.analyzer.polarity_scores(c)["compound"] for c in completions]
        return torch.tensor(scores, dtype=torch.float64)


@register_reward("vader")
def build(params, path, device) -> PointScorer:
    return PointScorer(VaderReward())
