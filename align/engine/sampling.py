"""n completions per prompt from one prefill, and the one decode loop every sampler shares.

The naive way to draw n samples repeats every prompt n times and pays the prefill n times (HF
`generate(num_return_sequences=n)` does this). Here the prompts are prefilled once and the decode loop
runs on P*n rows (rows p*n .. p*n+n-1 belong to prompt p); how each model's cache holds the shared
prompt is `align.engine.decoding`'s business (by default its keys and values are kept once per prompt).
`NSampler` is the loop: plain sampling, DeRa (several models, logits mixed per row) and speculative
rejection (drop rows between steps) are variations of its models, `mix` and `keep`, not copies of it.

Tokens are drawn by inverse CDF (cumsum, then searchsorted on one uniform per row), which is exact
and much cheaper than torch.multinomial over a large vocabulary. Temperature 0 is greedy decoding and
top_p < 1 nucleus sampling (`align.math.draw.process_logits`); the log-probs kept, per token and per
sequence, are always those of the distribution each token was drawn from (the nucleus renormalised;
0 for a greedy token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align.math.draw import draw_tokens, end_ids, process_logits, top_tokens


@dataclass
class Samples:
    """P*n sampled continuations; rows p*n .. p*n+n-1 belong to prompt p."""

    tokens: torch.Tensor  # (P*n, T) generated ids, pad_token_id after the end
    mask: torch.Tensor  # (P*n, T) bool, True for generated tokens (eos included)
    logprobs: torch.Tensor  # (P*n,) log-prob of y under the process that drew it (see `process_logits`)
    n: int
    token_logprobs: torch.Tensor | None = None  # (P*n, T) each token's log-prob under that process, 0 past the end
    top_ids: torch.Tensor | None = None  # (P*n, T, k) the k likeliest tokens of each step's distribution (top_logprobs=k)
    top_logprobs: torch.Tensor | None = None  # (P*n, T, k) their log-probs, descending (-inf: fewer than k possible)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def completion_ids(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


class NSampler:
    """The decode loop every sampler shares: n continuations per prompt from one prefill of each model.

    models: one causal LM, or several decoding the same rows in lockstep (DeRa mixes a reference and an
    aligned model); `mix(logits_list, rows)` turns their (B, V) logits into the logits drawn from,
    `rows` being the original row index of each current row (default: the first model's logits).
    Tokens are drawn by `draw_tokens`; log-probs are those of the process (`process_logits`: temperature,
    with 0 greedy, the blocked end-of-sequence, and the nucleus for top_p < 1), per token and summed;
    top_logprobs=k also keeps each step's k likeliest tokens of that distribution. A row
    that emits EOS is finished (later tokens are pad and masked out); finished rows stay in the batch
    until `keep` drops them or every row is done. `run(until)` decodes up to `until` tokens, so a
    caller can look at partial completions and `keep` some rows (speculative rejection) in between.

    Prompts batched from different requests (the Serve app) keep their own draws: `generator` may be
    one torch.Generator per prompt, each drawing the uniforms of that prompt's rows only, and
    `max_new_tokens` one budget per prompt (a row stops at its budget as at end-of-sequence). A
    prompt's samples then depend on its own seed, not on what it was batched with.
    """

    def __init__(self, models, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                 max_new_tokens: int | list[int], temperature: float = 1.0, min_new_tokens: int = 0,
                 eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | list[torch.Generator] | None = None, mix=None, cache: str = "auto",
                 compile: bool = False, top_p: float = 1.0, top_logprobs: int = 0):
        num_prompts, device = input_ids.shape[0], input_ids.device
        budgets = [max_new_tokens] * num_prompts if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if n < 1 or min(budgets, default=1) < 1 or temperature < 0 or not 0 < top_p <= 1 or top_logprobs < 0:
            raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1, top_logprobs >= 0; "
                             f"got {n}, {max_new_tokens}, {temperature}, {top_p}, {top_logprobs}")
        if len(budgets) != num_prompts or (isinstance(generator, (list, tuple)) and len(generator) != num_prompts):
            raise ValueError(f"max_new_tokens and generator, when lists, need one entry per prompt ({num_prompts})")
        from align.engine.decoding import prefill

        max_new_tokens = max(budgets)
        # None when every prompt has the same budget: the loop's own bound stops them
        self.budget = None if len(set(budgets)) == 1 else torch.tensor(budgets, device=device).repeat_interleave(n)
        models = list(models) if isinstance(models, (list, tuple)) else [models]
        self.states = [prefill(m, input_ids, attention_mask, n, max_new_tokens - 1, cache, compile) for m in models]
        self.num_prompts, self.n, self.max_new_tokens = num_prompts, n, max_new_tokens
        self.temperature, self.min_new_tokens, self.top_p = temperature, min_new_tokens, top_p
        self.eos_token_id, self.pad_token_id, self.generator, self.mix = eos_token_id, pad_token_id, generator, mix
        ends = end_ids(eos_token_id)  # every id that ends a row (a chat model's end-of-turn ids)
        self.ends = torch.tensor(ends, dtype=torch.long, device=input_ids.device) if ends else None
        rows = self.num_prompts * n
        self.tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
        self.logprobs = torch.zeros(rows, dtype=torch.float32, device=device)
        self.token_logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
        k = min(top_logprobs, self.states[0].logits.shape[-1]) if top_logprobs else 0
        self.top_ids = torch.zeros((rows, max_new_tokens, k), dtype=torch.long, device=device) if k else None
        self.top_logprobs = torch.full((rows, max_new_tokens, k), float("-inf"), device=device) if k else None
        self.alive = torch.ones(rows, dtype=torch.bool, device=device)
        self.rows = torch.arange(rows, device=device)  # original row index of every current row
        self.drawn = torch.zeros(rows, dtype=torch.long, device=device)  # tokens drawn per original row, dropped rows too
        self.t = 0  # tokens drawn so far per row

    @property
    def done(self) -> bool:
        return self.t >= self.max_new_tokens or not bool(self.alive.any())

    def step(self) -> None:
        """Draw token t for every row and feed it back (unless it was the last)."""
        t, alive, blocked = self.t, self.alive, self.t < self.min_new_tokens
        u = self.uniforms()
        # the head fused into the draw covers plain sampling (one model, T > 0, no nucleus); the draw
        # does not depend on whether the top k are asked for, so neither do the samples
        fused = not self.mix and self.temperature > 0 and self.top_p >= 1
        drawn = self.states[0].draw(u, self.temperature, self.eos_token_id, blocked) if fused else None
        if drawn is None:
            drawn = draw_tokens(self.logits(), self.temperature, self.eos_token_id, blocked, u=u, top_p=self.top_p)
        if self.top_ids is not None:
            processed = process_logits(self.logits(), self.temperature, self.eos_token_id, blocked, self.top_p)
            self.top_ids[:, t], self.top_logprobs[:, t] = top_tokens(processed, self.top_ids.shape[-1])
        tok, logp = drawn
        self.tokens[:, t] = torch.where(alive, tok, self.pad_token_id)
        self.mask[:, t] = alive
        self.drawn.index_add_(0, self.rows, alive.long())
        logp = torch.where(alive, logp, 0.0)
        self.token_logprobs[:, t] = logp
        self.logprobs += logp
        if self.ends is not None:
            alive &= ~torch.isin(tok, self.ends)
        if self.budget is not None:
            alive &= self.budget[self.rows] > t + 1
        self.t += 1
        if not self.done:
            for s in self.states:
                s.step(tok)  # finished rows keep drawing; their tokens are dropped above

    def logits(self) -> torch.Tensor:
        """The current rows' next-token logits (B, V): the first model's, or the models' `mix`."""
        return self.mix([s.logits for s in self.states], self.rows) if self.mix else self.states[0].logits

    def uniforms(self) -> torch.Tensor:
        """One uniform per current row (B, 1): from the one generator, or each prompt's rows from its own."""
        kw = dict(device=self.alive.device, dtype=torch.float32)
        if isinstance(self.generator, (list, tuple)):
            return torch.cat([torch.rand(self.n, 1, generator=g, **kw) for g in self.generator])
        return torch.rand(self.alive.shape[0], 1, generator=self.generator, **kw)

    def run(self, until: int | None = None) -> "NSampler":
        """Decode until `until` tokens per row (default max_new_tokens) or every row has finished."""
        until = self.max_new_tokens if until is None else min(until, self.max_new_tokens)
        while self.t < until and not self.done:
            self.step()
        return self

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the current rows `rows` (sorted, the same number for every prompt)."""
        rows = torch.as_tensor(rows, device=self.tokens.device)
        m = rows.numel() // self.num_prompts
        prompt_of = rows // self.n
        if rows.numel() != m * self.num_prompts or not torch.equal(prompt_of, torch.arange(self.num_prompts, device=rows.device).repeat_interleave(m)):
            raise ValueError(f"keep needs the same number of rows for each of {self.num_prompts} prompts, sorted by prompt")
        for name in ("tokens", "mask", "logprobs", "token_logprobs", "alive", "rows", "top_ids", "top_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))
        if not self.done:
            for s in self.states:
                s.keep_rows(rows)
        self.n = m

    def samples(self) -> "Samples":
        return Samples(tokens=self.tokens, mask=self.mask, logprobs=self.logprobs, n=self.n,
                       token_logprobs=self.token_logprobs, top_ids=self.top_ids, top_logprobs=self.top_logprobs)


@torch.no_grad()
def sample_n(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    generator: torch.Generator | None = None,
    cache: str = "auto",
    compile: bool = False,
    top_p: float = 1.0,
) -> Samples:
    """Sample n continuations for each of P left-padded prompts with a single prefill.

    input_ids, attention_mask: (P, L), left-padded. Returns `Samples` with P*n rows.
    Sampling is from softmax(logits / temperature) with no top-k, and no top-p unless top_p < 1 is asked
    for (the BoN analysis assumes i.i.d. draws from pi_0 itself); temperature 0 is greedy. eos_token_id: an end id or several (a chat model's
    end-of-turn ids, `align.engine.chat`); all are blocked for the first `min_new_tokens` tokens, and a
    row that emits any stops (later tokens are pad and masked out). eos_token_id=None never stops early.
    `logprobs` are those of this process (`process_logits`), the distribution each token came from.
    cache: "auto" | "shared_prefix" | "expanded"; compile: torch.compile the decode step (`align.engine.decoding`).
    """
    return NSampler(model, input_ids, attention_mask, n, max_new_tokens, temperature, min_new_tokens, eos_token_id,
                    pad_token_id, generator, cache=cache, compile=compile, top_p=top_p).run().samples()


@torch.no_grad()
def sample_n_repeated(model, input_ids, attention_mask, n, **kwargs) -> Samples:
    """The naive baseline: repeat every prompt n times and prefill P*n rows (for tests and benchmarks)."""
    return sample_n(model, input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0), 1, **kwargs)


@torch.no_grad()
def continuation_logprobs(model, input_ids, attention_mask, tokens, mask, temperature: float = 1.0,
                          min_new_tokens: int = 0, eos_token_id: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """log-prob of given continuations under `model` run as the sampling process `sample_n` runs
    (same temperature and top_p, eos blocked at the first `min_new_tokens` positions): prompts (B, L)
    left-padded, continuations (B, T) with `mask` marking real tokens (as `Samples` holds them).
    Returns (B,) float32."""
    full = torch.cat([input_ids, tokens], 1)
    full_mask = torch.cat([attention_mask.long(), mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits[:, input_ids.shape[1] - 1 : -1]
    blocked = torch.arange(tokens.shape[1], device=tokens.device) < min_new_tokens  # (T,)
    logits = process_logits(logits.float(), temperature, eos_token_id, blocked.expand(tokens.shape), top_p)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    return torch.where(mask, logp, 0.0).sum(-1)
