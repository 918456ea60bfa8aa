"""Concurrent requests, one sampler call: the Serve deployments hand the calls that arrived together
(`ContinuousBatcher`) to these functions, which run them as one batch and split the results back.

Sampling calls are grouped by what one decode loop must share (n, temperature, min_tokens, and
whether DeRa's second model runs); inside a group every prompt keeps its own max_tokens, its own
lambda and its own random stream (`align.engine.sampling.NSampler`). Prompt j of a request with seed s is
seeded by batch_seed(s, j) whether it runs alone or beside other requests, so an answer does not
depend on which requests it was batched with.

`ContinuousBatcher` decides what runs together: a request that finds the replica idle starts at once,
and the requests that arrive while a call runs wait and go together in the next call. Ray's
`serve.batch` forms its next batch as soon as the previous one has started, so under load it makes
many small batches that then queue behind each other, and an idle replica still waits out its timeout.

No Ray here: the functions take a Generator or a scorer and plain lists, and are tested as such.
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


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


class ContinuousBatcher:
    """Concurrent calls of `await batcher(item)`, one batched call `fn(items) -> results` at a time.

    A call that finds the batcher idle waits `wait_s` (0: none) for company and starts; calls that
    arrive while a batch runs form the next batch, taken in arrival order up to `max_size` as counted
    by `size(item)` (an item larger than that runs alone). A result that is an exception is raised
    to its own caller only; an exception from `fn` goes to every caller of that batch. A caller that
    is cancelled (its client went away) is dropped from the batch it had not yet joined.
    """

    def __init__(self, fn: Callable[[list], Awaitable[list]], max_size: int, size: Callable[[Any], int] = lambda _: 1,
                 wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size: expected an integer >= 1, got {max_size}")
        self.fn, self.max_size, self.size, self.wait_s = fn, max_size, size, wait_s
        self.pending: collections.deque = collections.deque()  # (item, future) in arrival order
        self.batches: list[int] = []  # the number of items in each batch run, in order
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def __call__(self, item):
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._run())
        future = loop.create_future()
        self.pending.append((item, future))
        self._wake.set()
        return await future

    def _take(self) -> list:
        batch, total = [], 0
        while self.pending:
            item, future = self.pending[0]
            if future.done():  # cancelled while it waited
                self.pending.popleft()
                continue
            if batch and total + self.size(item) > self.max_size:
                break
            batch.append(self.pending.popleft())
            total += self.size(item)
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wait_s > 0:  # idle until now: let a burst that is arriving join the first batch
                await asyncio.sleep(self.wait_s)
            while batch := self._take():
                try:
                    results = await self.fn([item for item, _ in batch])
                except Exception as e:  # noqa: BLE001 - every caller of this batch gets it
                    results = [e] * len(batch)
                if len(results) != len(batch):
                    results = [RuntimeError(f"the batched call returned {len(results)} results for {len(batch)} "
                                            "items")] * len(batch)
                self.batches.append(len(batch))
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)


class BatchedScorer:
    """A scorer (actors.scorer.make_scorer(spec)) behind a ContinuousBatcher: the samples of requests
    that arrive while a scorer call runs are scored together in the next, in a thread so the caller's
    event loop keeps answering. Used by the scorer deployment, and by the generator deployment when
    the scorer is colocated with it."""

    def __init__(self, spec: dict, max_size: int, wait_s: float = 0.0):
        from actors.scorer import make_scorer

        self.scorer = make_scorer(spec)
        self.batcher = ContinuousBatcher(self._score, max_size, size=len, wait_s=wait_s)

    async def _score(self, sample_lists: list) -> list:
        return await asyncio.to_thread(score_together, self.scorer, sample_lists)

    async def __call__(self, samples: list) -> list:
        return await self.batcher(samples)
