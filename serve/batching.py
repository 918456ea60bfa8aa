"""Concurrent requests, one sampler call: the Serve deployments hand the calls that arrived together
(`ray.serve.batch`) to these functions, which run them as one batch and split the results back.

Sampling calls are grouped by what one decode loop must share (n, temperature, min_tokens, and
whether DeRa's second model runs); inside a group every prompt keeps its own max_tokens, its own
lambda and its own random stream (`align.sampling.NSampler`). Prompt j of a request with seed s is
seeded by batch_seed(s, j) whether it runs alone or beside other requests, so an answer does not
depend on which requests it was batched with.

No Ray here: the functions take a Generator or a scorer and plain lists, and are tested as such.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleCall:
    """One request's sampling: its prompts and how to sample them."""

    prompts: tuple[str, ...]
    n: int
    max_tokens: int
    temperature: float = 1.0
    min_tokens: int = 0
    seed: int = 0
    lam: float | None = None  # DeRa strength; None samples pi_0 alone

    @property
    def group(self) -> tuple:
        """Calls with the same group run in one sampler call."""
        return (self.n, self.temperature, self.min_tokens, self.lam is None)


def sample_together(generator, calls: list[SampleCall]) -> list[dict | Exception]:
    """Run `calls` on `generator` (actors.generator.Generator), one sampler call per group; returns,
    per call, its {"samples", "seconds", "new_tokens", "batched_requests"} or the exception its group
    raised (the other groups still answer)."""
    from actors.generator import prompt_seeds

    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(call.group, []).append(i)
    results: list[dict | Exception] = [None] * len(calls)  # type: ignore[list-item]
    for (n, temperature, min_tokens, plain), members in groups.items():
        batch = [calls[i] for i in members]
        prompts = [p for c in batch for p in c.prompts]
        try:
            out = generator.sample(
                prompts, n, [c.max_tokens for c in batch for _ in c.prompts], temperature=temperature,
                min_new_tokens=min_tokens, seeds=[s for c in batch for s in prompt_seeds(c.seed, len(c.prompts))],
                lam=None if plain else [c.lam for c in batch for _ in c.prompts])
        except Exception as e:  # noqa: BLE001 - handed to the callers of this group only
            for i in members:
                results[i] = e
            continue
        start = 0
        for i, call in zip(members, batch):
            part = out["samples"][start : start + len(call.prompts)]
            start += len(call.prompts)
            results[i] = {"samples": part, "seconds": out["seconds"], "batched_requests": len(batch),
                          "new_tokens": sum(s.drawn_tokens for s in part)}
    return results


def score_together(scorer, sample_lists: list[list]) -> list[list]:
    """Score several requests' PromptSamples in one scorer call (actors.scorer.Scorer.score_samples)
    and return them per request."""
    flat = scorer.score_samples([s for samples in sample_lists for s in samples])
    out, start = [], 0
    for samples in sample_lists:
        out.append(flat[start : start + len(samples)])
        start += len(samples)
    return out
