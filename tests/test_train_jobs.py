"""The three training jobs end to end on the (small) default task: each checkpoints and saves a model
that jobs.bon loads. They train on one rank in the driver (workers.num_workers 0, Ray Train's local
mode): the same loop without the worker group's start-up. The worker groups themselves (2 ranks,
ZeRO-0 to 3, killed and restarted ranks, local mode against 2 workers bit for bit) are
tests/test_training.py's; a submitted job's workers, tests/test_cluster_jobs.py's."""
import json

import pytest

from align.runtime.config import ConfigError, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# No injected failures here: a restart costs ~10 s of CI per job, and tests/test_training.py kills workers
# and compares with an uninterrupted run bit for bit.
COMMON = ["train.steps=3", "train.batch_size=4", "train.run.checkpoint_every=1", "train.run.log_every=1",
          "train.workers.collective_timeout_s=30", "train.max_length=48"]


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
                             "lora.enabled=true", "train.optim.lr=1e-3", "ensemble.members=2", "laplace.enabled=true",
                             "train.workers.num_workers=0"))
    return out, metrics


def test_train_rm_end_to_end(reward_model, small_pairs):
    out, metrics = reward_model
    assert steps_logged(out) == [1, 2, 3]
    assert (out / "model" / "model.safetensors").exists() and not (out / "model" / "adapter_config.json").exists()
    # The agreement is the paired win rate of the saved model's rewards on the held-out pairs' sampled ids.
    import datasets

    from align.math.bon import win_rate
    from align.rewards.classifier import SequenceClassifierReward

    test = datasets.load_from_disk(str(small_pairs / "random"))["test"]
    reward = SequenceClassifierReward(str(out / "model"), device="cpu")
    score = {side: reward(test["prompt"], test[side], [p + c for p, c in zip(test["prompt_ids"], test[f"{side}_ids"])],
                          test["tokenizer"][0]) for side in ("chosen", "rejected")}
    assert metrics["heldout_pairs"] == len(test) > 0
    assert metrics["heldout_agreement"] == pytest.approx(win_rate(score["chosen"], score["rejected"]), abs=1e-12)
    assert metrics["step"] == 3


def test_train_rm_ensemble_members_and_laplace_posterior(reward_model, small_pairs, small_task, tmp_path):
    """ensemble.members=2: member 0 is the plain model, member 1 its own run (seed + 1, a bootstrap
    resample); laplace.enabled: a posterior over member 0's LoRA weights whose
    predictive mean is that model's reward, and which jobs.bon ranks by mu - k sigma."""
    import datasets
    import torch

    from actors.scorer import make_scorer
    from align.rewards.laplace_posterior import LaplaceReward
    from align.rewards.classifier import SequenceClassifierReward

    out, metrics = reward_model
    ens = out / "ensemble"
    assert json.loads((ens / "ensemble.json").read_text()) == {"members": ["member_0/model", "member_1/model"]}
    assert (ens / "member_0" / "model" / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    assert steps_logged(ens / "member_1") == [1, 2, 3]
    assert len(metrics["ensemble_heldout_agreement"]) == 2
    test = datasets.load_from_disk(str(small_pairs / "random"))["test"]
    prompts, texts = test["prompt"][:8], test["chosen"][:8]
    scores = make_scorer({"kind": "ensemble", "path": str(ens), "device": "cpu"}).score(prompts, texts)
    assert not torch.allclose(scores.members[0], scores.members[1]), "members differ (seed, bootstrap)"

    la = LaplaceReward.load(out / "laplace")
    assert la.num_pairs == metrics["laplace_pairs"] > 0
    plain = SequenceClassifierReward(str(out / "model"), device="cpu")(prompts, texts)
    laplace = make_scorer({"kind": "laplace", "path": str(out / "laplace"), "device": "cpu"}).score(prompts, texts)
    torch.testing.assert_close(laplace.mean, plain, rtol=0, atol=1e-4)  # the GLM mean is the MAP reward (LoRA merged)
    assert (laplace.var > 0).all()

    bon_over(small_task.policy_dir, small_task, tmp_path / "bon", "reward.kind=laplace", f"reward.path={out / 'laplace'}",
             "penalty.kind=laplace", "penalty.coef=2.0")
    for r in map(json.loads, (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()):
        mu, var = torch.tensor(r["rewards"], dtype=torch.float64), torch.tensor(r["reward_var"], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(r["ranking"], dtype=torch.float64), mu - 2.0 * var.sqrt())
        assert r["chosen"] == int(torch.tensor(r["ranking"]).argmax())


def test_train_bonbon_end_to_end_and_bon_loads_both(small_task, small_pairs, reward_model, tmp_path, capsys):
    from jobs.train_bonbon import BonbonJobConfig, run

    out = tmp_path / "bonbon"
    bonbon = ["bonbon.n=4", "train.workers.num_workers=0"]
    metrics = run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", out, small_task, small_pairs / "bonbon", *bonbon))
    assert steps_logged(out) == [1, 2, 3]
    assert {"loss/sft", "loss/ipo", "beta"} <= set(metrics)
    bon = bon_over(out / "model", small_task, tmp_path / "bon", "reward.kind=classifier", f"reward.path={reward_model[0] / 'model'}")
    assert bon["prompts"] == 4 and bon["reward"] == "proxy (classifier)"  # a learned reward is never "gold"
    # The same command again: the saved-dataset source is unchanged (nothing was written into it), so
    # the finished run is recognised, not refused as stale, and it does not train again.
    assert not list(small_pairs.rglob("cache-*"))
    model = (out / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    again = run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", out, small_task, small_pairs / "bonbon", *bonbon))
    assert steps_logged(out) == [1, 2, 3] and again["loss"] == metrics["loss"]
    assert "finished before" in capsys.readouterr().out and (out / "model" / "model.safetensors").read_bytes() == model
    assert len((out / "runs" / "bonbon" / "worker_starts.jsonl").read_text().splitlines()) == 1


def test_train_dpo_soft_trdpo_end_to_end(small_task, small_pairs, tmp_path):
    from jobs.train_dpo import DpoJobConfig, run

    out = tmp_path / "dpo"
    run(job_config(DpoJobConfig, "configs/train_dpo.yaml", out, small_task, small_pairs / "bonbon",
                   "dpo.ref_update=soft", "dpo.ref_tau=1", "train.deepspeed.zero_stage=2", "train.workers.num_workers=0"))
    assert steps_logged(out) == [1, 2, 3]
    assert bon_over(out / "model", small_task, tmp_path / "bon")["prompts"] == 4


def test_bonbon_n_must_match_the_data(small_task, small_pairs, tmp_path):
    from jobs.train_bonbon import BonbonJobConfig, run

    with pytest.raises(ConfigError, match="bonbon.n"):
        run(job_config(BonbonJobConfig, "configs/train_bonbon.yaml", tmp_path, small_task, small_pairs / "bonbon", "bonbon.n=8"))


@pytest.mark.parametrize("override, field", [
    ("dpo.beta=0", "dpo.beta"), ("dpo.ref_alpha=1.5", "dpo.ref_alpha"), ("dpo.loss=kto", "dpo.loss"),
    ("train.batch_size=3", "train.batch_size"), ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage"),
    ("train.micro_batches=3", "train.micro_batches"), ("train.micro_batches=0", "train.micro_batches"),
    ("train.run.tracking=wandb", "train.run.tracking"), ("train.workers.num_workers=-1", "train.workers.num_workers"),
])
def test_dpo_config_errors(override, field):
    from jobs.train_dpo import DpoJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(DpoJobConfig, "configs/train_dpo.yaml", [override])
    assert err.value.field == field


def test_mlflow_tracking_without_mlflow_installed_stops_at_config_load(monkeypatch):
    import importlib.util

    from jobs.train_dpo import DpoJobConfig
    from tune.dera import TuneDeraConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install mlflow-skinny") as err:
        load_config(DpoJobConfig, "configs/train_dpo.yaml", ["train.run.tracking=tensorboard+mlflow"])
    assert err.value.field == "train.run.tracking"
    with pytest.raises(ConfigError) as err:
        load_config(TuneDeraConfig, "configs/tune_dera.yaml", ["tracking=mlflow"])
    assert err.value.field == "tracking"
    assert load_config(DpoJobConfig, "configs/train_dpo.yaml", ["train.run.tracking=tensorboard"]).train.run.tracking == "tensorboard"


@pytest.mark.parametrize("override, field", [("bonbon.alpha=-0.1", "bonbon.alpha"), ("bonbon.n=1", "bonbon.n")])
def test_bonbon_config_errors(override, field):
    from jobs.train_bonbon import BonbonJobConfig

    with pytest.raises(ConfigError) as err:
        load_config(BonbonJobConfig, "configs/train_bonbon.yaml", [override])
    assert err.value.field == field


@pytest.mark.parametrize("override, field", [
    ("ensemble.members=0", "ensemble.members"), ("laplace.enabled=true", "laplace.enabled"),
    ("laplace.hessian_structure=full", "laplace.hessian_structure"), ("laplace.limit=0", "laplace.limit"),
])
def test_rm_config_errors(override, field):
    from jobs.train_rm import RmJobConfig

    with pytest.raises(ConfigError) as err:  # laplace.enabled without lora.enabled: no LoRA weights to put it on
        load_config(RmJobConfig, "configs/train_rm.yaml", [override])
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
