"""actors/scorer.py: every scorer returns a mean and a variance per sample; the ensemble's members are
the single reward models' own scores; the combined scorer is the LSC sum of its parts; the ScorerPool
gives the in-process numbers, in order; bad scorer configs are named errors before any actor starts."""
import json

import pytest
import torch
from torch.testing import assert_close

from align.engine.samples import PromptSamples
from actors.scorer import ScorerPool, make_scorer
from align.rewards.base import RewardScores
from align.rewards.combined import CombinedScorer
from align.rewards.ensemble import EnsembleScorer
from align.runtime.config import ConfigError, load_config
from align.rewards.classifier import SequenceClassifierReward

PROMPTS = ["the movie was", "the movie was", "the movie was", "a bad", "a bad"]
COMPLETIONS = ["great and wonderful .", "awful .", "fine , the music is lovely and the cast is weak .",
               "ending .", "film with a good ending and the acting was great ."]


def test_reward_scorer_is_a_point_estimate():
    scores = make_scorer({"kind": "vader"}).score(PROMPTS, COMPLETIONS)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    assert scores.mean.tolist() == [analyzer.polarity_scores(c)["compound"] for c in COMPLETIONS]
    assert scores.var.tolist() == [0.0] * 5 and scores.members is None


def test_brevity_reward_counts_words():
    # max_words 4, words split on spaces ("." counts): "awful ." has 2 -> +2; the third has 12 -> -8.
    scores = make_scorer({"kind": "brevity", "max_words": 4}).score(PROMPTS, COMPLETIONS)
    assert scores.mean.tolist() == [4 - 4, 4 - 2, 4 - 12, 4 - 2, 4 - 11]


def test_ensemble_members_are_the_single_models(tiny_ensemble_dir):
    members = [tiny_ensemble_dir / f"member_{i}" / "model" for i in range(3)]
    scores = make_scorer({"kind": "ensemble", "path": str(tiny_ensemble_dir), "device": "cpu"}).score(PROMPTS, COMPLETIONS)
    single = torch.stack([SequenceClassifierReward(str(m), device="cpu")(PROMPTS, COMPLETIONS) for m in members])
    assert_close(scores.members, single, rtol=0, atol=1e-12)
    assert_close(scores.mean, single.mean(0), rtol=0, atol=1e-12)
    # Population variance by hand: mean of squared deviations over the 3 members.
    assert_close(scores.var, ((single - single.mean(0)) ** 2).mean(0), rtol=0, atol=1e-12)
    assert not torch.equal(single[0], single[1]) and torch.equal(single[0], single[2])


def test_ensemble_of_identical_members_equals_one_member(tiny_ensemble_dir):
    one = tiny_ensemble_dir / "member_0" / "model"
    scores = EnsembleScorer([str(one), str(one)], device="cpu").score(PROMPTS, COMPLETIONS)
    assert_close(scores.mean, SequenceClassifierReward(str(one), device="cpu")(PROMPTS, COMPLETIONS), rtol=0, atol=1e-12)
    assert scores.var.abs().max().item() == 0.0


def test_combined_scorer_is_the_lsc_sum_per_prompt():
    scorer = CombinedScorer([make_scorer({"kind": "vader"}), make_scorer({"kind": "brevity", "max_words": 6})], "sum_of_lsc", 0.5)
    got = scorer.score(PROMPTS, COMPLETIONS)
    parts = torch.stack([make_scorer({"kind": "vader"}).score(PROMPTS, COMPLETIONS).mean,
                         make_scorer({"kind": "brevity", "max_words": 6}).score(PROMPTS, COMPLETIONS).mean])
    expected = torch.empty(5, dtype=torch.float64)
    for rows in ([0, 1, 2], [3, 4]):  # the reference is the median of each prompt's own samples
        ref = parts[:, rows].median(dim=1).values if len(rows) % 2 else parts[:, rows].mean(dim=1)
        expected[rows] = torch.nn.functional.logsigmoid(parts[:, rows] - ref[:, None]).sum(0)
    assert_close(got.mean, expected, rtol=0, atol=1e-12)
    assert (got.mean <= 0).all() and torch.equal(got.members, parts)
    raw = CombinedScorer(scorer.scorers, "sum_raw").score(PROMPTS, COMPLETIONS)
    assert_close(raw.mean, parts.sum(0), rtol=0, atol=0)


def test_score_samples_fills_variance_and_members(tiny_ensemble_dir):
    samples = [PromptSamples("the movie was", [1, 2], ["great .", "awful ."], [[3], [4]], [-1.0, -2.0]),
               PromptSamples("a bad", [5], ["ending ."], [[6]], [-0.5])]
    scorer = make_scorer({"kind": "ensemble", "path": str(tiny_ensemble_dir), "device": "cpu"})
    flat = scorer.score(["the movie was", "the movie was", "a bad"], ["great .", "awful .", "ending ."])
    scorer.score_samples(samples)
    assert samples[0].rewards + samples[1].rewards == flat.mean.tolist()
    assert samples[0].reward_var + samples[1].reward_var == flat.var.tolist()
    assert samples[1].reward_members == [flat.members[:, 2].tolist()]


def test_scorer_spec_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'reward.kind': expected one of arithmetic \| brevity \| classifier \| combined \| ensemble \| laplace \| vader"):
        make_scorer({"kind": "bleu"})
    with pytest.raises(FileNotFoundError, match="ensemble.json is missing"):
        make_scorer({"kind": "ensemble", "path": str(tmp_path)})
    with pytest.raises(ValueError, match="k >= 1"):
        EnsembleScorer([])
    with pytest.raises(ValueError, match="combine must be"):
        CombinedScorer([], "product")


@pytest.mark.parametrize("kind, need", [("ensemble", "ensemble.json"), ("laplace", "laplace_reward.json")])
def test_bon_config_names_a_missing_ensemble_or_posterior(tmp_path, kind, need):
    from jobs.bon import BonConfig

    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", [f"reward.kind={kind}", f"reward.path={tmp_path}"])
    assert err.value.field == "reward.path" and f"has no {need}" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", [f"reward.kind={kind}", f"reward.path={tmp_path / 'nothing'}"])
    assert "does not exist" in str(err.value)


@pytest.mark.ray
def test_scorer_pool_matches_in_process_in_order(ray_session, tiny_ensemble_dir):
    prompts, completions = PROMPTS * 7, COMPLETIONS * 7  # 35 rows in batches of 4 over 2 actors
    spec = {"kind": "ensemble", "path": str(tiny_ensemble_dir), "device": "cpu"}
    pool = ScorerPool(spec, num_actors=2)
    try:
        got = pool.score(prompts, completions, batch_size=4)
    finally:
        pool.shutdown()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each scorer actor (num_cpus 0 -> one thread): the same kernels, bit for bit
    try:  # the same batches of 4 as the pool (padding to another length moves the last bits)
        scorer = make_scorer(spec)
        want = RewardScores.cat([scorer.score(prompts[i : i + 4], completions[i : i + 4]) for i in range(0, len(prompts), 4)])
    finally:
        torch.set_num_threads(threads)
    assert_close(got.mean, want.mean, rtol=0, atol=1e-12)
    assert_close(got.var, want.var, rtol=0, atol=1e-12)
    assert_close(got.members, want.members, rtol=0, atol=1e-12)


@pytest.mark.ray
def test_bon_job_with_ensemble_penalty_and_rbon(ray_session, tiny_lm_dir, tiny_ensemble_dir, tmp_path):
    """jobs.bon picks by the configured remedy: worst-case ensemble, RBoN-KL at beta 0 (= argmax) and
    large beta (= the most likely sample), RBoN-WD (its recorded mean cost is the embeddings' own)."""
    from jobs.bon import BonConfig, run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "a good film", "the plot"]))

    def bon(name, *extra):
        run(load_config(BonConfig, "configs/bon.yaml", [
            f"model.path={tiny_lm_dir}", f"prompts.source={prompts}", "prompts.repeats=1", "sampling.n=4",
            "sampling.max_new_tokens=6", "sampling.min_new_tokens=6", "pool.num_actors=1", "reward.kind=ensemble",
            f"reward.path={tiny_ensemble_dir}", "reward.device=cpu", f"output_dir={tmp_path / name}", *extra]))
        return [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]

    worst = bon("worst", "penalty.kind=ensemble", "penalty.ensemble_mode=worst")
    for r in worst:
        members = torch.tensor(r["reward_members"], dtype=torch.float64)  # (n, k)
        assert r["ranking"] == members.min(1).values.tolist()
        assert r["chosen"] == int(members.min(1).values.argmax())
        assert_close(torch.tensor(r["rewards"], dtype=torch.float64), members.mean(1), rtol=0, atol=1e-12)
    kl0 = bon("kl0", "selection=rbon_kl", "rbon.beta=0")
    assert [r["chosen"] for r in kl0] == [int(torch.tensor(r["rewards"], dtype=torch.float64).argmax()) for r in kl0]
    assert [r["completions"] for r in kl0] == [r["completions"] for r in worst], "same seeds, same samples"
    kl_big = bon("kl_big", "selection=rbon_kl", "rbon.beta=1e6")
    assert [r["chosen"] for r in kl_big] == [int(torch.tensor(r["logprobs"], dtype=torch.float64).argmax()) for r in kl_big]
    lsc = bon("lsc", "reward.kind=combined", "reward.path=null", "reward.params.components=[{kind: vader}, {kind: brevity, max_words: 3}]")
    for r in lsc:  # members: (vader, brevity) of each candidate; the rewards their LSC sum against the medians
        parts = torch.tensor(r["reward_members"], dtype=torch.float64).T  # (2, n)
        assert all(v <= 0 for v in r["rewards"]) and r["chosen"] == int(torch.tensor(r["rewards"]).argmax())
        assert parts[1].tolist() == [3.0 - len(c.split()) for c in r["completions"]]
    wd = bon("wd", "selection=rbon_wd", "rbon.beta=0.5")
    from align.engine.embeddings import SentenceEmbedder

    embedder = SentenceEmbedder("minilm")
    for r in wd:
        e = embedder.embed(r["completions"]).double()
        cost = 1 - e @ e.T  # unit-norm embeddings: cosine similarity is the dot product
        assert_close(torch.tensor(r["mean_cost"], dtype=torch.float64), cost.mean(1), rtol=0, atol=1e-5)
        score = torch.tensor(r["rewards"], dtype=torch.float64) - 0.5 * cost.mean(1)
        assert r["chosen"] == int(score.argmax())
