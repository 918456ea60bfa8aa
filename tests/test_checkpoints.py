"""RunDir's checkpoint manifest: a checkpoint truncated, altered or missing a file after it was marked
complete is recognised, named, and skipped for the newest one that still verifies."""
import json
import pytest

from actors.checkpoints import MARKER, RunDir, checkpoint_name


def make_checkpoint(run: RunDir, step: int, files: dict[str, bytes]) -> str:
    path = f"{run.path}/{checkpoint_name(step)}"
    for name, data in files.items():
        run.fs.create_dir(f"{path}/{name.rsplit('/', 1)[0]}" if "/" in name else path, recursive=True)
        with run.fs.open_output_stream(f"{path}/{name}") as f:
            f.write(data)
    run.mark_complete(step)
    return path


def test_manifest_names_what_is_wrong_and_the_newest_valid_checkpoint_wins(tmp_path):
    run = RunDir(str(tmp_path), "run")
    files = {"ds/mp_rank_00_model_states.pt": b"weights" * 100, "reference.safetensors": b"ref" * 10}
    one, two, three = (make_checkpoint(run, s, files) for s in (1, 2, 3))
    marker = json.loads((tmp_path / "run" / checkpoint_name(3) / MARKER).read_text())
    assert marker["step"] == 3 and marker["files"]["reference.safetensors"][0] == 30
    assert run.verify(three) is None and run.newest_valid() == ((3, three), [])

    shard = tmp_path / "run" / checkpoint_name(3) / "ds" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:350])  # truncated
    assert run.verify(three) == "ds/mp_rank_00_model_states.pt has 350 bytes, the manifest says 700"
    ref = tmp_path / "run" / checkpoint_name(2) / "reference.safetensors"
    ref.write_bytes(b"REF" + ref.read_bytes()[3:])  # same size, other bytes
    assert run.verify(two) == "reference.safetensors does not match its SHA-256 in the manifest"
    newest, bad = run.newest_valid()
    assert newest == (1, one) and [p for p, _ in bad] == [three, two]

    (tmp_path / "run" / checkpoint_name(1) / "reference.safetensors").unlink()
    assert run.verify(one) == "reference.safetensors is missing"
    assert run.newest_valid()[0] is None


def test_a_marker_without_a_manifest_is_trusted_and_a_garbled_one_is_not(tmp_path):
    run = RunDir(str(tmp_path), "run")
    path = make_checkpoint(run, 1, {"a.bin": b"x"})
    (tmp_path / "run" / checkpoint_name(1) / MARKER).write_text("")  # written before manifests existed
    assert run.verify(path) is None
    (tmp_path / "run" / checkpoint_name(1) / MARKER).write_text("{not json")
    assert run.verify(path).startswith("unreadable (JSONDecodeError")


def test_a_new_run_name_does_not_take_another_runs_output_dir(tmp_path):
    """start_run refuses, before Ray or any file is touched, an output_dir whose config.yaml is another
    run's (its name or checkpoint storage differ), names the keys, and says how to replace it."""
    import yaml

    from align.runtime.config import load_config, to_dict
    from align.runtime.runstate import StaleStateError, check_output_owner
    from jobs.train_dpo import DpoJobConfig
    from jobs.training import start_run

    out = tmp_path / "out"
    first = load_config(DpoJobConfig, None, [f"output_dir={out}", "train.run.name=first",
                                             f"train.run.storage_path={tmp_path / 'runs'}"])
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(first)))
    (out / "model").mkdir()
    second = load_config(DpoJobConfig, None, [f"output_dir={out}", "train.run.name=second",
                                              f"train.run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(StaleStateError, match="train.run.name: 'first' -> 'second'.*train.run.resume=never"):
        start_run("dpo", second, out, second.train.run.storage_path, {})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model"]  # nothing touched
    owner = {"train.run.name": "second", "train.run.storage_path": second.train.run.storage_path}
    check_output_owner(out, owner, replace=True, hint="")  # told to replace: no objection
    check_output_owner(out, {**owner, "train.run.name": "first"}, replace=False, hint="")  # the same run: resumes


@pytest.mark.parametrize("job, knob, file", [("dera", "lambdas=[0.0,0.5]", "config.yaml"),
                                             ("overopt", "ns=[1,2]", "config.yaml"),
                                             ("make_pairs", "random_pairs_per_prompt=3", "config.yaml"),
                                             ("evaluate", "bon_n=[2]", "eval_config.yaml")])
def test_jobs_refuse_another_configs_results_before_any_work(tmp_path, monkeypatch, job, knob, file):
    """dera, overopt, make_pairs and evaluate: an output_dir whose saved config differs in a knob the
    results depend on is refused at once, naming the key and replace=true; nothing there is touched
    and Ray is not started. A rerun that changes only where it runs (ray_address, devices) is no
    change, and replace=true reports the differing keys to the job instead of raising."""
    import importlib

    import yaml

    from align.runtime.config import load_config, to_dict
    from align.runtime.runstate import StaleStateError, claim_output

    module = importlib.import_module(f"jobs.{job}")
    config_class = next(v for k, v in vars(module).items() if k.endswith("Config") and getattr(v, "__module__", "") == module.__name__
                        and "output_dir" in getattr(v, "__dataclass_fields__", {}))
    out = tmp_path / "out"
    base = [f"output_dir={out}"] + (["policy=null", "decoders=[{name: b, kind: bon, n: 2}]"] if job == "evaluate" else [])
    first = load_config(config_class, f"configs/{job}.yaml", base)
    out.mkdir()
    (out / file).write_text(yaml.safe_dump(to_dict(first)))
    (out / "results.json").write_text("{}")
    second = load_config(config_class, f"configs/{job}.yaml", base + [knob])
    key = knob.split("=")[0]
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the output directory was checked")

    monkeypatch.setattr("actors.cluster.init_ray", no_ray)
    with pytest.raises(StaleStateError, match=rf"{out} holds state made under a different config; differing keys: {key}: .* -> .*Set replace=true"):
        module.run(second)
    assert sorted(p.name for p in out.iterdir()) == sorted([file, "results.json"])
    assert claim_output(out, to_dict(load_config(config_class, f"configs/{job}.yaml", base + ["replace=true"])), False, file) == []
    assert [d.split(":")[0] for d in claim_output(out, to_dict(second), True, file)] == [key]
