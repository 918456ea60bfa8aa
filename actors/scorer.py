"""RewardScorer: owns one reward (VADER now, any HF sequence classifier, later ensembles) and scores
(prompt, completion) batches; undecorated so tests can build it in-process, `ray.remote` applied by
the job that assembles the system."""
from __future__ import annotations

from actors.generator import PromptSamples


class RewardScorer:
    """Scores completions with `align.rewards.make_reward(kind, path, device)`."""

    def __init__(self, kind: str = "vader", path: str | None = None, device: str = "auto"):
        from align.rewards import make_reward

        self.reward = make_reward(kind, path, device)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.reward(prompts, completions).tolist()

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        """Fill `rewards` of each PromptSamples (all n completions of a prompt scored together)."""
        prompts = [s.prompt for s in samples for _ in s.completions]
        completions = [c for s in samples for c in s.completions]
        flat = self.score(prompts, completions)
        i = 0
        for s in samples:
            s.rewards = flat[i : i + len(s.completions)]
            i += len(s.completions)
        return samples
