"""jobs/bon end to end on a tiny model with a 2-actor pool, and its config errors."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from align.runtime.config import ConfigError, load_config
from jobs.bon import BonConfig, run


def prompt_file(tmp_path, prompts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


@pytest.mark.ray
def test_bon_job_end_to_end(ray_session, tiny_lm_dir, tmp_path):
    prompts = ["the movie was", "a good film", "the plot", "the music is", "the cast", "a bad"]
    cfg = load_config(BonConfig, "configs/bon.yaml", [
        f"model.path={tiny_lm_dir}", f"prompts.source={prompt_file(tmp_path, prompts)}", "prompts.column=text",
        "prompts.repeats=1", "sampling.n=4", "sampling.max_new_tokens=6", "sampling.min_new_tokens=6", "pool.num_actors=2",
        "pool.batch_size=2", f"output_dir={tmp_path / 'out'}", "judge.kind=brevity", "judge.params={max_words: 12}",
    ])
    metrics = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts and [r["index"] for r in rows] == list(range(6))
    tok = AutoTokenizer.from_pretrained(str(tiny_lm_dir))
    for r in rows:
        assert len(r["completions"]) == len(r["rewards"]) == len(r["completion_ids"]) == 4
        assert r["chosen"] == int(torch.tensor(r["rewards"]).argmax())  # lowest index among ties
        assert all(len(ids) == 6 for ids in r["completion_ids"]) and len(r["pi0_completion_ids"]) == 6
        assert r["prompt_ids"] == tok(r["prompt"])["input_ids"]
        assert tok.batch_decode(r["completion_ids"], skip_special_tokens=True) == r["completions"]
        assert r["temperature"] == 1.0 and r["min_new_tokens"] == 6
    bon = torch.tensor([r["rewards"][r["chosen"]] for r in rows])
    pi0 = torch.tensor([r["pi0_reward"] for r in rows])
    assert metrics["mean_reward_bon"] == pytest.approx(bon.mean().item())
    assert metrics["mean_reward_pi0"] == pytest.approx(pi0.mean().item())
    wins = (bon > pi0).double() + 0.5 * (bon == pi0).double()
    assert metrics["win_rate_bon_vs_pi0"] == pytest.approx(wins.mean().item(), abs=1e-12)
    assert metrics["tie_rate"] == pytest.approx((bon == pi0).double().mean().item(), abs=1e-12)
    assert metrics["prompts"] == 6 and metrics["new_tokens"] == 6 * 5 * 6  # every row runs to max_new_tokens
    assert metrics["reward"] == "gold"  # VADER is the task's gold judge; a learned reward prints as a proxy
    assert metrics["tokens_per_s"] == pytest.approx(metrics["new_tokens"] / metrics["sampling_seconds"])
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.yaml", "metrics.json", "samples.jsonl"]
    assert load_config(BonConfig, tmp_path / "out" / "config.yaml") == cfg, "the saved config round-trips"
    # The held-out judge grades every sample and never selects; the best-of-k curve ends at BoN's own figures.
    judge = torch.tensor([[12.0 - len(c.split()) for c in r["completions"]] for r in rows])
    assert [r["judge_rewards"] for r in rows] == judge.tolist() and [r["pi0_judge_reward"] for r in rows] == \
        [12.0 - len(r["pi0_completion"].split()) for r in rows]
    assert metrics["judge"] == "brevity" and metrics["mean_judge_bon"] == pytest.approx(
        judge[range(6), [r["chosen"] for r in rows]].mean().item())
    curve = metrics["curve"]
    assert [c["n"] for c in curve] == [1, 2, 4]
    assert curve[0]["mean_reward"] == pytest.approx(torch.tensor([r["rewards"] for r in rows]).mean().item())
    assert curve[0]["mean_judge"] == pytest.approx(judge.mean().item())
    assert curve[-1]["mean_reward"] == pytest.approx(metrics["mean_reward_bon"]) and \
        curve[-1]["win_rate_reward"] == pytest.approx(metrics["win_rate_bon_vs_pi0"])
    # Another judge (here none) is not another result: the rerun reuses every sample and drops the grades.
    again = run(load_config(BonConfig, tmp_path / "out" / "config.yaml", ["judge.kind=null", "judge.params={}"]))
    assert again["tokens_per_s"] is None and "judge" not in again and again["curve"] == [
        {k: v for k, v in c.items() if "judge" not in k} for c in curve]
    assert all("judge_rewards" not in json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines())


@pytest.mark.parametrize("override, field, allowed", [
    ("sampling.n=0", "sampling.n", ">= 1"),
    ("sampling.temperature=0", "sampling.temperature", "> 0"),
    ("sampling.temperature=-1.5", "sampling.temperature", "> 0"),
    ("sampling.n=two", "sampling.n", "an integer"),
    ("sampling.min_new_tokens=99", "sampling.min_new_tokens", "max_new_tokens"),
    ("pool.num_actors=0", "pool.num_actors", ">= 1"),
    ("model.path=./no/such/model", "model.path", "config.json"),
    ("model.path=''", "model.path", "config.json"),
    ("reward.kind=bleu", "reward.kind", "arithmetic | brevity | classifier | combined | ensemble | laplace | vader"),
    ("penalty.kind=ensemble", "penalty.kind", "only with reward.kind 'ensemble'"),
    ("penalty.coef=-1", "penalty.coef", ">= 0"),
    ("penalty.ensemble_mode=median", "penalty.ensemble_mode", "'worst'"),
    ("rbon.beta=-0.5", "rbon.beta", ">= 0"),
    ("reward.kind=ensemble", "reward.path", "a reward-model directory"),
    ("reward.kind=combined", "reward.params.components", ">= 2 rewards"),
    ("reward.num_actors=0", "reward.num_actors", ">= 1"),
    ("sampling.top_p=0.9", "sampling.top_p", "one of the known keys"),
    ("seeed=1", "seeed", "one of the known keys"),
])
def test_config_errors_name_the_field(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", [override])
    assert err.value.field == field
    assert f"'{field}'" in str(err.value) and allowed in str(err.value)


def test_empty_prompt_set_stops_before_work(tmp_path, tiny_lm_dir):
    cfg = load_config(BonConfig, None, [f"model.path={tiny_lm_dir}", f"prompts.source={prompt_file(tmp_path, [])}",
                                        f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="prompts.source.*non-empty"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config"):
        load_config(BonConfig, "configs/no_such.yaml")


@pytest.mark.ray
def test_pool_larger_than_the_cluster_is_a_config_error(ray_session, tiny_lm_dir, tmp_path):
    cfg = load_config(BonConfig, None, [f"model.path={tiny_lm_dir}", f"prompts.source={prompt_file(tmp_path, ['a b'])}",
                                        "prompts.column=text", "pool.num_actors=64", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match="pool.num_actors.*cluster"):
        run(cfg)
    assert not (tmp_path / "out").exists()
