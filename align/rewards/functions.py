"""Rewards: a function of (prompts, completions) -> one float per pair.

`VaderReward` is the gold reward of the embedded task: VADER's compound sentiment of the completion,
a judge the project did not write. `SequenceClassifierReward` scores with any HF sequence-
classification model (one label), the form trained reward models take. `RewardScores` is what a
scorer returns: a mean and a variance per sample (and the members' rewards for an ensemble), so
uncertainty penalties and reward combinations are functions over it (align.math.scoring).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


class VaderReward:
    """Compound sentiment in [-1, 1] of the completion alone (positive movie-review continuation)."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        scores = [self.analyzer.polarity_scores(c)["compound"] for c in completions]
        return torch.tensor(scores, dtype=torch.float64)


class BrevityReward:
    """A second programmatic property, for two-reward tasks: max_words minus the completion's word
    count (positive when the completion has at most max_words words). Its scale (words) differs from
    VADER's ([-1, 1]) on purpose: a raw sum is dominated by it, the LSC sum is not."""

    def __init__(self, max_words: int = 12):
        if max_words < 1:
            raise ValueError(f"max_words must be an integer >= 1, got {max_words!r}")
        self.max_words = max_words

    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        return torch.tensor([float(self.max_words - len(c.split())) for c in completions], dtype=torch.float64)


class SequenceClassifierReward:
    """r(x, y) = the single logit of an HF AutoModelForSequenceClassification on prompt + completion."""

    def __init__(self, name_or_path: str, device: str = "auto", batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align.engine.models import pick_device, tokenizer_fingerprint

        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        from align.data.pairs import concat_token_ids, pad_right

        if not completions:
            return torch.zeros(0, dtype=torch.float64)
        if ids is not None and tokenizer == self.fingerprint:
            seqs = ids  # the very tokens that were sampled (end-of-sequence included), as jobs/train_rm trains
        else:  # another tokenizer: prompt and completion tokenized apart and concatenated, as train_rm does
            seqs = concat_token_ids(self.tokenizer, prompts, completions)
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, attn = pad_right(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id)
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, 0].double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def make_reward(kind: str, path: str | None = None, device: str = "auto", **params) -> Reward:
    """Build a reward from its config fields (kind: "vader" | "brevity" | "classifier")."""
    if kind == "vader":
        return VaderReward()
    if kind == "brevity":
        return BrevityReward(**params)
    if kind == "classifier":
        return SequenceClassifierReward(path, device=device)
    raise ValueError(f"reward.kind must be 'vader', 'brevity' or 'classifier', got {kind!r}")
