"""Rewards: a function of (prompts, completions) -> one float per pair.

`VaderReward` is the gold reward of the embedded task: VADER's compound sentiment of the completion,
a judge the project did not write. `SequenceClassifierReward` scores with any HF sequence-
classification model (one label), the form trained reward models take.
"""
from __future__ import annotations

from typing import Protocol

import torch


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


class SequenceClassifierReward:
    """r(x, y) = the single logit of an HF AutoModelForSequenceClassification on prompt + completion."""

    def __init__(self, name_or_path: str, device: str = "auto", batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align.models import pick_device, tokenizer_fingerprint

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
        from align.pairs import concat_token_ids, pad_right

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


def make_reward(kind: str, path: str | None = None, device: str = "auto") -> Reward:
    """Build a reward from its config fields (kind: "vader" | "classifier")."""
    if kind == "vader":
        return VaderReward()
    if kind == "classifier":
        return SequenceClassifierReward(path, device=device)
    raise ValueError(f"reward.kind must be 'vader' or 'classifier', got {kind!r}")
