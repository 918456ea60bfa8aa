"""Best-of-n as one reusable composition: a GeneratorPool samples prompt batches, a ScorerPool
(actors.scorer) scores them, sampling and scoring overlap, and scored batches come out as they
finish. The batch job (jobs/bon) calls it; serving and sweeps call the same function.

Both groups replace actors that die and rerun their lost batches with the same seeds, so the output
does not depend on failures.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

from actors.generator import GeneratorPool
from align.engine.samples import PromptSamples
from actors.scorer import ScorerPool


def scored_batches(pool: GeneratorPool, scorers: ScorerPool, batches: dict[int, list[str]], n: int,
                     max_new_tokens: int, seed: int = 0, **sampling) -> Iterator[tuple[int, list[PromptSamples], int]]:
    """Yield (batch index, scored PromptSamples, new tokens) for every batch, in completion order.

    batches: {batch index: prompts}; the index seeds the batch (actors.generator.batch_seed), so a
    batch gives the same samples whichever call, actor or retry draws it. At most two batches per
    generator are in flight.
    """
    import ray

    todo = deque(sorted(batches))
    window = 2 * len(pool.actors)
    sampling_calls, scoring_calls = [], []
    while todo or sampling_calls or scoring_calls:
        while todo and len(sampling_calls) < window:
            b = todo.popleft()
            sampling_calls.append(pool.submit(batches[b], n, max_new_tokens, b, seed, **sampling))
        ready, _ = ray.wait([c.ref for c in sampling_calls + scoring_calls], num_returns=1)
        for c in [c for c in sampling_calls if c.ref in ready]:
            sampling_calls.remove(c)
            result = pool.group.get(c)  # reruns the batch on a fresh actor if its generator died
            scoring_calls.append(scorers.call("score_samples", result["samples"],
                                              tags={"batch": c.tags["batch"], "new_tokens": result["new_tokens"]}))
        for c in [c for c in scoring_calls if c.ref in ready]:
            scoring_calls.remove(c)
            yield c.tags["batch"], scorers.get(c), c.tags["new_tokens"]
