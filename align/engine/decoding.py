"""How one model advances during sampling: prefill P prompts once, then feed one token per row for
P*n rows (n continuations per prompt, rows p*n .. p*n+n-1 belong to prompt p).

Two caches sit behind the same three verbs (`logits`, `step(tokens)`, `keep_rows(rows)`):

- `SharedPrefixState` (the default): the prompt's keys and values are kept once per prompt and every
  continuation attends to them through `align.engine.shared_prefix` (log-sum-exp merge with its own
  continuation, kept in a preallocated buffer). Nothing grows by concatenation; memory is
  P*L + P*n*T per layer instead of P*n*(L+T).
- `ExpandedCacheState`: the prefilled `DynamicCache` expanded in place to n adjacent copies per prompt
  (`batch_repeat_interleave`), the attention mask extended by a column per step. It is the reference
  the shared-prefix path is tested against, and the fallback for models whose attention is not plain
  softmax attention (sliding windows, soft-capping).

Left padding needs explicit position ids (the cumsum of the attention mask) at prefill and at every
step; the mask is expanded with repeat_interleave, never repeat (.repeat would silently mix prompts).
"""
from __future__ import annotations

import logging

import torch
from transformers import DynamicCache

from align.engine.shared_prefix import SharedPrefixKV, UnsupportedModel, enable_shared_prefix

log = logging.getLogger("sweetspot.decoding")

CACHES = ("auto", "shared_prefix", "expanded")


def _num_layers(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "num_hidden_layers", None)


def _plain_head(model, input_ids, attention_mask, position_ids, kv):
    """The prefill forward, checking on the way whether the model's logits are exactly its output
    embedding (a plain nn.Linear) applied to the base model's last hidden state, with nothing after it
    (no soft-capping or scaling). Returns (outputs, head or None)."""
    head, seen = model.get_output_embeddings(), {}
    if type(head) is not torch.nn.Linear or getattr(model, "base_model", model) is model:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False, logits_to_keep=1, shared_prefix=kv), None
    hook = head.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=1, shared_prefix=kv)
    finally:
        hook.remove()
    plain = "out" in seen and seen["out"].shape == out.logits.shape and torch.equal(seen["out"], out.logits)
    return out, head if plain else None


def head_logits(head: torch.nn.Linear, hidden: torch.Tensor, vocab_chunk: int = 4096) -> torch.Tensor:
    """hidden (B, d) -> logits (B, V) float32. On CPU the product is taken as W @ h^T over chunks of
    the vocabulary, each transposed into place while it is in cache: with a 50k vocabulary and up to a
    few hundred rows this runs 1.4-1.8x faster than h @ W^T (jobs/bench/generate, torch 2.13, 2 threads)."""
    if hidden.device.type != "cpu" or head.weight.dtype != torch.float32:
        return torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    W, hT = head.weight, hidden.t()
    logits = hidden.new_empty(hidden.shape[0], W.shape[0])
    for i in range(0, W.shape[0], vocab_chunk):
        logits[:, i : i + vocab_chunk].copy_(torch.mm(W[i : i + vocab_chunk], hT).t())
    return logits if head.bias is None else logits.add_(head.bias)


class SharedPrefixState:
    """One model decoding P*n rows over P shared prompts (see `align.engine.shared_prefix`).

    Decode steps run the base model and apply the LM head themselves (`head_logits`) when the prefill
    showed that the model's logits are exactly that head's output; otherwise they call the whole model.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, capacity: int,
                 compile: bool = False):
        enable_shared_prefix(model)
        self.model, self.n = model, n
        self.kv = SharedPrefixKV(attention_mask, capacity)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        out, self.head = _plain_head(model, input_ids, attention_mask, position_ids, self.kv)
        self.kv.start_decoding(_num_layers(model))
        self._logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # (P*n, V) for the first new token
        self.hidden = None  # (rows, d) last hidden states, when the head is applied lazily
        self.buffer = None  # draw_from_hidden's scratch, reused across steps
        self.next_pos = attention_mask.sum(-1, keepdim=True).repeat_interleave(n, 0)  # (P*n, 1)
        target = model.base_model if self.head is not None else model
        self.forward = compiled_forward(target) if compile else target

    def step(self, tokens: torch.Tensor) -> None:
        """Feed tokens (rows,) and set `logits` to the next token's (rows, V)."""
        self.kv.begin_step()
        out = self.forward(input_ids=tokens[:, None], position_ids=self.next_pos + self.kv.length,
                           use_cache=False, shared_prefix=self.kv)
        self.kv.advance()
        if self.head is None:
            self._logits, self.hidden = out.logits[:, -1].float(), None
        else:  # the head is applied when the logits are asked for, or fused into the draw
            self._logits, self.hidden = None, out.last_hidden_state[:, -1]

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            self._logits = head_logits(self.head, self.hidden)
        return self._logits

    def draw(self, u: torch.Tensor, temperature: float, eos_token_id: int | None, eos_blocked: bool):
        """(tokens, log-probs) drawn with the head fused into the draw (`draw_from_hidden`), or None
        where that does not apply (the prefill's logits, a model without a plain head, a GPU or low
        precision: there the generic draw over materialised logits is as fast)."""
        from align.math.draw import draw_from_hidden

        h = self.hidden
        if h is None or self._logits is not None or h.device.type != "cpu" or h.dtype != torch.float32:
            return None
        W = self.head.weight
        if self.buffer is None or self.buffer.shape[1] != h.shape[0]:
            self.buffer = h.new_zeros(-(-W.shape[0] // 256) * 256, h.shape[0])
        return draw_from_hidden(W, self.head.bias, h, u, temperature, eos_token_id, eos_blocked, buffer=self.buffer)

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.kv.keep_rows(rows)
        self.next_pos = self.next_pos.index_select(0, rows)
        if self._logits is not None:
            self._logits = self._logits.index_select(0, rows)
        if self.hidden is not None:
            self.hidden = self.hidden.index_select(0, rows)

    def cache_bytes(self) -> int:
        return self.kv.nbytes()


class ExpandedCacheState:
    """One model decoding P*n rows with the prompt's cache copied n times (the reference path)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, capacity: int):
        self.model = model
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.cache.batch_repeat_interleave(n)  # (P, ...) -> (P*n, ...), copies of a prompt adjacent
        self.logits = out.logits[:, -1].float().repeat_interleave(n, 0)
        self.mask = attention_mask.repeat_interleave(n, 0)  # (P*n, L + steps)
        self.next_pos = self.mask.sum(-1, keepdim=True)
        self.length = 0

    def draw(self, *args):
        return None  # the generic draw over `logits`

    def step(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], -1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos + self.length,
                         cache=self.cache, use_cache=True)
        self.cache, self.length = out.cache, self.length + 1
        self.logits = out.logits[:, -1].float()

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.next_pos = self.mask.index_select(0, rows), self.next_pos.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


_warned: set[str] = set()


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, capacity: int,
            cache: str = "auto", compile: bool = False):
    """Prefill P left-padded prompts (P, L) once and return a state decoding P*n rows.

    cache: "shared_prefix", "expanded", or "auto" (shared prefix where the model's attention allows it,
    else expanded, with a warning). capacity: the most tokens `step` will be fed (max_new_tokens - 1).
    compile: run shared-prefix decode steps through `compiled_forward`.
    """
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if cache != "expanded":
        try:
            return SharedPrefixState(model, input_ids, attention_mask, n, capacity, compile)
        except UnsupportedModel as e:
            if cache == "shared_prefix":
                raise
            if type(model).__name__ not in _warned:
                _warned.add(type(model).__name__)
                log.warning("shared-prefix attention unavailable for %s (%s); using an expanded cache", type(model).__name__, e)
    return ExpandedCacheState(model, input_ids, attention_mask, n, capacity)


def compiled_forward(module):
    """torch.compile(module) for decode steps, made once per module and kept on it. Shapes are dynamic
    (rows and the continuation length change); the first calls pay the compilation."""
    compiled = getattr(module, "_sweetspot_compiled", None)
    if compiled is None:
        compiled = torch.compile(module)
        object.__setattr__(module, "_sweetspot_compiled", compiled)  # not a submodule: keep it out of state_dict
    return compiled
