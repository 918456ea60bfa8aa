"""Batching requests (serve/batching.py, align.engine.sampling.NSampler's per-prompt streams): a request's
samples and rewards are the same whether it runs alone or batched with others, and a request that
fails its batch's call fails alone (the others are run again alone and get what they get alone)."""
from types import SimpleNamespace

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
    """fn raising for a lone item fails that caller and nothing else; a wrong number of results is an
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


class WordTokenizer:
    """A tokenizer of whole words (id i < 6 is WORDS[i], 0 being end-of-sequence, decoded as nothing
    without special tokens; a larger id is "w<id>")."""

    WORDS = ["<eos>", "good", " film", ".", " bad", " end"]
    eos_token_id = 0

    def word(self, i: int) -> str:
        return self.WORDS[i] if i < len(self.WORDS) else f"w{i}"

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["".join(self.word(i) for i in row if not (skip_special_tokens and i == 0)) for row in rows]


class FakeGenerator:
    """Generator.sample's interface without a model: each prompt's completions are a function of the
    prompt, its seed, its budget and n alone; a batch holding the prompt "poison" raises, as the
    sampler does for a seed it cannot take."""

    tokenizer = WordTokenizer()
    encoder = SimpleNamespace(stop_ids=(0,))  # Generator.encoder's end ids: <eos>

    def __init__(self):
        self.calls = []

    def sample(self, prompts, n, max_new_tokens, temperature=1.0, min_new_tokens=0, seeds=None, lam=None, **options):
        from align.engine.samples import PromptSamples

        self.calls.append(list(prompts))
        if "poison" in prompts:
            raise ValueError("expected non-negative integer")
        samples = [PromptSamples(p, [1], [f"{p}|{s}|{m}|{i}" for i in range(n)], [[2] * m] * n, [-1.0 * m] * n, "fake",
                                 drawn_tokens=n * m) for p, s, m in zip(prompts, seeds, max_new_tokens)]
        return {"samples": samples, "seconds": 0.0, "new_tokens": sum(s.drawn_tokens for s in samples),
                "token_logprobs": [[[-1.0] * m] * n for m in max_new_tokens]}


def test_a_call_that_fails_its_batch_is_retried_alone_and_fails_alone():
    """Three calls in one group, the middle one's prompts make the sampler raise: the batched call
    fails, each call runs again alone; the bad one gets the error, the others exactly their answers
    alone. A call that fails alone is not run again; a group that succeeds is not retried."""
    import collections

    from serve.batching import SampleCall, sample_together

    calls = [SampleCall(("the movie was", "a good film"), 2, 4, seed=1), SampleCall(("the plot", "poison"), 2, 5, seed=2),
             SampleCall(("a bad",), 2, 6, seed=3), SampleCall(("other n",), 3, 4, seed=4)]
    gen, counts = FakeGenerator(), collections.Counter()
    results = sample_together(gen, calls, counts)
    assert gen.calls == [["the movie was", "a good film", "the plot", "poison", "a bad"],
                         ["the movie was", "a good film"], ["the plot", "poison"], ["a bad"], ["other n"]]
    assert counts == {"sampler_calls": 5, "retried_alone": 3}
    assert isinstance(results[1], ValueError) and "non-negative" in str(results[1])
    for i in (0, 2, 3):
        (want,) = sample_together(FakeGenerator(), [calls[i]])
        assert [s.completions for s in results[i]["samples"]] == [s.completions for s in want["samples"]]
        assert results[i]["new_tokens"] == want["new_tokens"] and results[i]["batched_requests"] == 1
    assert [s.prompt for s in results[0]["samples"]] == ["the movie was", "a good film"]

    alone = sample_together(FakeGenerator(), [calls[1]], counts)  # alone already: one call, not retried
    assert isinstance(alone[0], ValueError) and counts == {"sampler_calls": 6, "retried_alone": 3}


def test_a_bad_seed_inside_a_real_batch_fails_only_its_own_call(generators):
    """With the real Generator: a call whose seed the RNG refuses (it skipped check_call) beside two
    valid ones. The valid ones get exactly their samples alone; the bad one gets the RNG's error."""
    from serve.batching import SampleCall, sample_together

    plain, _ = generators
    calls = [SampleCall(("the movie was",), 2, 5, seed=1), SampleCall(("the plot",), 2, 5, seed=-1),
             SampleCall(("a good film", "the plot"), 2, 6, seed=2)]
    results = sample_together(plain, calls)
    assert isinstance(results[1], ValueError) and "non-negative" in str(results[1])
    for i in (0, 2):
        want = alone(plain, calls[i])
        assert [s.completion_ids for s in results[i]["samples"]] == [s.completion_ids for s in want]
        for got, ref in zip(results[i]["samples"], want):
            assert got.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_continuous_batcher_retries_a_failed_batch_one_item_at_a_time():
    """fn raises for any batch holding "poison": that batch's items are run again alone, in order;
    the poison's caller gets the error, every other caller its own result; a caller cancelled
    before the retry is not run again."""
    import asyncio

    from serve.batching import ContinuousBatcher

    async def main():
        calls, gate = [], asyncio.Event()

        async def fn(items):
            calls.append(list(items))
            await gate.wait()
            if "poison" in items:
                raise ValueError("poison")
            return [x.upper() for x in items]

        batcher = ContinuousBatcher(fn, max_size=8, wait_s=0.02)
        tasks = [asyncio.create_task(batcher(x)) for x in ["a", "poison", "b", "gone", "c"]]
        while not calls:  # the batch of five has started
            await asyncio.sleep(0.001)
        tasks[3].cancel()
        gate.set()
        answers = await asyncio.gather(*tasks, return_exceptions=True)
        return calls, answers, batcher

    calls, answers, batcher = asyncio.run(main())
    assert calls == [["a", "poison", "b", "gone", "c"], ["a"], ["poison"], ["b"], ["c"]]
    assert answers[0] == "A" and answers[2] == "B" and answers[4] == "C"
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "poison"
    assert batcher.retried == 4 and batcher.batches == [5]


def test_the_batched_scorer_scores_the_others_when_one_requests_samples_fail():
    """BatchedScorer: a scorer that raises on one request's samples fails that request alone; the
    requests batched with it are scored alone and get their own rewards."""
    import asyncio

    from align.engine.samples import PromptSamples
    from serve.batching import BatchedScorer

    class Scorer:
        def __init__(self):
            self.calls = []

        def score_samples(self, samples):
            self.calls.append([s.prompt for s in samples])
            if any(s.prompt == "poison" for s in samples):
                raise RuntimeError("cannot score poison")
            return [f"scored {s.prompt}" for s in samples]

    def request(prompt):
        return [PromptSamples(prompt, [1], ["x"], [[2]], [0.0], "fake")]

    async def main():
        scorer = BatchedScorer({"kind": "vader"}, max_size=8, wait_s=0.02)
        scorer.scorer = Scorer()
        answers = await asyncio.gather(*(scorer(request(p)) for p in ["a", "poison", "b"]), return_exceptions=True)
        return scorer.scorer.calls, answers

    calls, answers = asyncio.run(main())
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert answers[0] == ["scored a"] and answers[2] == ["scored b"] and isinstance(answers[1], RuntimeError)


@pytest.mark.parametrize("change, field", [
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": True}, "seed"), ({"seed": 1.5}, "seed"),
    ({"temperature": 0.005}, "temperature"), ({"temperature": 1e-300}, "temperature"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": 2.01}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"lam": 1e308}, "lambda"), ({"lam": -0.5}, "lambda"), ({"lam": float("nan")}, "lambda"),
    ({"n": 0}, "n"), ({"n": True}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": 9}, "min_tokens"),
    ({"prompts": ()}, "prompt"), ({"prompts": ("a", " ")}, "prompt"), ({"prompts": ("a", "b\ud800")}, "prompt"),
])
def test_check_call_names_the_field_the_sampler_cannot_take(change, field):
    import dataclasses

    from serve.batching import InvalidCall, SampleCall, check_call

    good = SampleCall(("the plot",), n=2, max_tokens=8, temperature=1.0, min_tokens=2, seed=3, lam=0.5)
    check_call(good)
    with pytest.raises(InvalidCall, match=rf"^{field}: expected "):
        check_call(dataclasses.replace(good, **change))


def test_check_call_takes_greedy_nucleus_stop_and_logprobs_in_their_ranges_only():
    import dataclasses

    from serve.batching import InvalidCall, SampleCall, check_call

    good = SampleCall(("the plot",), n=1, max_tokens=8, temperature=0.0, top_p=0.5, stop=(".", "\n"), logprobs=5, echo=True)
    check_call(good)
    for change, field in [({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"),
                          ({"logprobs": 6}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
                          ({"stop": ("x" * 65,)}, "stop"), ({"stop": ("a",) * 5}, "stop"), ({"stop": ("\ud800",)}, "stop"),
                          ({"echo": 1}, "echo")]:
        with pytest.raises(InvalidCall, match=rf"^{field}: expected "):
            check_call(dataclasses.replace(good, **change))


def test_the_ranges_hold_in_the_real_sampler(generators):
    """At the edges of the allowed ranges the sampler answers with finite log-probs (DeRa at lambda
    100 and temperature 0.01 or 2, the largest seed: its derived per-prompt seeds stay valid torch
    seeds); just outside them it fails, which is why the edges are where they are."""
    import math

    from actors.generator import prompt_seeds
    from serve.batching import LAMBDA_MAX, SEED_MAX, TEMPERATURE_MAX, TEMPERATURE_MIN, SampleCall, check_call

    _, dera = generators
    for seed in (0, SEED_MAX):
        for s in prompt_seeds(seed, 8):
            assert 0 <= s < 2**63
            torch.Generator().manual_seed(s)
    for temperature in (TEMPERATURE_MIN, TEMPERATURE_MAX):
        for lam in (None, 0.0, LAMBDA_MAX):
            call = SampleCall(("the movie was", "a bad film"), 3, 8, temperature=temperature, seed=SEED_MAX, lam=lam)
            check_call(call)
            for s in alone(dera, call):
                assert all(math.isfinite(x) for x in s.logprobs + (s.ref_logprobs or [])), (temperature, lam, s.logprobs)
    with pytest.raises(ValueError, match="non-negative"):
        alone(dera, SampleCall(("the plot",), 2, 4, seed=-1))
    with pytest.raises(ValueError, match="lambda"):
        alone(dera, SampleCall(("the plot",), 2, 4, lam=1e308))
    tiny = alone(dera, SampleCall(("the plot",), 2, 4, temperature=1e-300))[0]
    assert not all(math.isfinite(x) for x in tiny.logprobs)


def test_the_generator_deployment_refuses_a_bad_call_before_it_joins_a_batch(tiny_lm_dir):
    """GeneratorDeployment (without Serve): a call with seed -1 sent with three valid ones is refused
    by check_call before it joins; the three valid ones run in one batch and answer as alone."""
    import asyncio

    from serve.app import GeneratorDeployment
    from serve.batching import InvalidCall, SampleCall

    deployment = GeneratorDeployment(str(tiny_lm_dir), device="cpu", batching={"batch_wait_timeout_s": 0.05})
    calls = [SampleCall(("the movie was",), 2, 5, seed=1), SampleCall(("the plot",), 2, 5, seed=-1),
             SampleCall(("a good film",), 2, 6, seed=2), SampleCall(("the plot",), 2, 4, seed=3)]

    async def main():
        return await asyncio.gather(*(deployment.sample(c) for c in calls), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], InvalidCall) and str(results[1]).startswith("seed: expected")
    assert deployment.batcher.batches == [3] and deployment.stats() == {"requests": 3, "sampler_calls": 1, "retried_alone": 0}
    for i in (0, 2, 3):
        want = alone(deployment.generator, calls[i])
        assert [s.completion_ids for s in results[i]["samples"]] == [s.completion_ids for s in want]


def test_stop_cuts_before_scoring_and_keeps_the_tokens_the_text_covers():
    """Generator.cut_at_stop and finish_call on known tokens: each completion is cut at its first stop
    sequence; it keeps the drawn tokens its text covers (a stop beginning inside " bad" keeps that
    token, its text cut to " b"), its log-prob is theirs, its finish_reason "stop"; token texts add up
    to the text, and the alternatives (logprobs 1) hold the likeliest token and the drawn one."""
    from actors.generator import Generator
    from align.engine.samples import PromptSamples
    from align.engine.chat import PromptEncoder
    from serve.batching import SampleCall, finish_call

    tok = WordTokenizer()
    generator = Generator.__new__(Generator)  # no model: only its tokenizer and end ids are used
    generator.tokenizer, generator.encoder = tok, PromptEncoder(tok, (tok.eos_token_id,))
    ids = [[1, 2, 3, 4, 5, 0], [4, 5], [1, 2, 0]]
    lps = [[-0.5, -1.0, -0.25, -2.0, -0.125, -0.0625], [-1.0, -3.0], [-1.0, -2.0, -4.0]]
    top = [[[(9 - t, lp + 0.5), (t, lp)] for t, lp in zip(row, row_lps)] for row, row_lps in zip(ids, lps)]
    full = tok.batch_decode(ids, skip_special_tokens=True)
    for stop, texts, kept in [(("ad",), ["good film. b", " b", "good film"], [4, 1, 3]),
                              ((".", " e"), ["good film", " bad", "good film"], [2, 1, 3]),
                              (("good",), ["", " bad end", ""], [0, 2, 0])]:
        s = PromptSamples("p", [1], list(full), [list(r) for r in ids], [sum(r) for r in lps])
        out = finish_call(generator, SampleCall(("p",), 3, 6, stop=stop, logprobs=1), [s], [lps], [top])
        assert s.completions == texts and s.completion_ids == [row[:k] for row, k in zip(ids, kept)], stop
        assert s.logprobs == [sum(row[:k]) for row, k in zip(lps, kept)]
        assert out["finish"] == [["stop" if text != f or row[-1] == 0 else "length" for text, f, row in zip(texts, full, ids)]]
        for text, tokens, row, row_lps, k in zip(texts, out["tokens"][0], ids, lps, kept):
            assert "".join(tokens["text"]) == text and len(tokens["text"]) == k and tokens["logprobs"] == row_lps[:k]
            assert tokens["top"] == [{tok.word(9 - t): lp + 0.5, tok.word(t): lp} for t, lp in zip(row[:k], row_lps)]
        assert out["prompt"] is None
    assert out["finish"] == [["stop", "length", "stop"]]
