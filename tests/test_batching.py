"""Batching requests (serve/batching.py, align.engine.sampling.NSampler's per-prompt streams): a request's
samples and rewards are the same whether it runs alone or batched with others."""
import pytest
import torch


@pytest.fixture(scope="module")
def generators(tiny_lm_dir, tmp_path_factory):
    from actors.generator import Generator
    from conftest import save_tiny_lm

    aligned = save_tiny_lm(tmp_path_factory.mktemp("batching_aligned"), seed=3)
    return Generator(str(tiny_lm_dir), device="cpu"), Generator(str(tiny_lm_dir), device="cpu", aligned_path=str(aligned))


def alone(generator, call):
    from actors.generator import prompt_seeds

    return generator.sample(list(call.prompts), call.n, call.max_tokens, temperature=call.temperature,
                            min_new_tokens=call.min_tokens, seeds=prompt_seeds(call.seed, len(call.prompts)),
                            lam=call.lam)["samples"]


@torch.no_grad()
def test_per_prompt_streams_and_budgets_match_each_prompt_alone(tiny_lm_dir):
    """Two prompts in one NSampler, each with its own generator and max_new_tokens, draw exactly what
    each draws alone; the shorter budget stops its rows there."""
    from align.engine.models import encode_prompts, load_causal_lm
    from align.engine.sampling import NSampler

    model, tok = load_causal_lm(str(tiny_lm_dir), device="cpu")
    ids, mask = encode_prompts(tok, ["the movie was", "a bad film with a plot"], "cpu")
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = NSampler(model, ids, mask, 3, [4, 9], generator=gens([11, 12]), eos_token_id=None).run().samples()
    assert both.lengths.tolist() == [4] * 3 + [9] * 3
    for p, (seed, budget) in enumerate([(11, 4), (12, 9)]):
        one = NSampler(model, ids[p : p + 1, mask[p].bool()], mask[p : p + 1, mask[p].bool()], 3, budget,
                       generator=gens([seed]), eos_token_id=None).run().samples()
        rows = slice(3 * p, 3 * p + 3)
        assert torch.equal(both.tokens[rows, :budget], one.tokens), p
        torch.testing.assert_close(both.logprobs[rows], one.logprobs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one entry per prompt"):
        NSampler(model, ids, mask, 2, [4], eos_token_id=None)


def test_sample_together_answers_each_call_as_alone(generators):
    from serve.batching import SampleCall, sample_together

    _, dera = generators
    calls = [SampleCall(("the movie was", "a good film"), n=3, max_tokens=5, seed=1),
             SampleCall(("the plot",), n=3, max_tokens=8, seed=2),
             SampleCall(("the movie was",), n=3, max_tokens=6, seed=3, lam=0.5),
             SampleCall(("the movie was",), n=2, max_tokens=6, seed=1)]  # another n: its own sampler call
    results = sample_together(dera, calls)
    assert [r["batched_requests"] for r in results] == [2, 2, 1, 1]
    for call, result in zip(calls, results):
        want = alone(dera, call)
        assert [s.completion_ids for s in result["samples"]] == [s.completion_ids for s in want]
        assert [s.prompt for s in result["samples"]] == list(call.prompts)
        for got, ref in zip(result["samples"], want):
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert result["new_tokens"] == sum(s.drawn_tokens for s in want)
    assert results[2]["samples"][0].ref_logprobs is not None and results[0]["samples"][0].ref_logprobs is None


def test_a_failing_group_fails_only_its_own_calls(generators):
    from serve.batching import SampleCall, sample_together

    plain, _ = generators  # no aligned model: the DeRa call's group fails
    results = sample_together(plain, [SampleCall(("the plot",), 2, 4, lam=0.5), SampleCall(("the plot",), 2, 4)])
    assert isinstance(results[0], ValueError) and "aligned" in str(results[0])
    assert len(results[1]["samples"][0].completions) == 2


def test_score_together_keeps_each_requests_reference(generators):
    """Two requests with the same prompt, scored in one call by the LSC-combined scorer: each keeps
    its own per-prompt reference (the quantile of its own samples), as when scored alone."""
    from actors.scorer import make_scorer
    from serve.batching import SampleCall, sample_together, score_together

    plain, _ = generators
    calls = [SampleCall(("the movie was",), 4, 6, seed=s) for s in (1, 2)]
    spec = {"kind": "combined", "components": [{"kind": "vader"}, {"kind": "brevity", "max_words": 3}]}
    scorer = make_scorer(spec)
    together = score_together(scorer, [r["samples"] for r in sample_together(plain, calls)])
    for call, scored in zip(calls, together):
        ref = scorer.score_samples(alone(plain, call))
        assert scored[0].rewards == pytest.approx(ref[0].rewards, abs=1e-12)
    assert together[0][0].rewards != together[1][0].rewards


class GatedCall:
    """fn for ContinuousBatcher: records each batch and holds it until its gate opens."""

    def __init__(self):
        self.batches, self.gates = [], []

    async def __call__(self, items):
        import asyncio

        gate = asyncio.Event()
        self.batches.append(list(items))
        self.gates.append(gate)
        await gate.wait()
        return [ValueError(f"bad {x}") if str(x).startswith("bad") else f"done {x}" for x in items]

    async def release(self, k: int):
        import asyncio

        while len(self.gates) <= k:  # the k-th batch has started
            await asyncio.sleep(0)
        self.gates[k].set()


def test_continuous_batcher_starts_an_idle_call_alone_and_batches_what_arrives_meanwhile():
    """The first call runs at once, alone; the five sent while it runs wait for it and then go in
    arrival order, split at max_size as counted by size (here each item's length; an item larger than
    max_size runs alone); each caller gets its own result or its own exception."""
    import asyncio

    from serve.batching import ContinuousBatcher

    async def main():
        fn = GatedCall()
        batcher = ContinuousBatcher(fn, max_size=4, size=len)
        first = asyncio.create_task(batcher("a"))
        await asyncio.sleep(0.01)
        assert fn.batches == [["a"]]  # started without waiting for company
        rest = [asyncio.create_task(batcher(x)) for x in ["b", "cc", "bad", "dddddd", "e"]]
        await asyncio.sleep(0.01)
        assert fn.batches == [["a"]]  # the others wait for the running batch
        for k in range(5):
            await fn.release(k)
        assert await first == "done a"
        return fn.batches, await asyncio.gather(*rest, return_exceptions=True), batcher.batches

    batches, answers, sizes = asyncio.run(main())
    assert batches == [["a"], ["b", "cc"], ["bad"], ["dddddd"], ["e"]] and sizes == [1, 2, 1, 1, 1]
    assert answers[:2] == ["done b", "done cc"] and isinstance(answers[2], ValueError) and str(answers[2]) == "bad bad"
    assert answers[3:] == ["done dddddd", "done e"]


def test_continuous_batcher_survives_a_failing_call_and_a_cancelled_caller():
    """fn raising fails every caller of that batch and nothing else; a wrong number of results is an
    error, not a hang; a caller cancelled while it waited is left out of the next batch; an idle
    batcher with wait_s gathers the calls that arrive within it into one batch."""
    import asyncio

    from serve.batching import ContinuousBatcher

    async def main():
        calls = []

        async def fn(items):
            calls.append(list(items))
            await asyncio.sleep(0.02)
            if "boom" in items:
                raise RuntimeError("boom")
            return items[:-1] if "short" in items else [x.upper() for x in items]

        batcher = ContinuousBatcher(fn, max_size=8)
        head = asyncio.create_task(batcher("boom"))
        await asyncio.sleep(0.005)
        gone, kept = asyncio.create_task(batcher("gone")), asyncio.create_task(batcher("kept"))
        await asyncio.sleep(0.005)
        gone.cancel()
        with pytest.raises(RuntimeError, match="boom"):
            await head
        assert await kept == "KEPT"
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await asyncio.gather(batcher("x"), batcher("short"))
        assert calls == [["boom"], ["kept"], ["x", "short"]]

        waiting = ContinuousBatcher(fn, max_size=8, wait_s=0.05)
        first = asyncio.create_task(waiting("p"))
        await asyncio.sleep(0.01)
        assert await asyncio.gather(first, waiting("q")) == ["P", "Q"] and waiting.batches == [2]

    asyncio.run(main())
    from serve.batching import ContinuousBatcher as CB

    with pytest.raises(ValueError, match="max_size: expected an integer >= 1, got 0"):
        CB(lambda items: items, max_size=0)
