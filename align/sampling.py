"""n completions per prompt from one prefill: the prompt's KV cache is computed once and shared.

The naive way to draw n samples repeats every prompt n times and pays the prefill n times (HF
`generate(num_return_sequences=n)` does this). Here the prompts are prefilled once, the cache is
expanded in place to n adjacent copies per prompt (`DynamicCache.batch_repeat_interleave`), and the
decode loop runs on P*n rows. Left padding needs explicit position ids (the cumsum of the attention
mask) at prefill and at every step; the mask is expanded with repeat_interleave, never repeat, so the
n copies of prompt p sit in rows p*n .. p*n+n-1 (.repeat would silently mix prompts; dropping the
position ids in decode misaligns positions).

Tokens are drawn by inverse CDF (cumsum, then searchsorted on one uniform per row), which is exact
and much cheaper than torch.multinomial over a large vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Samples:
    """P*n sampled continuations; rows p*n .. p*n+n-1 belong to prompt p."""

    tokens: torch.Tensor  # (P*n, T) generated ids, pad_token_id after the end
    mask: torch.Tensor  # (P*n, T) bool, True for generated tokens (eos included)
    logprobs: torch.Tensor  # (P*n,) log-prob of y under the process that drew it (see `process_logits`)
    n: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def completion_ids(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.tokens, self.mask)]


def process_logits(logits: torch.Tensor, temperature=1.0, eos_token_id: int | None = None,
                   eos_blocked: torch.Tensor | bool = False) -> torch.Tensor:
    """The logits of the distribution a token is actually drawn from: logits / temperature, with the
    end-of-sequence token at -inf where it is blocked (completion positions before min_new_tokens).

    Every log-prob the project stores or compares (sampler, reference log-probs, trainers' log-ratios,
    the KL in jobs/evaluate) goes through this one transform, so both sides of a KL or a log-ratio
    describe the same sampling process (docs/algorithms.md, "What KL(pi || pi_0) measures").

    logits: (..., V). temperature: a float or a tensor broadcastable to logits[..., :1] (e.g. (B, 1, 1)).
    eos_blocked: a bool or a bool tensor of logits.shape[:-1]. Returns a new tensor, or `logits`
    itself when there is nothing to change.
    """
    blocked = eos_token_id is not None and (eos_blocked.any().item() if torch.is_tensor(eos_blocked) else eos_blocked)
    if not blocked and not torch.is_tensor(temperature) and temperature == 1.0:
        return logits
    out = logits / temperature
    if blocked:
        col = out[..., eos_token_id]  # a view: the in-place fill below edits `out`
        if torch.is_tensor(eos_blocked):
            col.masked_fill_(eos_blocked, float("-inf"))
        else:
            col.fill_(float("-inf"))
    return out


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of `probs` (B, V) (rows need not be normalised); returns (B,)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator, dtype=cdf.dtype)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_(max=probs.shape[-1] - 1)


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
) -> Samples:
    """Sample n continuations for each of P left-padded prompts with a single prefill.

    input_ids, attention_mask: (P, L), left-padded. Returns `Samples` with P*n rows.
    Sampling is from softmax(logits / temperature) with no top-k or top-p (the BoN analysis assumes
    i.i.d. draws from pi_0 itself). eos is blocked for the first `min_new_tokens` tokens; a row that
    emits eos stops (later tokens are pad and masked out). eos_token_id=None never stops early.
    `logprobs` are those of this process (`process_logits`), the distribution each token came from.
    """
    if n < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError(f"need n >= 1, max_new_tokens >= 1, temperature > 0; got {n}, {max_new_tokens}, {temperature}")
    device = input_ids.device
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=DynamicCache(),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.cache
    cache.batch_repeat_interleave(n)  # (P, ...) -> (P*n, ...), copies of a prompt adjacent
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # (P*n, V)
    attention_mask = attention_mask.repeat_interleave(n, 0)  # (P*n, L)
    next_pos = attention_mask.sum(-1, keepdim=True)  # (P*n, 1) position of the first new token

    rows = logits.shape[0]
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, max_new_tokens), dtype=torch.bool, device=device)
    logprobs = torch.zeros(rows, dtype=torch.float32, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        scaled = process_logits(logits, temperature, eos_token_id, t < min_new_tokens)  # (P*n, V)
        logp = torch.log_softmax(scaled, -1)  # the distribution this token is drawn from
        probs = logp.exp()
        tok = inverse_cdf_sample(probs, generator)  # finished rows keep drawing; their tokens are dropped
        tokens[:, t] = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        mask[:, t] = alive
        logprobs += torch.where(alive, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        if eos_token_id is not None:
            alive &= tok != eos_token_id
        if t == max_new_tokens - 1 or not alive.any():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], -1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos + t,
            cache=cache,
            use_cache=True,
        )
        cache = out.cache
        logits = out.logits[:, -1].float()
    return Samples(tokens=tokens, mask=mask, logprobs=logprobs, n=n)


@torch.no_grad()
def sample_n_repeated(model, input_ids, attention_mask, n, **kwargs) -> Samples:
    """The naive baseline: repeat every prompt n times and prefill P*n rows (for tests and benchmarks)."""
    return sample_n(model, input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0), 1, **kwargs)


@torch.no_grad()
def continuation_logprobs(model, input_ids, attention_mask, tokens, mask, temperature: float = 1.0,
                          min_new_tokens: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
    """log-prob of given continuations under `model` run as the sampling process `sample_n` runs
    (same temperature, eos blocked at the first `min_new_tokens` positions): prompts (B, L)
    left-padded, continuations (B, T) with `mask` marking real tokens (as `Samples` holds them).
    Returns (B,) float32."""
    full = torch.cat([input_ids, tokens], 1)
    full_mask = torch.cat([attention_mask.long(), mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_(min=0)
    logits = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits[:, input_ids.shape[1] - 1 : -1]
    blocked = torch.arange(tokens.shape[1], device=tokens.device) < min_new_tokens  # (T,)
    logits = process_logits(logits.float(), temperature, eos_token_id, blocked.expand(tokens.shape))
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
    return torch.where(mask, logp, 0.0).sum(-1)
