"""RewardScorer: owns one reward (VADER now, any HF sequence classifier, later ensembles) and scores
(prompt, completion) batches; undecorated so tests can build it in-process, `ray.remote` applied by
the job that assembles the system."""
from __future__ import annotations

from actors.generator import PromptSamples


class RewardScorer:
    """Scores completions with `align.rewards.make_reward(kind, path, device)`."""

    def __init__(self, kind: str = "vader", path=None, device: str = "auto"):
        """path: the reward model's HF name, directory, or actors.cluster.ShippedDir (kind classifier)."""
        from actors.cluster import local_dir
        from align.rewards import make_reward

        self.reward = make_reward(kind, local_dir(path) if path else None, device)

    def score(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> list[float]:
        return self.reward(prompts, completions, ids, tokenizer).tolist()

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        """Fill `rewards` of each PromptSamples (all n completions of a prompt scored together); a
        model reward with the generator's tokenizer scores the sampled token ids themselves."""
        prompts = [s.prompt for s in samples for _ in s.completions]
        completions = [c for s in samples for c in s.completions]
        ids = [s.prompt_ids + c for s in samples for c in s.completion_ids]
        flat = self.score(prompts, completions, ids, samples[0].tokenizer if samples else None)
        i = 0
        for s in samples:
            s.rewards = flat[i : i + len(s.completions)]
            i += len(s.completions)
        return samples
