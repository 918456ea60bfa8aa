"""Reward kind `arithmetic`: a verifier, the gold reward of the instruct task (align.task.instruct_task).
It reads the question "What is a op b?" back from the prompt (text, or a conversation's last message),
and scores 1 when the answer's number is a op b, else 0. The answer's number is the first integer after
its last "=", or its first integer when it has no "=" (so "7 * 6 = 42" counts as 42, and "42." as 42).
A prompt without such a question is an error naming it: this reward grades nothing else."""
from __future__ import annotations

import re

import torch

from align.engine.chat import prompt_text
from align.rewards.base import PointScorer
from align.rewards.registry import register_reward

QUESTION = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")
NUMBER = re.compile(r"-?\d+")


def expected(prompt) -> int:
    """a op b for the question in the prompt."""
    found = QUESTION.search(prompt_text(prompt))
    if found is None:
        raise ValueError(f"arithmetic reward: no question 'What is a op b?' in the prompt {prompt_text(prompt)!r:.80}")
    a, op, b = int(found[1]), found[2], int(found[3])
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def answered(completion: str) -> int | None:
    """The number an answer gives: the first integer after its last '=', else its first integer."""
    found = NUMBER.search(completion.rsplit("=", 1)[-1]) if "=" in completion else None
    found = found or NUMBER.search(completion)
    return int(found[0]) if found else None


class ArithmeticReward:
    def __call__(self, prompts, completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        return torch.tensor([float(answered(c) == expected(p)) for p, c in zip(prompts, completions)], dtype=torch.float64)


@register_reward("arithmetic")
def build(params, path, device) -> PointScorer:
    return PointScorer(ArithmeticReward())
