"""The objective registry (align.objectives): built-ins by plain name, an objective from the user's own
module by "module:name", unknown names as a config error; and a plugin objective trained end to end
by the real trainer (Ray Train + DeepSpeed on CPU), with no project file edited."""
import json

import pytest

from align.runtime.config import ConfigError, load_config

TOY = "tests.plugins.toy_objective:toy_sft"
PAIRS = [("the movie was", " great and wonderful .", " awful and terrible ."),
         ("a good film", " with a lovely cast .", " with a bad ending ."),
         ("the plot", " is fine and good .", " is weak and awful ."),
         ("the music is", " lovely .", " terrible .")]


def test_builtins_by_name_plugins_by_module_and_unknown_names():
    from align.objectives import objective_class
    from align.objectives.base import Objective
    from align.objectives.bonbon import BonbonObjective
    from align.objectives.bradley_terry import BradleyTerryObjective
    from align.objectives.preference import PreferenceObjective
    from tests.plugins.toy_objective import ToySftObjective

    assert objective_class(TOY) is ToySftObjective and ToySftObjective.NAME == TOY  # saved as the name it is found by
    assert isinstance(ToySftObjective(), Objective) and not ToySftObjective().live_reference
    assert [objective_class(n) for n in ("preference", "bonbon", "bradley_terry")] == \
        [PreferenceObjective, BonbonObjective, BradleyTerryObjective]
    with pytest.raises(ConfigError) as err:
        objective_class("kto", field="dpo.objective")
    assert err.value.field == "dpo.objective" and all(n in err.value.allowed for n in ("preference", "bonbon", "bradley_terry"))
    with pytest.raises(ConfigError, match="importable"):
        objective_class("tests.plugins.no_such_module:toy_sft")


def test_the_objective_job_types_the_params_and_names_errors():
    from jobs.train_objective import TrainObjectiveConfig

    cfg = load_config(TrainObjectiveConfig, "configs/train_objective.yaml", ["objective.params={beta: 0.2}"])
    assert cfg.objective.params["beta"] == 0.2 and cfg.objective.params["loss"] == "dpo"  # defaults filled in
    assert cfg.objective.build().describe() == "dpo (reference update: none)"
    with pytest.raises(ConfigError) as err:
        load_config(TrainObjectiveConfig, "configs/train_objective.yaml", ["objective.params={beta: -1}"])
    assert err.value.field == "objective.params.beta" and "> 0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(TrainObjectiveConfig, "configs/train_objective.yaml", [f"objective.name={TOY}"])  # ipo's params
    assert err.value.field.startswith("objective.params.") and "known keys" in str(err.value)


@pytest.mark.ray
def test_plugin_objective_runs_through_the_trainer(ray_session, tmp_path, tiny_lm_dir):
    """The toy SFT objective named in the objective job's config, 1 worker, 4 steps: its metric is
    logged and the saved model names it."""
    from jobs.train_objective import TrainObjectiveConfig, run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    cfg = load_config(TrainObjectiveConfig, "configs/train_objective.yaml", [
        f"objective.name={TOY}", "objective.params={}",
        f"model={tiny_lm_dir}", f"data.source={pairs}", "data.eval_split=null", f"output_dir={tmp_path / 'out'}",
        "train.run.name=toy", f"train.run.storage_path={tmp_path / 'runs'}", "train.steps=4", "train.batch_size=2",
        "train.run.checkpoint_every=4", "train.run.log_every=2", "train.optim.lr=1e-2", "train.optim.warmup_steps=1",
        "train.workers.num_workers=1", "train.workers.collective_timeout_s=30"])
    metrics = run(cfg)
    assert metrics["step"] == 4 and metrics["sft_logp"] < 0 and metrics["loss"] == pytest.approx(-metrics["sft_logp"])
    saved = json.loads((tmp_path / "out" / "model" / "sweetspot.json").read_text())
    assert saved == {"objective": TOY}  # the name a later job finds it by
