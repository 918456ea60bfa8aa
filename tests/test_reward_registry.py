"""The reward registry: built-in kinds found by name, a kind from another module found by
"module:kind", typed params validated with the field named, and a plugin kind running through jobs.bon
(its Ray actors import the plugin's module themselves)."""
import json

import pytest

from align.rewards.registry import build_scorer, check_spec, known_kinds, reward_kind
from align.runtime.config import ConfigError, load_config

TOY = "tests.plugins.toy_reward:char_count"


def test_builtin_kinds_register_themselves():
    assert {"vader", "brevity", "classifier", "ensemble", "laplace", "combined"} <= set(known_kinds())
    assert reward_kind("classifier").needs_path and not reward_kind("vader").needs_path
    assert reward_kind("combined").nested == "components" and reward_kind("combined").scores_within_prompt


def test_a_plugin_kind_is_found_by_module_and_scores():
    kind = reward_kind(TOY)
    assert kind.name == TOY and kind.params.__name__ == "CharCountParams"
    scores = build_scorer({"kind": TOY, "weight": 2.0}).score(["p", "p"], ["eee e", ""])
    assert scores.mean.tolist() == [10.0, 0.0] and scores.var.tolist() == [0.0, 0.0]


def test_spec_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        check_spec({"kind": TOY, "weight": -1.0}, "reward")
    assert err.value.field == "reward.weight" and "> 0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_spec({"kind": "vader", "max_words": 3}, "reward")
    assert err.value.field == "reward.max_words" and "no params" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_spec({"kind": "no_such_module_x:kind"}, "reward")
    assert err.value.field == "reward.kind" and "importable" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_spec({"kind": "combined", "components": [{"kind": "vader"}, {"kind": "brevity", "max_words": 0}]}, "reward")
    assert err.value.field == "reward.components[1].max_words"
    assert check_spec({"kind": "brevity"}, "reward") == {"kind": "brevity", "max_words": 12}  # defaults filled


def test_job_config_types_the_params_and_names_them():
    from jobs.bon import BonConfig

    cfg = load_config(BonConfig, "configs/bon.yaml", [f"reward.kind={TOY}", "reward.params={weight: 3}"])
    assert cfg.reward.params == {"weight": 3.0} and cfg.reward.spec()["weight"] == 3.0
    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", [f"reward.kind={TOY}", "reward.params={wieght: 3}"])
    assert err.value.field == "reward.params.wieght" and "weight" in str(err.value)


@pytest.mark.ray
def test_a_plugin_kind_runs_through_the_bon_job(ray_session, tiny_lm_dir, tmp_path):
    from jobs.bon import BonConfig, run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in ["the movie was", "a good film", "the plot"]))
    cfg = load_config(BonConfig, "configs/bon.yaml", [
        f"model.path={tiny_lm_dir}", f"prompts.source={prompts}", "prompts.column=text", "prompts.repeats=1", "sampling.n=4",
        "sampling.max_new_tokens=6", "sampling.min_new_tokens=6", "pool.num_actors=1", "pool.batch_size=3",
        f"reward.kind={TOY}", "reward.params={weight: 0.5}", f"output_dir={tmp_path / 'out'}"])
    metrics = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:  # the scorer actor ran the plugin: every reward is 0.5 * the completion's length
        assert r["rewards"] == [0.5 * len(c) for c in r["completions"]]
        assert r["pi0_reward"] == 0.5 * len(r["pi0_completion"])
        assert r["chosen"] == max(range(4), key=lambda i: (r["rewards"][i], -i))
    assert metrics["mean_reward_bon"] == pytest.approx(sum(r["rewards"][r["chosen"]] for r in rows) / 3)
