"""Shared-prefix attention: the n continuations of a prompt attend to one copy of its keys and values.

At a decode step, row i (continuation i of prompt p) attends over [prompt p ; its own continuation].
The two parts are computed apart and merged exactly by their log-sum-exp (Hydragen, Juravsky et al.
2024, arXiv 2402.05099, section 3.1; FlashInfer's cascade inference):

    o = (e^{lse_1} o_1 + e^{lse_2} o_2) / (e^{lse_1} + e^{lse_2})

where o_1, lse_1 are softmax attention over the prompt's keys only and o_2, lse_2 over the row's own
continuation. The prompt part is one batched matmul per prompt with its n (times the GQA group size)
queries stacked, reading the prompt's keys and values once instead of n times; the continuation part
reads a preallocated (rows, heads, max_new_tokens, head_dim) buffer written in place, so nothing is
concatenated per step. Decode cost and cache memory scale with P*L + P*n*T, not P*n*(L+T).

How it plugs into a transformers model: `enable_shared_prefix(model)` registers `shared_prefix_attention`
with transformers' AttentionInterface under its own name and points the model's config at it. The
model's own modules still compute projections, positions (RoPE), norms and MLPs; only attention and
the cache are replaced. A forward without a `shared_prefix=` keyword falls through to the attention
the model had (sdpa or flash), so the model behaves as before everywhere else. With
`shared_prefix=kv` (a `SharedPrefixKV`), a prefill forward records each layer's prompt keys and values
in kv, and a decode forward (one token per row) writes its keys and values into kv's buffers and
attends as above. Models whose attention needs more than plain softmax attention (sliding windows,
soft-capping, attention sinks) are refused with `UnsupportedModel`; callers then use an expanded cache.
"""
from __future__ import annotations

import torch

NAME = "sweetspot_shared_prefix"
# Keywords an attention function may receive that change the attention itself, not just its inputs.
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")


class UnsupportedModel(RuntimeError):
    """The model's attention is not plain softmax attention over its keys (or does not take our keyword)."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning its log-sum-exp: q (..., Q, D), k and v (..., K, D), key_mask
    broadcastable to (..., Q, K) with True for keys that may be attended. Returns o (..., Q, D) and
    lse (..., Q) in float32; a query with no key to attend gets o = 0 and lse = -inf."""
    s = (q @ k.transpose(-1, -2)).float() * scaling  # (..., Q, K)
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # (..., Q)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])  # rows with no key: exp(-inf) = 0
    return (p.to(v.dtype) @ v).float(), lse


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """The attention over the union of two disjoint key sets from the attention over each:
    o (..., D), lse (...). Exact: softmax over the union weights each part by e^{lse_part} / e^{lse}."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None]


class SharedPrefixKV:
    """The keys and values of P prompts (kept once each) and of their P*m continuations (m rows per
    prompt, rows p*m .. p*m+m-1 belong to prompt p, in a preallocated buffer).

    prompt_mask: (P, L) bool, True for real prompt tokens (left padding is False).
    capacity: the most continuation tokens that will be written (max_new_tokens - 1 for a sampler: the
    last token drawn is never fed back).
    """

    def __init__(self, prompt_mask: torch.Tensor, capacity: int):
        self.prompt_mask = prompt_mask.bool()
        self.capacity = max(int(capacity), 1)
        self.prefilling = True
        self.length = 0  # continuation tokens written so far (the same for every row)
        # The step's write position and the visible continuation slots as tensors, so a compiled decode
        # step has the same shapes and no changing Python ints at every step (no recompilation).
        device = prompt_mask.device
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.visible = torch.zeros(self.capacity, dtype=torch.bool, device=device)
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (P, Hkv, L, D) keys, values
        self.suffix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (P*m, Hkv, capacity, D)

    @property
    def num_prompts(self) -> int:
        return self.prompt_mask.shape[0]

    def start_decoding(self, num_layers: int | None = None) -> None:
        """Called after the prefill forward: check that every layer recorded its prompt keys."""
        if not self.prefix or (num_layers is not None and len(self.prefix) != num_layers):
            raise UnsupportedModel(f"the prefill recorded keys for {len(self.prefix)} of {num_layers} layers: "
                                   "the model does not pass attention keywords through to its attention function")
        self.prefilling = False

    def begin_step(self) -> None:
        """Called before each decode forward: its token goes to slot `length`."""
        if self.length >= self.capacity:
            raise RuntimeError(f"continuation buffer full ({self.capacity} tokens)")
        self.position.fill_(self.length)
        self.visible[self.length] = True

    def advance(self) -> None:
        """Called after each decode forward: every layer has written one more continuation token."""
        self.length += 1

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only continuations `rows` (sorted, the same number for every prompt)."""
        for layer, (k, v) in self.suffix.items():
            self.suffix[layer] = (k.index_select(0, rows), v.index_select(0, rows))

    def nbytes(self) -> int:
        tensors = [t for kv in (*self.prefix.values(), *self.suffix.values()) for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)

    def record_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.prefix[layer] = (key, value)

    def attend_step(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scaling: float) -> torch.Tensor:
        """One decode step of one layer: query (B, H, 1, D), key and value (B, Hkv, 1, D) for B = P*m
        rows. Writes key and value at position `length` and returns the attention output (B, 1, H, D)."""
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        P, g = self.num_prompts, H // Hkv
        m = B // P
        if layer not in self.suffix:
            shape = (B, Hkv, self.capacity, D)
            # Zeros, not empty: slots not yet written get softmax weight 0, and 0 * NaN garbage would be NaN.
            self.suffix[layer] = (key.new_zeros(shape), value.new_zeros(shape))
        ks, vs = self.suffix[layer]
        ks.index_copy_(2, self.position, key)
        vs.index_copy_(2, self.position, value)
        kp, vp = self.prefix[layer]

        # Prompt part: the m rows of a prompt and the g query heads of a key head are one block of m*g queries.
        q = query.view(P, m, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(P, Hkv, g * m, D)
        o1, lse1 = attend(q, kp, vp, scaling, self.prompt_mask[:, None, None, :])  # (P, Hkv, g*m, D), (P, Hkv, g*m)
        o1 = o1.view(P, Hkv, g, m, D).permute(0, 3, 1, 2, 4).reshape(B, H, D)
        lse1 = lse1.view(P, Hkv, g, m).permute(0, 3, 1, 2).reshape(B, H)

        # Continuation part: each row over its own tokens so far, this one included (all real tokens:
        # finished rows are dropped later). The whole buffer with a mask keeps shapes fixed across steps.
        q = query.view(B, Hkv, g, D)
        o2, lse2 = attend(q, ks, vs, scaling, self.visible)  # (B, Hkv, g, D), (B, Hkv, g)
        out = merge_attention(o1, lse1, o2.reshape(B, H, D), lse2.reshape(B, H))
        return out.to(query.dtype)[:, None]  # (B, 1, H, D), the layout transformers' attention functions return


def _make_attention(fallback):
    def shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        kv: SharedPrefixKV | None = kwargs.pop("shared_prefix", None)
        if kv is None:
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        bad = [name for name in _UNSUPPORTED if kwargs.get(name) is not None]
        if bad or getattr(module, "layer_idx", None) is None:
            raise UnsupportedModel(f"{type(module).__name__} uses {bad or 'no layer_idx'}: not plain softmax attention")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if kv.prefilling:
            kv.record_prompt(module.layer_idx, key, value)
            return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if query.shape[2] != 1:
            raise ValueError(f"shared-prefix decoding feeds one token per row, got {query.shape[2]}")
        return kv.attend_step(module.layer_idx, query, key, value, scaling), None

    return shared_prefix_attention


def enable_shared_prefix(model) -> None:
    """Route the model's attention through `shared_prefix_attention` (idempotent). Forwards without
    `shared_prefix=` keep the model's previous attention (eager models fall back to sdpa, equal to 1e-6)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    current = config._attn_implementation
    if current and current.startswith(NAME):
        return
    base = current if current in ALL_ATTENTION_FUNCTIONS._global_mapping and current != "paged|eager" else "sdpa"
    name = f"{NAME}+{base}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_attention(ALL_ATTENTION_FUNCTIONS[base]))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
