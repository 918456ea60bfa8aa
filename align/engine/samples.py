"""The sample record: what any generation engine returns for one prompt and what scorers, selection,
Serve and the trainers read. Engine-agnostic: token ids, per-token-sum log-probs of the process that
drew them, and the rewards a scorer adds."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class PromptSamples:
    """The n completions drawn for one prompt."""

    prompt: str
    prompt_ids: list[int]  # the prompt's tokens as fed to the model (special tokens included, no padding)
    completions: list[str]  # decoded without special tokens
    completion_ids: list[list[int]]  # the tokens drawn, end-of-sequence included when drawn
    logprobs: list[float]  # log-prob of each completion under the sampling process that drew it
    tokenizer: str = ""  # fingerprint of the tokenizer the ids belong to (align.engine.models.tokenizer_fingerprint)
    rewards: list[float] = field(default_factory=list)  # the scorer's mean reward per completion
    drawn_tokens: int = 0  # tokens drawn for this prompt, continuations dropped on the way included
    reward_var: list[float] = field(default_factory=list)  # the scorer's variance (0: a point estimate)
    reward_members: list[list[float]] | None = None  # per completion, each ensemble member's reward
    embeddings: torch.Tensor | None = None  # (completions, d) sentence embeddings, when the scorer embeds
    ref_logprobs: list[float] | None = None  # DeRa: log-prob of each completion under the reference, same process

    @property
    def num_tokens(self) -> list[int]:
        return [len(c) for c in self.completion_ids]


def batch_seed(seed: int, batch_index: int) -> int:
    """An independent 63-bit seed per (run seed, batch index)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def prompt_seeds(seed: int, count: int) -> list[int]:
    """One seed per prompt of a request or sweep (independent streams from one seed), for
    `Generator.sample(seeds=...)`: a prompt's samples then do not depend on what it is batched with."""
    return [batch_seed(seed, j) for j in range(count)]


class PromptError(ValueError):
    """A prompt this model cannot take (e.g. a conversation for a model without a chat template)."""


class PromptTooLongError(PromptError):
    """A prompt whose tokens plus the tokens to draw do not fit the model's context."""
