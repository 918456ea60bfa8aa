"""jobs.pipeline: stages chained by ${name}, outputs keyed by the config that made them, and config errors
that stop before any work. Running a pipeline, reusing it and rerunning a changed stage is tested on the
report's pipeline (tests/test_report.py)."""
import json
from dataclasses import dataclass

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


@dataclass
class StageName:
    name: str


def side_by_side(tmp_path, monkeypatch, specs, job):
    """run_stages over stages named by `specs` ({name: [stages it reads]}), each stage's job being
    `job(name)`; returns (rows, the order of "start x" / "end x" events)."""
    import threading
    import types

    import jobs.pipeline as pipeline
    from jobs.pipeline import Stage, StageSpec, run_stages

    events, lock = [], threading.Lock()

    def run_job(cfg):
        with lock:
            events.append(f"start {cfg.name}")
        try:
            return job(cfg.name)
        finally:
            with lock:
                events.append(f"end {cfg.name}")

    monkeypatch.setattr(pipeline.importlib, "import_module", lambda name: types.SimpleNamespace(run=run_job))
    stage_specs = [StageSpec(name, "bon", None, [f"x=${{{r}}}" for r in reads]) for name, reads in specs.items()]
    cfg = PipelineConfig(stages=stage_specs, parallel=2, output_dir=str(tmp_path))
    stages = [Stage(s, StageName(s.name), "k", tmp_path / s.name) for s in stage_specs]
    rows = [{"stage": s.name} for s in stage_specs]
    run_stages(cfg, stages, rows)
    return rows, events


def test_parallel_stages_overlap_wait_for_what_they_read_and_log_to_their_directory(tmp_path, monkeypatch, capsys):
    import threading

    c_started = threading.Event()

    def job(name):
        print(f"hello from {name}")
        if name == "c":
            c_started.set()
        if name == "a":  # finishes only once c runs beside it: the two overlap
            assert c_started.wait(timeout=30)
        return {"loss": 1.0}

    rows, events = side_by_side(tmp_path, monkeypatch, {"a": [], "b": ["a"], "c": []}, job)
    assert events.index("start b") > events.index("end a")  # b reads a
    assert events.index("start c") < events.index("end a")
    assert [r["status"] for r in rows] == ["ran"] * 3
    assert (tmp_path / "a" / "stage.log").read_text() == "hello from a\n"
    assert json.loads((tmp_path / "b" / "stage.json").read_text())["metrics"] == {"loss": 1.0}
    console = capsys.readouterr().out
    assert "hello from" not in console and "== a done in" in console and "log: " in console


def test_a_failed_stage_lets_the_running_one_finish_and_starts_no_more(tmp_path, monkeypatch):
    import threading

    a_failed = threading.Event()

    def job(name):
        if name == "a":
            a_failed.set()
            raise ValueError("stage a broke")
        assert a_failed.wait(timeout=30)  # c, beside a, ends after a failed
        return {}

    with pytest.raises(ValueError, match="stage a broke"):
        side_by_side(tmp_path, monkeypatch, {"a": [], "c": [], "d": [], "b": ["a"]}, job)
    assert not (tmp_path / "d" / "stage.json").exists() and not (tmp_path / "b").exists()
    assert (tmp_path / "c" / "stage.json").exists()
