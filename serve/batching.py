"""Concurrent requests, one sampler call: the Serve deployments hand the calls that arrived together
(`ContinuousBatcher`) to these functions, which run them as one batch and split the results back.

Sampling calls are grouped by what one decode loop must share (n, temperature, top_p, min_tokens,
and whether DeRa's second model runs); inside a group every prompt keeps its own max_tokens, its own
lambda and its own random stream (`align.engine.sampling.NSampler`), and every call its own stop
sequences and how many alternatives per token it wants (`finish_call`). Prompt j of a request with seed s is
seeded by batch_seed(s, j) whether it runs alone or beside other requests, so an answer does not
depend on which requests it was batched with.

`ContinuousBatcher` decides what runs together: a request that finds the replica idle starts at once,
and the requests that arrive while a call runs wait and go together in the next call. Ray's
`serve.batch` forms its next batch as soon as the previous one has started, so under load it makes
many small batches that then queue behind each other, and an idle replica still waits out its timeout.

Isolation: one request must not fail the requests batched with it. `check_call` refuses a call the
sampler cannot take (its message names the field) before it joins a batch; a batched call that still
raises is run again one request at a time (`sample_together`, and `ContinuousBatcher` for any batched
function, the scorer's included), so only the request that causes the error gets it and every other
one gets exactly the answer it gets alone.

Stop sequences are applied here, on the generator, before any sample is scored (`finish_call`):
each completion is cut at its first stop sequence, so the reward, the best-of ranking, the token
count and the log-probs all describe the text the client gets.

No Ray here: the functions take a Generator or a scorer and plain lists, and are tested as such.
"""
from __future__ import annotations

import asyncio
import collections
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from align.engine.chat import check_prompt

# What one call may ask of the sampler (the Serve app's request models use the same bounds).
# seed: a non-negative int64. prompt_seeds feeds it to numpy's SeedSequence, which refuses negative
#   numbers; the per-prompt seeds it derives are 63-bit, inside what torch.Generator.manual_seed
#   takes ([-2**63, 2**64 - 1]); int64 is what JSON clients (and OpenAI's `seed`) hold.
SEED_MAX = 2**63 - 1
# temperature: OpenAI's upper bound 2 (above it the samples are close to uniform noise). The floor
#   keeps logits / temperature finite: at 1e-300 they overflow to inf and the draw's probabilities
#   and log-probs become NaN; at 0.01 a logit of 600 is still finite in float16, and sampling is
#   already argmax in practice. Exactly 0 is greedy decoding (the argmax; no division).
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 2.0
# logprobs: OpenAI's legacy completions return at most 5 alternatives per token.
LOGPROBS_MAX = 5
# stop: OpenAI takes at most 4 stop sequences; 64 characters each bounds the search.
STOP_MAX, STOP_MAX_CHARS = 4, 64
# lambda (DeRa): lam * aligned + (1 - lam) * reference logits in float32. 0 is pi_0, 1 the aligned
#   model, above 1 extrapolates (the paper's sweeps stay within a few units); at 100 the mixed logits
#   of real models stay far inside float32 (lambda 1e308 is inf in float32 and the mix refuses it).
LAMBDA_MAX = 100.0


class InvalidCall(ValueError):
    """A call's own input that the sampler cannot take; the message starts with the field's name
    ("seed: expected ..."), so the Serve app answers it as a 422 naming that field."""


def text_error(text: str) -> str | None:
    """Why `text` is not valid Unicode text (a lone surrogate, which has no UTF-8 encoding and
    fails the tokenizer), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate {text[e.start]!r} at character {e.start}"
    return None


@dataclass(frozen=True)
class SampleCall:
    """One request's sampling: its prompts and how to sample them."""

    prompts: tuple  # text, or conversations (lists of {role, content} messages, align.engine.chat)
    n: int
    max_tokens: int
    temperature: float = 1.0
    min_tokens: int = 0
    seed: int = 0
    lam: float | None = None  # DeRa strength; None samples pi_0 alone
    top_p: float = 1.0  # nucleus sampling; 1 samples the whole distribution
    stop: tuple[str, ...] = ()  # each completion is cut at the first of these (not included), before scoring
    logprobs: int | None = None  # None: no per-token details; k: each token's text and log-prob, k alternatives
    echo: bool = False  # with logprobs: the prompts' own tokens and log-probs too

    @property
    def group(self) -> tuple:
        """Calls with the same group run in one sampler call."""
        return (self.n, self.temperature, self.top_p, self.min_tokens, self.lam is None)


def check_call(call: SampleCall) -> None:
    """InvalidCall naming the first field of `call` the sampler cannot take (the ranges above), so a
    bad call is refused alone before it joins a batch instead of failing the batch's sampler call."""

    def integer(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def number(x) -> bool:
        return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)

    if not call.prompts:
        raise InvalidCall("prompt: expected at least one prompt")
    for i, p in enumerate(call.prompts):
        if isinstance(p, list):  # a conversation (/v1/chat/completions): well-formed messages of valid text
            try:
                check_prompt(p, "messages")
            except ValueError as e:
                raise InvalidCall(str(e)) from None
            texts = [(f"messages[{j}].content", m["content"]) for j, m in enumerate(p)]
        elif not isinstance(p, str) or not p.strip():
            raise InvalidCall(f"prompt: expected non-empty text, got {p!r} as prompt[{i}]")
        else:
            texts = [(f"prompt[{i}]", p)]
        for where, text in texts:
            if (why := text_error(text)) is not None:
                raise InvalidCall(f"{where.split('[')[0]}: expected valid Unicode text, {where} has {why}")
    for field, value, ok, allowed in (
        ("n", call.n, integer(call.n) and call.n >= 1, "an integer >= 1"),
        ("max_tokens", call.max_tokens, integer(call.max_tokens) and call.max_tokens >= 1, "an integer >= 1"),
        ("min_tokens", call.min_tokens, integer(call.min_tokens) and 0 <= call.min_tokens <= call.max_tokens,
         "an integer, 0 <= min_tokens <= max_tokens"),
        ("temperature", call.temperature, number(call.temperature)
         and (call.temperature == 0 or TEMPERATURE_MIN <= call.temperature <= TEMPERATURE_MAX),
         f"0 (greedy) or {TEMPERATURE_MIN:g} <= temperature <= {TEMPERATURE_MAX:g}"),
        ("top_p", call.top_p, number(call.top_p) and 0 < call.top_p <= 1, "0 < top_p <= 1"),
        ("stop", call.stop, isinstance(call.stop, tuple) and len(call.stop) <= STOP_MAX
         and all(isinstance(t, str) and len(t) <= STOP_MAX_CHARS and text_error(t) is None for t in call.stop),
         f"at most {STOP_MAX} strings of valid text of at most {STOP_MAX_CHARS} characters"),
        ("logprobs", call.logprobs, call.logprobs is None or (integer(call.logprobs) and 0 <= call.logprobs <= LOGPROBS_MAX),
         f"an integer, 0 <= logprobs <= {LOGPROBS_MAX}"),
        ("echo", call.echo, isinstance(call.echo, bool), "a bool"),
        ("seed", call.seed, integer(call.seed) and 0 <= call.seed <= SEED_MAX, "an integer, 0 <= seed <= 2**63 - 1"),
        ("lambda", call.lam, call.lam is None or (number(call.lam) and 0 <= call.lam <= LAMBDA_MAX),
         f"0 <= lambda <= {LAMBDA_MAX:g}"),
    ):
        if not ok:
            raise InvalidCall(f"{field}: expected {allowed}, got {value!r}")


def sample_together(generator, calls: list[SampleCall], counts: collections.Counter | None = None) -> list[dict | Exception]:
    """Run `calls` on `generator` (actors.generator.Generator), one sampler call per group; returns,
    per call, its {"samples", "seconds", "new_tokens", "batched_requests"} or its exception.

    A group's sampler call that raises is run again one call at a time: only the call that causes
    the error gets it, and every other call of the group gets what it gets alone (its own seeds and
    budgets make that the same answer it would have got batched). `counts`, when given, counts the
    sampler calls made ("sampler_calls") and the calls run again alone ("retried_alone")."""
    groups: dict[tuple, list[int]] = {}
    for i, call in enumerate(calls):
        groups.setdefault(call.group, []).append(i)
    counts = collections.Counter() if counts is None else counts
    results: list[dict | Exception] = [None] * len(calls)  # type: ignore[list-item]
    for members in groups.values():
        try:
            for i, result in zip(members, _sample_group(generator, [calls[i] for i in members], counts)):
                results[i] = result
        except Exception as e:  # noqa: BLE001 - its own caller's error, or to be told apart below
            if len(members) == 1:
                results[members[0]] = e
                continue
            counts["retried_alone"] += len(members)
            for i in members:  # one request's input may have failed them all: each alone
                try:
                    results[i] = _sample_group(generator, [calls[i]], counts)[0]
                except Exception as alone:  # noqa: BLE001 - handed to this call's caller only
                    results[i] = alone
    return results


def _sample_group(generator, batch: list[SampleCall], counts: collections.Counter) -> list[dict]:
    """One sampler call for calls of one group, its samples split back per call."""
    from actors.generator import prompt_seeds

    first = batch[0]
    prompts = [p for c in batch for p in c.prompts]
    counts["sampler_calls"] += 1
    out = generator.sample(
        prompts, first.n, [c.max_tokens for c in batch for _ in c.prompts], temperature=first.temperature,
        min_new_tokens=first.min_tokens, seeds=[s for c in batch for s in prompt_seeds(c.seed, len(c.prompts))],
        lam=None if first.lam is None else [c.lam for c in batch for _ in c.prompts], top_p=first.top_p,
        token_logprobs=True, top_logprobs=max(c.logprobs or 0 for c in batch))
    results, start = [], 0
    for call in batch:
        rows = slice(start, start + len(call.prompts))
        start += len(call.prompts)
        part = out["samples"][rows]
        result = {"samples": part, "seconds": out["seconds"], "batched_requests": len(batch),
                  "new_tokens": sum(s.drawn_tokens for s in part)}
        result.update(finish_call(generator, call, part, out["token_logprobs"][rows], out["top"][rows] if "top" in out else None))
        results.append(result)
    return results


def finish_call(generator, call: SampleCall, samples: list, token_logprobs: list, top: list | None) -> dict:
    """What one call gets beyond its samples, from the generator's per-token output; cuts its samples
    at its stop sequences first (`Generator.cut_at_stop`, in place, so the scorer sees the cut text).
    Returns:

    finish    per prompt and completion, "stop" (cut at a stop sequence, or end-of-sequence drawn)
              or "length" (max_tokens reached)
    tokens    None, or with `call.logprobs` per prompt and completion {"text": each token's text
              (slices of the completion that add up to it; a token a stop sequence cuts through keeps
              its part, end-of-sequence is ""), "logprobs": each token's log-prob under the
              distribution it was drawn from, "top": per token the call.logprobs likeliest tokens of
              that distribution and the drawn one, {text: log-prob} (None for logprobs 0)}
    prompt    None, or with `call.echo` and `call.logprobs` per prompt the same for the prompt's own
              tokens under the model (`Generator.prompt_logprobs`; None for the first token)
    """
    cut = generator.cut_at_stop(samples, call.stop, token_logprobs) if call.stop else [[None] * len(s.completions) for s in samples]
    ends = generator.encoder.stop_ids  # every end-of-turn id
    finish = [["stop" if k is not None or (ids and ids[-1] in ends) else "length" for k, ids in zip(ks, s.completion_ids)]
              for ks, s in zip(cut, samples)]
    out = {"finish": finish, "tokens": None, "prompt": None}
    if call.logprobs is None:
        return out
    k = call.logprobs
    prompt = generator.prompt_logprobs(list(call.prompts), k, call.lam) if call.echo else None
    names: dict[int, str] = {}  # token id -> its text as an alternative (special tokens by name)

    def name(ids) -> None:
        new = sorted(set(ids) - names.keys())
        names.update(zip(new, generator.tokenizer.batch_decode([[t] for t in new])))

    def details(ids: list[int], text: str, lps: list, steps: list | None) -> dict:
        ends = generator.token_ends(ids, text)
        row = {"text": [text[a:b] for a, b in zip([0] + ends[:-1], ends)], "logprobs": lps[: len(ids)], "top": None}
        if k and steps is not None:
            row["top"] = []
            for tok, lp, step in zip(ids, lps, steps):
                if step is None:  # a prompt's first token
                    row["top"].append(None)
                    continue
                step = step[:k] + ([(tok, lp)] if tok not in {t for t, _ in step[:k]} else [])  # the drawn token too
                name(t for t, _ in step)
                row["top"].append({names[t]: v for t, v in step})
        return row

    out["tokens"] = [[details(ids, text, lps, steps) for ids, text, lps, steps
                      in zip(s.completion_ids, s.completions, row_lps, row_tops or [None] * len(s.completions))]
                     for s, row_lps, row_tops in zip(samples, token_logprobs, top or [None] * len(samples))]
    if prompt is not None:
        out["prompt"] = [details(p["ids"], s.prompt, p["token_logprobs"], p["top"]) for p, s in zip(prompt, samples)]
    return out


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
    to its own caller only. When `fn` raises for a batch of several items, each item is run again
    alone (`retried` counts them), so only the item that causes the error gets it and the others get
    what they get alone. A result list of the wrong length is a bug in `fn` and fails the whole batch.
    A caller that is cancelled (its client went away) is dropped from the batch it had not yet joined.
    """

    def __init__(self, fn: Callable[[list], Awaitable[list]], max_size: int, size: Callable[[Any], int] = lambda _: 1,
                 wait_s: float = 0.0):
        if max_size < 1:
            raise ValueError(f"max_size: expected an integer >= 1, got {max_size}")
        self.fn, self.max_size, self.size, self.wait_s = fn, max_size, size, wait_s
        self.pending: collections.deque = collections.deque()  # (item, future) in arrival order
        self.batches: list[int] = []  # the number of items in each batch run, in order
        self.retried = 0  # items run again alone after their batch's call raised
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
                except Exception as e:  # noqa: BLE001 - its own caller's error, or to be told apart below
                    results = [e] * len(batch) if len(batch) == 1 else await self._alone(batch)
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

    async def _alone(self, batch: list) -> list:
        """Each item of a batch whose call raised, run alone: its own result or its own exception."""
        results = []
        for item, future in batch:
            if future.done():  # cancelled meanwhile: not run again
                results.append(None)
                continue
            self.retried += 1
            try:
                (result,) = await self.fn([item])
            except Exception as e:  # noqa: BLE001 - this item's caller's error
                result = e
            results.append(result)
        return results


class BatchedScorer:
    """A scorer (actors.scorer.make_scorer(spec)) behind a ContinuousBatcher: the samples of requests
    that arrive while a scorer call runs are scored together in the next, in a thread so the caller's
    event loop keeps answering. Used by the scorer deployment, and by the generator deployment when
    the scorer is colocated with it."""

    def __init__(self, spec: dict, max_size: int, wait_s: float = 0.0):
        from actors.cluster import reserved_device
        from actors.scorer import make_scorer

        # "auto": a GPU only where this replica reserved one (ray_actor_options num_gpus)
        self.scorer = make_scorer({**spec, "device": reserved_device(spec.get("device", "auto"))})
        self.batcher = ContinuousBatcher(self._score, max_size, size=len, wait_s=wait_s)

    async def _score(self, sample_lists: list) -> list:
        return await asyncio.to_thread(score_together, self.scorer, sample_lists)

    async def __call__(self, samples: list) -> list:
        return await self.batcher(samples)
