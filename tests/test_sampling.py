"""The shared-prefill sampler: same draws as the repeated-prompt path, exact sequence distribution."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from align.engine.sampling import sample_n, sample_n_repeated
from align.math.draw import draw_tokens

V = 6  # tiny vocabulary so the distribution over 2-token completions (36 outcomes) is enumerable


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_layer=2, n_embd=16, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # sharpen the random logits so the distribution is far from uniform
        m.lm_head.weight.mul_(8.0)
    return m


def left_padded():
    ids = torch.tensor([[0, 0, 3, 1, 4], [2, 5, 1, 3, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


def exact_two_token_probs(model, prompt_ids):
    """P(y1, y2 | x) for all V^2 completions by full forward passes, no cache."""
    with torch.no_grad():
        x = torch.tensor([prompt_ids])
        p1 = model(input_ids=x).logits[0, -1].softmax(-1)
        probs = torch.zeros(V, V, dtype=torch.float64)
        for a in range(V):
            p2 = model(input_ids=torch.cat([x, torch.tensor([[a]])], 1)).logits[0, -1].softmax(-1)
            probs[a] = (p1[a] * p2).double()
    return probs


def test_shared_prefill_matches_repeated_prompts(model):
    ids, mask = left_padded()
    kw = dict(max_new_tokens=10, generator=None)
    a = sample_n(model, ids, mask, 4, **{**kw, "generator": torch.Generator().manual_seed(7)})
    b = sample_n_repeated(model, ids, mask, 4, **{**kw, "generator": torch.Generator().manual_seed(7)})
    assert a.tokens.shape == (8, 10)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_logprobs_equal_full_forward(model):
    ids, mask = left_padded()
    s = sample_n(model, ids, mask, 3, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    full = torch.cat([ids.repeat_interleave(3, 0), s.tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(3, 0), s.mask.long()], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logp = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.log_softmax(-1)
    per_token = logp[:, ids.shape[1] - 1 : -1].gather(-1, s.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(per_token.sum(-1), s.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("row", [0, 1])  # row 0 is left-padded
def test_sequence_distribution_is_exact(model, row):
    ids, mask = left_padded()
    prompt = ids[row][mask[row].bool()].tolist()
    exact = exact_two_token_probs(model, prompt).flatten()
    draws = 40_000
    s = sample_n(model, ids, mask, draws, max_new_tokens=2, generator=torch.Generator().manual_seed(3))
    toks = s.tokens[row * draws : (row + 1) * draws]
    counts = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).double()
    # Pearson chi-square over cells with expected count >= 5; df = cells - 1.
    expected = exact * draws
    keep = expected >= 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), (chi2, df)
    assert counts[~keep].sum() <= expected[~keep].sum() + 5 * math.sqrt(expected[~keep].sum() + 1)


def test_temperature_scales_logits(model):
    ids, mask = left_padded()
    with torch.no_grad():
        logits = model(input_ids=ids[1:]).logits[0, -1]
    draws = 30_000
    s = sample_n(model, ids[1:], mask[1:], draws, max_new_tokens=1, temperature=2.0, generator=torch.Generator().manual_seed(5))
    freq = torch.bincount(s.tokens[:, 0], minlength=V).double() / draws
    torch.testing.assert_close(freq, (logits / 2.0).softmax(-1).double(), atol=0.01, rtol=0)


def test_min_new_tokens_and_eos(model):
    ids, mask = left_padded()
    eos = int(model(input_ids=ids[1:]).logits[0, -1].argmax())  # make the likeliest token the eos
    s = sample_n(model, ids, mask, 50, max_new_tokens=8, min_new_tokens=3, eos_token_id=eos, pad_token_id=99,
                 generator=torch.Generator().manual_seed(0))
    assert not (s.tokens[:, :3] == eos).any()
    for row, m in zip(s.tokens, s.mask):
        hits = (row == eos).nonzero()
        if len(hits):  # everything after the first eos is padding and masked out
            first = int(hits[0])
            assert m[: first + 1].all() and not m[first + 1 :].any() and (row[first + 1 :] == 99).all()
        else:
            assert m.all()
    assert (s.lengths < 8).any(), "the likeliest token as eos should stop some rows early"


@pytest.mark.parametrize("block", [1, 3, 4, 256])
def test_draw_tokens_frequencies_and_log_probs(block):
    """Two-level inverse CDF: frequencies match softmax (V = 7 is not a multiple of the block), a
    zero-probability token (blocked EOS, and the block padding) is never drawn, log-probs are exact."""
    p = torch.tensor([0.1, 0.0, 0.25, 0.3, 0.05, 0.0, 0.3])
    logits = p.log().repeat(40_000, 1)  # log 0 = -inf: probability 0
    logits[:, 4] = 3.0  # EOS, blocked below
    tok, logp = draw_tokens(logits, eos_token_id=4, eos_blocked=True, generator=torch.Generator().manual_seed(0),
                            chunk_rows=7_000, block=block)
    expected = p.clone()
    expected[4] = 0.0
    expected /= expected.sum()
    freq = torch.bincount(tok, minlength=7).double() / len(tok)
    torch.testing.assert_close(freq, expected.double(), atol=0.01, rtol=0)
    assert not torch.isin(tok, torch.tensor([1, 4, 5])).any()
    torch.testing.assert_close(logp, expected.log()[tok])
    # The same uniforms give the same tokens whatever the chunking and the block size.
    again, _ = draw_tokens(logits, eos_token_id=4, eos_blocked=True, generator=torch.Generator().manual_seed(0), block=2)
    assert torch.equal(tok, again)


def test_bad_arguments(model):
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="temperature"):
        sample_n(model, ids, mask, 2, max_new_tokens=3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_n(model, ids, mask, 2, max_new_tokens=3, top_p=0.0)


def test_nucleus_and_greedy_distributions_in_closed_form():
    """top_p keeps the smallest prefix of the tokens ranked by probability whose mass reaches top_p,
    renormalised; temperature 0 is the point mass on the argmax (ties to the lowest id). Draws follow
    those distributions and their log-probs are exactly theirs."""
    from align.math.draw import nucleus, process_logits

    p = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = p.log()
    for top_p, kept in [(0.5, [1, 3]), (0.75, [1, 2, 3]), (0.95, [0, 1, 2, 3]), (1e-9, [1])]:
        want = torch.zeros(4)
        want[kept] = p[kept] / p[kept].sum()
        torch.testing.assert_close(nucleus(logits, top_p).softmax(-1), want)
        tok, logp = draw_tokens(logits.repeat(20_000, 1), top_p=top_p, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(torch.bincount(tok, minlength=4).double() / len(tok), want.double(), atol=0.015, rtol=0)
        torch.testing.assert_close(logp, want.log()[tok])
    assert process_logits(logits, top_p=1.0) is logits  # top_p 1 samples the whole distribution
    point = process_logits(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), temperature=0)
    assert point.tolist() == [[float("-inf"), 0.0, float("-inf"), float("-inf")]]
    blocked = process_logits(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), temperature=0, eos_token_id=1, eos_blocked=True)
    assert blocked.argmax().item() == 2
    tok, logp = draw_tokens(torch.tensor([[1.0, 3.0, 3.0, 2.0]] * 50), temperature=0, generator=torch.Generator().manual_seed(0))
    assert tok.tolist() == [1] * 50 and logp.tolist() == [0.0] * 50


def test_greedy_and_a_tiny_nucleus_are_the_argmax_continuation(model):
    """temperature 0 and top_p -> 0 both decode the argmax at every step (a full forward per step
    here, no cache), with log-prob 0; the top-k log-probs kept are each step's distribution's."""
    from align.engine.sampling import NSampler

    ids, mask = left_padded()
    want = ids[1:].clone()
    with torch.no_grad():
        for _ in range(5):
            want = torch.cat([want, model(input_ids=want).logits[:, -1].argmax(-1, keepdim=True)], 1)
    greedy = sample_n(model, ids[1:], mask[1:], 2, max_new_tokens=5, temperature=0.0)
    tiny = sample_n(model, ids[1:], mask[1:], 2, max_new_tokens=5, top_p=1e-9, generator=torch.Generator().manual_seed(4))
    for s in (greedy, tiny):
        assert s.tokens.tolist() == [want[0, 5:].tolist()] * 2 and s.logprobs.tolist() == [0.0, 0.0]
    with torch.no_grad():
        s = NSampler(model, ids[1:], mask[1:], 3, 1, temperature=2.0, top_logprobs=2,
                     generator=torch.Generator().manual_seed(0)).run().samples()
        top = (model(input_ids=ids[1:]).logits[0, -1] / 2.0).log_softmax(-1).topk(2)
    assert s.top_ids[:, 0].tolist() == [top.indices.tolist()] * 3
    torch.testing.assert_close(s.top_logprobs[:, 0], top.values.expand(3, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.token_logprobs[:, 0], s.logprobs)
