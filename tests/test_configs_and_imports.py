"""Every module imports, every YAML in configs/ loads into its job's config, and align/ needs no Ray."""
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.runtime.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["align", "actors", "jobs", "serve", "tune"]


def all_modules():
    for pkg in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            yield info.name
        yield pkg


@pytest.mark.parametrize("name", list(all_modules()))
def test_module_imports(name):
    importlib.import_module(name)


def config_class(yaml_path: Path):
    """Each configs/**/X.yaml names the command it documents, `python -m <module> --config <its own path>`
    (so a file says which job reads it, and a copy with a stale command fails here); the job's config
    class is the dataclass that module's `run` takes."""
    import re
    import typing

    rel = yaml_path.relative_to(ROOT).as_posix()
    found = re.search(rf"python -m ((?:jobs|tune)[\w.]*) --config {re.escape(rel)}\b", yaml_path.read_text())
    assert found, f"{rel} does not name its command 'python -m jobs.X --config {rel}'"
    return typing.get_type_hints(importlib.import_module(found.group(1)).run)["cfg"]


JOB_CONFIGS = sorted(p for p in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "bench").glob("*.yaml"),
                                  *(ROOT / "configs" / "instruct").glob("*.yaml")]
                     if p.name != "serve.yaml")  # serve.yaml: a Ray Serve file


@pytest.mark.parametrize("name", ["serve.yaml", "instruct/serve.yaml"])
def test_serve_config_builds_the_app(name):
    """configs/serve.yaml (and the instruct task's) is a Ray Serve config file that Serve's own schema
    accepts: its args build the application (validated), its deployment names are the app's, and
    generation and scoring each autoscale with a bounded queue."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.app import build_app

    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    schema = ServeDeploySchema(**cfg)
    deployments = {d.name: d for d in schema.applications[0].deployments}
    for name in ("GeneratorDeployment", "ScorerDeployment"):
        scaling = deployments[name].autoscaling_config
        assert scaling["min_replicas"] >= 1 and scaling["max_replicas"] > scaling["min_replicas"], name
        assert deployments[name].max_queued_requests > 0 and deployments[name].max_ongoing_requests >= \
            cfg["applications"][0]["args"]["batching"]["max_batch_size"], name
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:build_app" and cfg["http_options"]["host"] == "127.0.0.1"
    assert build_app(app["args"]) is not None
    assert {d["name"] for d in app["deployments"]} == {"GeneratorDeployment", "ScorerDeployment", "Api"}
    with pytest.raises(ValueError, match="max_n"):
        build_app({**app["args"], "limits": {"max_n": 0}})
    with pytest.raises(ValueError, match="reward.kind"):
        build_app({**app["args"], "reward": {"kind": "bleu"}})


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_yaml_config_loads(path):
    cfg = load_config(config_class(path), path)
    assert cfg is not None


def undocumented_fields(cls, data: dict, prefix: str = ""):
    """Dotted names of dataclass fields (recursively) that the YAML mapping does not name."""
    import dataclasses
    import typing

    for name, tp in typing.get_type_hints(cls).items():
        if name not in data:
            yield prefix + name
        elif dataclasses.is_dataclass(tp) and isinstance(data[name], dict):
            yield from undocumented_fields(tp, data[name], f"{prefix}{name}.")


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_yaml_names_every_knob(path):
    """The YAML is the documentation of every knob: it names every field of its dataclass tree."""
    import yaml

    assert list(undocumented_fields(config_class(path), yaml.safe_load(path.read_text()))) == []


def test_laplace_installed_without_torchvision():
    """laplace-torch and its backends import, and torchvision (which cannot load beside the CPU torch
    and would pull a CUDA build) is not installed."""
    import importlib.util

    import laplace

    assert laplace.Laplace is not None and importlib.util.find_spec("torchvision") is None


def test_align_imports_without_ray_or_deepspeed():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
            "import align.math.bon, align.math.losses, align.engine.sampling, align.runtime.config, align.data.pairs, align.engine.models, align.rewards.registry, align.rewards.vader\n"
            "import align.math.scoring, align.math.selection, align.engine.embeddings, align.rewards.laplace_posterior\n"
            "import align.objectives.preference, align.objectives.bonbon, align.objectives.bradley_terry\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_override_parsing_and_errors():
    from jobs.bon import BonConfig

    cfg = load_config(BonConfig, ROOT / "configs/bon.yaml", ["sampling.n=16", "prompts.limit=null", "sampling.temperature=0.7"])
    assert cfg.sampling.n == 16 and cfg.prompts.limit is None and cfg.sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(BonConfig, None, ["sampling.n"])


def test_job_main_ends_a_config_error_with_its_message_and_status_2(capsys):
    from jobs.train_dpo import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(ROOT / "configs/train_dpo.yaml"), "dpo.beta=-1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config field 'dpo.beta': expected a number > 0") and "Traceback" not in err


def test_paths_are_resolved_once_as_the_config_loads(tmp_path, monkeypatch):
    """Outputs become absolute under the output root; inputs that exist become absolute (under the
    root first, then the working directory); names ("default", a hub id) and storage URIs stay."""
    from jobs.bon import BonConfig
    from jobs.train_dpo import DpoJobConfig

    root, work = tmp_path / "root", tmp_path / "work"
    (root / "pairs").mkdir(parents=True)
    (work / "my_model").mkdir(parents=True)
    (work / "my_model" / "config.json").write_text("{}")
    monkeypatch.setenv("SWEETSPOT_ROOT", str(root))
    monkeypatch.chdir(work)
    bon = load_config(BonConfig, None, ["output_dir=out/bon", "model.path=my_model"])
    assert bon.output_dir == str(root / "out" / "bon") and bon.model.path == str(work / "my_model")
    assert load_config(BonConfig, None, ["model.path=HuggingFaceTB/SmolLM2-135M-Instruct"]).model.path == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # no such path here: a hub name, kept for the loader
    dpo = load_config(DpoJobConfig, None, ["data.source=pairs", "model=default", "train.run.storage_path=s3://bucket/runs"])
    assert dpo.data.source == str(root / "pairs") and dpo.model == "default"
    assert dpo.train.run.storage_path == "s3://bucket/runs" and dpo.output_dir == str(root / "outputs" / "dpo")
    assert load_config(DpoJobConfig, None, [f"output_dir={dpo.output_dir}"]).output_dir == dpo.output_dir  # idempotent
    assert load_config(DpoJobConfig, None, []).train.run.storage_path == str(root / "outputs" / "runs")  # a default section's


def test_job_tables_are_derived_from_the_code():
    """The pipeline's stages are the jobs with run(cfg); tune.train's knobs are the SWEEPABLE tables of
    the objective sections (a registered objective's or vBoN's)."""
    from align.objectives.preference import PreferenceObjective
    from align.objectives.vbon import VbonParams
    from jobs.catalog import stages, sweeps

    assert {"bon", "make_pairs", "train_dpo", "train_objective", "train_vbon", "evaluate"} <= set(stages())
    assert not {"pipeline", "report", "sections", "tables"} & set(stages())
    assert sweeps()["train_dpo"] == {f"dpo.{k}": v for k, v in PreferenceObjective.SWEEPABLE.items()}
    assert sweeps()["train_vbon"] == {f"vbon.{k}": v for k, v in VbonParams.SWEEPABLE.items()}
    from tune.train import TuneTrainConfig

    with pytest.raises(ConfigError, match="train_dpo") as err:
        load_config(TuneTrainConfig, None, ["job=bon"])
    assert err.value.field == "job"
