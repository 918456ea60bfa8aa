"""What every reward kind shares: `RewardScores` (a mean and a variance per sample, plus the members'
rewards for an ensemble), the `Reward` function interface, and the `Scorer` interface
`score(prompts, completions) -> RewardScores` that selection, Serve and the trainers call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from align.engine.samples import PromptSamples


@dataclass
class RewardScores:
    """Per-sample reward estimate: `mean` (N,) float64; `var` (N,) its variance (0 for a point
    estimate); `members` (k, N) each ensemble member's reward, or None."""

    mean: torch.Tensor
    var: torch.Tensor
    members: torch.Tensor | None = None

    @classmethod
    def point(cls, rewards: torch.Tensor) -> "RewardScores":
        rewards = rewards.to(torch.float64)
        return cls(rewards, torch.zeros_like(rewards))

    def __len__(self) -> int:
        return self.mean.numel()

    def __getitem__(self, rows: slice) -> "RewardScores":
        return RewardScores(self.mean[rows], self.var[rows], None if self.members is None else self.members[:, rows])

    @classmethod
    def cat(cls, parts: list["RewardScores"]) -> "RewardScores":
        members = None if not parts or parts[0].members is None else torch.cat([p.members for p in parts], 1)
        empty = torch.zeros(0, dtype=torch.float64)
        return cls(torch.cat([p.mean for p in parts]) if parts else empty, torch.cat([p.var for p in parts]) if parts else empty, members)


class Reward(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], ids: list[list[int]] | None = None,
                 tokenizer: str | None = None) -> torch.Tensor:
        """One float64 reward per (prompt, completion). `ids` (optional): the token ids each sequence
        was sampled as (prompt ids + completion ids), from the tokenizer with fingerprint `tokenizer`;
        a model-based reward sharing that tokenizer scores these ids instead of re-tokenizing text."""
        ...


class Scorer:
    """Base: subclasses implement `score`; `score_samples` fills PromptSamples with it."""

    embedder = None

    def score(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None, groups=None) -> RewardScores:
        """groups: per row, which prompt's samples it belongs to (default: rows with the same prompt
        text); only scorers with a per-prompt reference (the combined kind) read it."""
        raise NotImplementedError

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        """Fill `rewards` (the mean), `reward_var` and `reward_members` of each PromptSamples (all n
        completions of a prompt scored in one call), and `embeddings` when an embedder is attached
        (RBoN-WD). A model reward with the generator's tokenizer scores the sampled ids themselves."""
        prompts = [s.prompt for s in samples for _ in s.completions]
        completions = [c for s in samples for c in s.completions]
        ids = [s.prompt_ids + c for s in samples for c in s.completion_ids]
        groups = [g for g, s in enumerate(samples) for _ in s.completions]  # two requests may share a prompt
        scores = self.score(prompts, completions, ids, samples[0].tokenizer if samples else None, groups)
        embeddings = self.embedder.embed(completions) if self.embedder is not None else None
        i = 0
        for s in samples:
            rows = slice(i, i + len(s.completions))
            s.rewards, s.reward_var = scores.mean[rows].tolist(), scores.var[rows].tolist()
            s.reward_members = None if scores.members is None else scores.members[:, rows].T.tolist()
            s.embeddings = None if embeddings is None else embeddings[rows]
            i += len(s.completions)
        return samples

    def attach_embedder(self, name_or_path: str, device: str = "auto") -> "Scorer":
        """Also embed each completion (sentence embeddings for RBoN-WD's cost between samples)."""
        from align.engine.embeddings import SentenceEmbedder
        from align.engine.models import pick_device

        self.embedder = SentenceEmbedder(name_or_path, device=str(pick_device(device)))
        return self


class PointScorer(Scorer):
    """A scorer of one `Reward` function: its value is the mean, with variance 0."""

    def __init__(self, reward: Reward):
        self.reward = reward

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        return RewardScores.point(self.reward(prompts, completions, ids, tokenizer))
