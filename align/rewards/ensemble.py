"""Reward kind `ensemble`: k reward models (Coste et al. 2310.02743), their mean and variance across
members, members kept. How they are combined (mean, worst, uncertainty-weighted) is a choice made at
selection time (align.math.scoring.ensemble_reward, the BoN job's `penalty`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from align.rewards.base import RewardScores, Scorer
from align.rewards.registry import register_reward

ENSEMBLE_FILE = "ensemble.json"  # lists an ensemble directory's members (written by jobs.train_rm)


class EnsembleScorer(Scorer):
    """`members` (k, N); population variance across members (k identical members give variance 0)."""

    def __init__(self, paths: list, device: str = "auto"):
        from align.rewards.classifier import SequenceClassifierReward

        if len(paths) < 1:
            raise ValueError("an ensemble needs k >= 1 member reward models, got 0 paths")
        self.members = [SequenceClassifierReward(str(p), device=device) for p in paths]

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        members = torch.stack([m(prompts, completions, ids, tokenizer) for m in self.members])  # (k, N)
        return RewardScores(members.mean(0), members.var(0, unbiased=False), members)


def ensemble_members(path) -> list[str]:
    """Member directories of an ensemble directory (its ensemble.json, written by jobs.train_rm)."""
    root = Path(path)
    listing = root / ENSEMBLE_FILE
    if not listing.is_file():
        raise FileNotFoundError(f"{root} is not an ensemble directory: {ENSEMBLE_FILE} is missing (train one with "
                                f"jobs.train_rm ensemble.members=k)")
    return [str(root / m) for m in json.loads(listing.read_text())["members"]]


def ensemble_dir_problem(path: Path) -> str | None:
    return None if (path / ENSEMBLE_FILE).is_file() else f"{path} has no {ENSEMBLE_FILE} (written by jobs.train_rm)"


@register_reward("ensemble", needs_path=True, path_problem=ensemble_dir_problem)
def build(params, path, device) -> EnsembleScorer:
    return EnsembleScorer(ensemble_members(path), device)
