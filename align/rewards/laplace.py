"""Reward kind `laplace`: the predictive mean and variance of r(x, y) under a Laplace posterior over a
reward model's LoRA weights (Yang et al. 2402.13210; align.rewards.laplace_posterior), saved by
jobs.train_rm (laplace.enabled). Selection can rank by mu - k sigma (the BoN job's penalty)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from align.rewards.base import RewardScores, Scorer
from align.rewards.registry import register_reward
from align.runtime.config import require


@dataclass
class LaplaceParams:
    chunk_size: int | None = None  # sequences per Jacobian batch; null: 4 on CPU (the cost grows with its square), 32 on GPU

    def __post_init__(self):
        require(self.chunk_size is None or self.chunk_size >= 1, "chunk_size", "null or an integer >= 1", self.chunk_size)


class LaplaceScorer(Scorer):
    def __init__(self, path, device: str = "auto", chunk_size: int | None = None):
        from align.engine.models import pick_device, tokenizer_fingerprint
        from align.rewards.laplace_posterior import LaplaceReward

        self.laplace = LaplaceReward.load(path, device=str(pick_device(device)))
        self.fingerprint = tokenizer_fingerprint(self.laplace.tokenizer)
        self.chunk_size = chunk_size or (4 if self.laplace.device.type == "cpu" else 32)

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        from align.data.pairs import concat_token_ids

        if not completions:
            return RewardScores.point(torch.zeros(0))
        seqs = ids if ids is not None and tokenizer == self.fingerprint else concat_token_ids(self.laplace.tokenizer, prompts, completions)
        mean, var = self.laplace.predict(seqs, chunk_size=self.chunk_size)
        return RewardScores(mean.double().cpu(), var.double().cpu())


def laplace_dir_problem(path: Path) -> str | None:
    from align.rewards.laplace_posterior import META_FILE

    return None if (path / META_FILE).is_file() else f"{path} has no {META_FILE} (written by jobs.train_rm laplace.enabled=true)"


@register_reward("laplace", params=LaplaceParams, needs_path=True, path_problem=laplace_dir_problem)
def build(params: LaplaceParams, path, device) -> LaplaceScorer:
    return LaplaceScorer(path, device, params.chunk_size)
