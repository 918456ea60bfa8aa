"""jobs.pipeline: stages chained by ${name}, outputs keyed by the config that made them, and config errors
that stop before any work. Running a pipeline, reusing it and rerunning a changed stage is tested on the
report's pipeline (tests/test_report.py)."""
import json

import pytest
import yaml

from align.runtime.config import ConfigError, load_config
from jobs.pipeline import PipelineConfig, plan, run


def write_pipeline(tmp_path, small_task) -> str:
    """A tiny BoN run -> BoNBoN for 2 steps on a pair file -> evaluate the trained model."""
    prompts = small_task.root / "prompts"
    stages = [
        {"name": "sample", "job": "bon", "config": "configs/bon.yaml",
         "overrides": [f"model.path={small_task.policy_dir}", f"prompts.source={prompts}", "prompts.limit=4",
                       "prompts.repeats=1", "sampling.n=2", "sampling.max_new_tokens=8", "sampling.min_new_tokens=8",
                       "pool.num_actors=1"]},
        {"name": "policy", "job": "train_bonbon", "config": "configs/train_bonbon.yaml",
         "overrides": [f"model={small_task.policy_dir}", f"data.source={tmp_path / 'pairs.jsonl'}", "bonbon.n=4",
                       "train.steps=2", "train.batch_size=4", "train.max_length=48", "train.workers.num_workers=1",
                       "train.workers.collective_timeout_s=30"]},
        {"name": "evaluate", "job": "evaluate", "config": "configs/evaluate.yaml",
         "overrides": ["policy=${policy}/model", "policy_name=bonbon", f"reference={small_task.policy_dir}",
                       f"prompts.source={prompts}", "prompts.limit=4", "sampling.n=2", "sampling.max_new_tokens=8",
                       "sampling.min_new_tokens=8"]},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "output_dir": str(tmp_path / "out")}))
    return str(path)


def test_an_interrupted_stage_is_not_taken_as_finished(tmp_path, small_task):
    path = write_pipeline(tmp_path, small_task)
    stages = plan(load_config(PipelineConfig, path))
    stages[0].dir.mkdir(parents=True)
    (stages[0].dir / "samples.jsonl").write_text("{}\n")  # outputs without stage.json: the job was killed
    assert not stages[0].done
    (stages[0].dir / "stage.json").write_text(json.dumps({"key": "made-under-another-config"}))
    assert not stages[0].done


@pytest.mark.parametrize("override, field", [
    ("set.policy=[bonbon.alpha=2]", "stages[1] (policy, jobs.train_bonbon): bonbon.alpha"),
    ("set.nope=[seed=1]", "set.nope"),
    ("stop_after=nope", "stop_after"),
    ("set.sample=['prompts.source=${evaluate}']", "stages[0].overrides[8]"),
    ("set.policy=[data.source=${x}]", "set.policy"),  # unquoted braces: a YAML error, named
])
def test_config_errors_stop_before_any_work(tmp_path, small_task, override, field):
    path = write_pipeline(tmp_path, small_task)
    with pytest.raises(ConfigError) as e:
        run(load_config(PipelineConfig, path, [override]))
    assert e.value.field == field
    assert not (tmp_path / "out").exists()


def test_the_default_pipeline_config_plans(tmp_path):
    cfg = load_config(PipelineConfig, "configs/pipeline.yaml", [f"output_dir={tmp_path}"])
    stages = plan(cfg)
    assert [s.spec.job for s in stages] == ["make_pairs", "train_rm", "train_bonbon", "evaluate"]
    pairs, rm, bonbon, evaluate = stages
    assert rm.cfg.data.source == f"{pairs.dir}/random" and bonbon.cfg.data.source == f"{pairs.dir}/bonbon"
    assert bonbon.cfg.train.run.storage_path == str(bonbon.dir / "runs") and evaluate.cfg.output_dir == str(evaluate.dir)
    assert evaluate.cfg.policy == f"{bonbon.dir}/model"
    other = plan(load_config(PipelineConfig, "configs/pipeline.yaml", [f"output_dir={tmp_path}", "set.rm=[train.steps=7]"]))
    assert [a.dir == b.dir for a, b in zip(stages, other)] == [True, False, True, True]
