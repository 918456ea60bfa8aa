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


class TextOps:
    """What an engine's records need from its tokenizer alone, shared by every engine (and by a Serve
    replica that holds only the tokenizer of an engine in another process): token offsets, cutting
    at stop sequences, checking prompts against the chat template and the context. Needs
    `self.tokenizer`, `self.encoder` (align.engine.chat.PromptEncoder) and `self.context_length()`."""

    def token_ends(self, ids: list[int], text: str) -> list[int]:
        """Where each token's text ends in `text` (`ids` decoded as `sample` decodes them): the length
        of each prefix's decoding, kept non-decreasing and within `text`, the last at len(text). Token
        k's text is text[ends[k - 1]:ends[k]] (empty for a skipped special token such as end-of-sequence,
        or a token that only starts a character the next one completes)."""
        if not ids:
            return []
        prefixes = self.tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
        ends, end = [], 0
        for p in prefixes:
            end = min(max(end, len(p)), len(text))
            ends.append(end)
        ends[-1] = len(text)
        return ends

    def cut_at_stop(self, samples: list[PromptSamples], stops, token_logprobs: list[list[list[float]]]) -> list[list[int | None]]:
        """Cut every completion at its first stop sequence (`stops`: strings, not included), in place,
        before the samples are scored: `completions` become the text a client gets, `completion_ids`
        the drawn tokens that text covers (the last one only partly when a stop sequence begins inside
        it: a reward scoring token ids then sees that whole token, a text reward exactly the text),
        `logprobs` the sum of those tokens' `token_logprobs` (per prompt and completion, as
        `sample(token_logprobs=True)` returns them). Returns per prompt and completion the number of
        tokens kept where it was cut, else None."""
        kept = []
        for s, lps in zip(samples, token_logprobs):
            kept.append([])
            for j, text in enumerate(s.completions):
                at = min((i for i in (text.find(t) for t in stops if t) if i >= 0), default=-1)
                if at < 0:
                    kept[-1].append(None)
                    continue
                ids = s.completion_ids[j]
                k = 0 if at == 0 else next(k + 1 for k, e in enumerate(self.token_ends(ids, text)) if e >= at)
                s.completions[j], s.completion_ids[j] = text[:at], ids[:k]
                s.logprobs[j] = float(sum(lps[j][:k]))
                kept[-1].append(k)
        return kept

    def checked(self, prompts: list) -> list:
        """`prompts`, or PromptError naming `messages` (or `prompt`) when this model cannot take one:
        a conversation for a model without a chat template."""
        if any(isinstance(p, list) for p in prompts) and not self.encoder.has_template:
            try:
                self.encoder.ids(next(p for p in prompts if isinstance(p, list)))
            except ValueError as e:
                raise PromptError(f"messages: {e}") from None
        return prompts

    def check_context(self, prompts: list[str], max_new_tokens: int | list[int], lengths: list[int] | None = None) -> None:
        """PromptTooLongError naming the first prompt whose tokens plus the tokens to draw exceed the
        model's context (a clear error instead of an index error deep in the model). `lengths`: the
        prompts' token counts when the caller has encoded them already."""
        limit = self.context_length()
        if limit is None:
            return
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        if lengths is None:
            lengths = [len(ids) for ids in self.encoder.batch_ids(self.checked(prompts))]
        for i, (n, m) in enumerate(zip(lengths, budgets)):
            if n + m > limit:
                raise PromptTooLongError(f"prompt[{i}]: {n} tokens plus {m} new tokens exceed the model's context of "
                                         f"{limit} positions; shorten the prompt or ask for at most {max(limit - n, 0)} tokens")

