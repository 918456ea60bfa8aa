"""Scorers as Ray actors: `make_scorer(spec)` builds any registered reward kind (align.rewards.registry)
from its flat spec, with model directories shipped to whichever node runs it; `ScorerPool` runs a group
of scorer actors, like GeneratorPool, so scoring scales out separately from generation. Classes are
undecorated so tests build them in-process.
"""
from __future__ import annotations

import torch

from align.engine.samples import PromptSamples
from align.rewards.base import RewardScores, Scorer


def make_scorer(spec: dict) -> Scorer:
    """The Scorer of a flat reward spec ({"kind", "path", "device", ...the kind's params}; "embedder"
    attaches sentence embeddings for RBoN-WD). Paths may be actors.cluster.ShippedDir: they are
    fetched to this node first."""
    from actors.cluster import local_dir
    from align.rewards.registry import build_scorer, map_paths

    return build_scorer(map_paths(spec, local_dir))


class ScorerActor:
    """What a ScorerPool runs as a Ray actor: the scorer `make_scorer(spec)`, with its torch threads."""

    def __init__(self, spec: dict, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.scorer = make_scorer(spec)

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        return self.scorer.score(prompts, completions, ids, tokenizer, groups)

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        return self.scorer.score_samples(samples)


def ship_spec(spec: dict) -> dict:
    """The spec with every local model directory (its own and its components') replaced by an
    actors.cluster.ShippedDir, so actors on any node can load it (shipped once per directory; an
    already shipped spec passes through)."""
    from actors.cluster import ship_dir
    from align.rewards.registry import map_paths

    return map_paths(spec, lambda p: ship_dir(p) if isinstance(p, str) else p)


class ScorerPool:
    """A group of scorer Ray actors (one scorer each, built from `spec`). Calls go to the least busy
    actor; `score` returns results in input order; an actor that dies is replaced and its batch
    scored again (scoring is deterministic, so the result is the same)."""

    def __init__(self, spec: dict, num_actors: int = 1, num_cpus_per_actor: float = 0, num_gpus_per_actor: float = 0,
                 max_retries: int = 3):
        from actors.resilient import ResilientActors

        # One torch thread per reserved CPU, and one when none is reserved: scorers sharing cores with
        # generators would otherwise oversubscribe them, and busy-waiting threads slow everyone down.
        from actors.cluster import reserved_device

        threads = max(1, int(num_cpus_per_actor))
        spec = {**spec, "device": reserved_device(spec.get("device", "auto"), num_gpus_per_actor)}
        self.group = ResilientActors(ScorerActor, num_actors, (ship_spec(spec), threads),
                                     options={"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor},
                                     max_retries=max_retries, name="Scorer")

    @property
    def actors(self) -> list:
        return self.group.actors

    def call(self, method: str, *args, tags: dict | None = None):
        return self.group.call(method, *args, tags=tags)

    def get(self, call):
        return self.group.get(call)

    def score(self, prompts: list[str], completions: list[str], batch_size: int = 64) -> RewardScores:
        """Scores of every (prompt, completion), in order, batches spread over the actors."""
        calls = [self.group.call("score", prompts[i : i + batch_size], completions[i : i + batch_size])
                 for i in range(0, len(prompts), batch_size)]
        return RewardScores.cat([self.group.get(c) for c in calls])

    def shutdown(self) -> None:
        self.group.shutdown()
