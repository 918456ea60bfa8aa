"""Shared-prefix attention against the expanded-cache path: the same logits at every step (GPT-2 and
Llama with grouped-query attention, left padding, rows dropped mid-way), the log-sum-exp merge in
closed form, the fallback for attention it cannot serve, and the cache sizes it promises."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from align.engine.decoding import ExpandedCacheState, SharedPrefixState, head_logits, prefill
from align.engine.sampling import NSampler, continuation_logprobs, sample_n
from align.engine.shared_prefix import UnsupportedModel, attend, merge_attention

V = 97


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                      bos_token_id=None, eos_token_id=None)).eval()


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    return ids, mask


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama-gqa"])
def test_logits_equal_the_expanded_cache_path(make):
    model, (ids, mask) = make(), prompts()
    n, T = 4, 6
    tokens = torch.randint(1, V, (3 * n, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shared = prefill(model, ids, mask, n, T, cache="shared_prefix")
        expanded = prefill(model, ids, mask, n, T, cache="expanded")
        assert isinstance(shared, SharedPrefixState) and isinstance(expanded, ExpandedCacheState)
        torch.testing.assert_close(shared.logits, expanded.logits, atol=1e-5, rtol=0)
        for t in range(T):
            if t == 3:  # speculative rejection drops rows: keep rows 1 and 3 of every prompt
                keep = torch.tensor([p * n + j for p in range(3) for j in (1, 3)])
                shared.keep_rows(keep)
                expanded.keep_rows(keep)
                tokens = tokens[keep]
            shared.step(tokens[:, t])
            expanded.step(tokens[:, t])
            torch.testing.assert_close(shared.logits, expanded.logits, atol=1e-5, rtol=0)


def test_model_keeps_its_own_attention_outside_sampling():
    model, (ids, mask) = gpt2(), prompts()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        sample_n(model, ids, mask, 2, 3)
        assert model.config._attn_implementation.startswith("sweetspot_shared_prefix")
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-6, rtol=0)


def test_attend_and_merge_in_closed_form():
    # One query, keys k1 = [1, 0], k2 = [0, 1], q = [ln 2, 0], scaling 1: scores ln 2 and 0, so the
    # softmax weights are 2/3 and 1/3, lse = ln 3; each key alone has weight 1 and its own lse.
    q = torch.tensor([[[math.log(2.0), 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.tensor([[[3.0, 0.0], [0.0, 6.0]]])
    o, lse = attend(q, k, v, 1.0)
    torch.testing.assert_close(o, torch.tensor([[[2.0, 2.0]]]))
    torch.testing.assert_close(lse, torch.log(torch.tensor([[3.0]])))
    o1, l1 = attend(q, k[:, :1], v[:, :1], 1.0)
    o2, l2 = attend(q, k[:, 1:], v[:, 1:], 1.0)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), o)
    # A query with no key to attend contributes nothing to the merge.
    o0, l0 = attend(q, k, v, 1.0, torch.tensor([False, False]))
    assert torch.isneginf(l0).all() and (o0 == 0).all()
    torch.testing.assert_close(merge_attention(o0, l0, o, lse), o)


def test_sliding_window_attention_falls_back_to_the_expanded_cache():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                             max_position_embeddings=64, bos_token_id=None, eos_token_id=None)).eval()
    ids, mask = prompts()
    with torch.no_grad():
        with pytest.raises(UnsupportedModel, match="sliding_window"):
            prefill(model, ids, mask, 2, 4, cache="shared_prefix")
        assert isinstance(prefill(model, ids, mask, 2, 4, cache="auto"), ExpandedCacheState)
    with pytest.raises(ValueError, match="cache must be one of"):
        prefill(model, ids, mask, 2, 4, cache="paged")


class ScaledLogits(GPT2LMHeadModel):
    """A model whose logits are not its head's output (like final soft-capping or a logit scale)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_logits_after_the_head_are_respected():
    torch.manual_seed(0)
    model = ScaledLogits(GPT2Config(vocab_size=V, n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                    bos_token_id=None, eos_token_id=None)).eval()
    ids, mask = prompts()
    tok = torch.randint(1, V, (6,))
    with torch.no_grad():
        shared, expanded = prefill(model, ids, mask, 2, 2, cache="shared_prefix"), prefill(model, ids, mask, 2, 2, cache="expanded")
        assert shared.head is None  # the prefill saw logits != head(hidden): decode calls the whole model
        shared.step(tok)
        expanded.step(tok)
        torch.testing.assert_close(shared.logits, expanded.logits, atol=1e-5, rtol=0)
    assert prefill(gpt2(), ids, mask, 2, 2).head is not None


def test_head_logits_equal_the_linear_layer():
    head = torch.nn.Linear(16, 1000, bias=True)
    h = torch.randn(5, 16)
    torch.testing.assert_close(head_logits(head, h, vocab_chunk=128), head(h), atol=1e-5, rtol=1e-5)


def test_cache_holds_the_prompt_once():
    model, (ids, mask) = gpt2(), prompts()
    n, T = 8, 5
    with torch.no_grad():
        shared = prefill(model, ids, mask, n, T)
        expanded = prefill(model, ids, mask, n, T, cache="expanded")
        for _ in range(T):
            tok = torch.ones(3 * n, dtype=torch.long)
            shared.step(tok)
            expanded.step(tok)
    P, L, layers, width = 3, 9, 2, 32
    per_token = layers * 2 * width * 4  # keys and values, float32
    assert shared.cache_bytes() == (P * L + P * n * T) * per_token
    assert expanded.cache_bytes() == P * n * (L + T) * per_token


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama-gqa"])
def test_sampler_log_probs_survive_dropped_rows(make):
    """Sample, drop half the rows of every prompt after 3 tokens, finish: each kept row's recorded
    log-prob equals a full forward over its tokens, so the cache stayed aligned with its rows."""
    model, (ids, mask) = make(), prompts()
    n = 4
    with torch.no_grad():
        s = NSampler(model, ids, mask, n, 7, temperature=0.7, generator=torch.Generator().manual_seed(3))
        s.run(until=3)
        s.keep(torch.tensor([p * n + j for p in range(3) for j in (0, 2)]))
        samples = s.run().samples()
        assert samples.n == 2 and samples.tokens.shape == (6, 7)
        expected = continuation_logprobs(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0),
                                         samples.tokens, samples.mask, temperature=0.7)
    torch.testing.assert_close(samples.logprobs, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="same number of rows"):
        s.keep(torch.tensor([0, 1, 2]))


def test_fused_gelu_is_the_same_function():
    from align.engine.models import fuse_gelu

    model, (ids, mask) = gpt2(), prompts()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert fuse_gelu(model) == 2 and fuse_gelu(model) == 0  # one per layer; idempotent
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-5, rtol=1e-5)
