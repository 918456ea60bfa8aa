"""The three training jobs end to end on the (small) default task with 2 DeepSpeed workers: each
checkpoints, loses a worker, resumes from the checkpoint, and saves a model that jobs.bon loads."""
import json

import pytest

from align.config import ConfigError, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMMON = ["train.steps=3", "train.batch_size=4", "train.run.checkpoint_every=1", "train.run.log_every=1",
          "train.fail_once_at_step=2", "train.run.max_failures=1", "train.workers.collective_timeout_s=30",
          "train.max_length=48"]


def job_config(cls, yaml, tmp_path, small_task, source, *extra):
    return load_config(cls, yaml, [f"model={small_task.policy_dir}", f"data.source={source}",
                                   f"output_dir={tmp_path}", f"train.run.storage_path={tmp_path / 'runs'}", *COMMON, *extra])


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def bon_over(model_dir, small_task, tmp_path, *extra):
    from jobs.bon import BonConfig, run

    return run(load_config(BonConfig, "configs/bon.yaml", [
        f"model.path={model_dir}", f"prompts.source={small_task.root / 'prompts'}", "prompts.limit=4", "prompts.repeats=1",
        "sampling.n=2", "sampling.max_new_tokens=8", "sampling.min_new_tokens=8", "pool.num_actors=1",
        f"output_dir={tmp_path}", *extra]))


@pytest.fixture(scope="module")
def reward_model(small_task, small_pairs, tmp_path_factory):
    from jobs.train_rm import RmJobConfig, run

    out = tmp_path_factory.mktemp("rm")
    metrics = run(job_config(RmJobConfig, "configs/train_rm.yaml", out, small_task, small_pairs / "random",
                             "lora.enabled=true", "train.optim.lr=1e-3"))
    return out, metrics


def test_train_rm_end_to_end(reward_model, small_pairs):
    out, metrics = reward_model
    assert steps_logged(out) == [1, 2, 3]  # failed during step 2, resumed from the step-1 checkpoint
    assert (out / "model" / "model.safetensors").exists() and not (out / "model" / "adapter_config.json").exists()
    # The agreement is the paired win rate of the saved model's rewards on the held-out pairs' sampled ids.
    import datasets

    from align.bon import win_rate
    from align.rewards import SequenceClassifierReward

    test = datasets.load_from_disk(str(small_pairs / "random"))["test"]
    reward = SequenceClassifierReward(str(out / "model"), device="cpu")
    score = {side: reward(test["prompt"], test[side], [p + c for p, c in zip(test["prompt_ids"], test[f"{side}_ids"])],
                          test["tokenizer"][0]) for side in ("chosen", "rejected")}
    assert metrics["heldout_pairs"] == len(test) > 0
    assert metrics["heldout_agreement"] == pytest.approx(win_rate(score["chosen"], score["rejected"]), abs=1e-12)
    assert metrics["step"] == 3


def test_train_bonbon_end_to_end_and_bon_loads_both(small_task, small_pairs, reward_model, tmp_path):
    from jobs.train_bonbon import BonbonJobConfig, run

    out = tmp_path / "bonbon"
    metrics = run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", out, small_task, small_pairs / "bonbon", "bonbon.n=4"))
    assert steps_logged(out) == [1, 2, 3]
    assert {"loss/sft", "loss/ipo", "beta"} <= set(metrics)
    bon = bon_over(out / "model", small_task, tmp_path / "bon", "reward.kind=classifier", f"reward.path={reward_model[0] / 'model'}")
    assert bon["prompts"] == 4
    # The same command again: the saved-dataset source is unchanged (nothing was written into it), so
    # the finished run is resumed at its last step, not refused as stale and not trained again.
    assert not list(small_pairs.rglob("cache-*"))
    again = run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", out, small_task, small_pairs / "bonbon", "bonbon.n=4"))
    assert steps_logged(out) == [1, 2, 3] and again["loss"] == metrics["loss"]


def test_train_dpo_soft_trdpo_end_to_end(small_task, small_pairs, tmp_path):
    from jobs.train_dpo import DpoJobConfig, run

    out = tmp_path / "dpo"
    run(job_config(DpoJobConfig, "configs/train_dpo.yaml", out, small_task, small_pairs / "bonbon",
                   "dpo.ref_update=soft", "dpo.ref_tau=1", "train.deepspeed.zero_stage=2"))
    assert steps_logged(out) == [1, 2, 3]
    assert bon_over(out / "model", small_task, tmp_path / "bon")["prompts"] == 4


def test_bonbon_n_must_match_the_data(small_task, small_pairs, tmp_path):
    from jobs.train_bonbon import BonbonJobConfig, run

    with pytest.raises(ConfigError, match="bonbon.n"):
        run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", tmp_path, small_task, small_pairs / "bonbon", "bonbon.n=8"))


@pytest.mark.parametrize("override, field", [
    ("dpo.beta=0", "dpo.beta"), ("dpo.ref_alpha=1.5", "dpo.ref_alpha"), ("dpo.loss=kto", "dpo.loss"),
    ("train.batch_size=3", "train.batch_size"), ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage"),
])
def test_dpo_config_errors(override, field):
    from jobs.train_dpo import DpoJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(DpoJobConfig, "configs/train_dpo.yaml", [override])
    assert err.value.field == field


@pytest.mark.parametrize("override, field", [("bonbon.alpha=-0.1", "bonbon.alpha"), ("bonbon.n=1", "bonbon.n")])
def test_bonbon_config_errors(override, field):
    from jobs.train_bonbon import BonbonJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(BonbonJobConfig, "configs/train_bonbon.yaml", [override])
    assert err.value.field == field


def test_missing_pair_columns_and_source(tmp_path):
    from jobs.train_dpo import DpoJobConfig, run

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"data.source.*\['rejected'\]"):
        run(load_config(DpoJobConfig, "configs/train_dpo.yaml", [f"data.source={bad}", f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(ConfigError, match="data.source"):
        run(load_config(DpoJobConfig, "configs/train_dpo.yaml", [f"data.source={tmp_path / 'nope'}", f"output_dir={tmp_path / 'o'}"]))


def test_worker_group_larger_than_the_cluster_is_a_config_error(ray_session, tmp_path, tiny_lm_dir):
    from jobs.train_dpo import DpoJobConfig, run

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    cfg = load_config(DpoJobConfig, "configs/train_dpo.yaml", [f"model={tiny_lm_dir}", f"data.source={pairs}",
                      f"output_dir={tmp_path / 'o'}", "train.workers.num_workers=64", "train.batch_size=64"])
    with pytest.raises(ConfigError, match="train.workers.num_workers"):
        run(cfg)
