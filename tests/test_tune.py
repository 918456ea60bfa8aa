"""Sweeps (tune/): search spaces from YAML and their named errors, the reward-KL Pareto front, and
the DeRa lambda sweep end to end at toy size (metrics against a direct computation, resume without
rerunning finished trials, a changed knob refused, Optuna's searcher)."""
import json
import math

import pytest
import torch


def test_parse_space_kinds():
    from ray.tune.search.sample import Categorical, Float

    from tune.space import grid_size, parse_space

    space = parse_space({"lam": {"grid": [0, 1]}, "beta": {"loguniform": [0.01, 1]}, "alpha": {"uniform": [0, 1]},
                         "tau": {"choice": [1, 2]}, "n": 4}, {k: (0, None) for k in ("lam", "beta", "alpha", "tau", "n")})
    assert space["lam"] == {"grid_search": [0, 1]} and space["n"] == 4
    assert isinstance(space["beta"], Float) and (space["beta"].lower, space["beta"].upper) == (0.01, 1)
    assert isinstance(space["beta"].get_sampler(), Float._LogUniform)
    assert isinstance(space["alpha"].get_sampler(), Float._Uniform) and isinstance(space["tau"], Categorical)
    assert grid_size({"lam": {"grid": [0, 1, 2]}, "b": {"grid": [1, 2]}, "c": 3}) == 6


@pytest.mark.parametrize("search, field", [
    ({"lam": {"grid": [-0.5, 1]}}, "search.lam.grid"),
    ({"lam": {"uniform": [1, 1]}}, "search.lam.uniform"),
    ({"lam": {"loguniform": [0, 1]}}, "search.lam.loguniform"),
    ({"lam": {"grid": []}}, "search.lam.grid"),
    ({"lam": {"normal": [0, 1]}}, "search.lam"),
    ({"lam": {"grid": [1], "choice": [2]}}, "search.lam"),
    ({"lam": "big"}, "search.lam"),
    ({"beta": 1.0}, "search.beta"),
    ({}, "search"),
])
def test_parse_space_errors_name_the_knob(search, field):
    from align.runtime.config import ConfigError
    from tune.space import parse_space

    with pytest.raises(ConfigError, match=f"'{field}'"):
        parse_space(search, {"lam": (0.0, None)})


def test_pareto_front():
    from align.math.pareto import pareto_front

    kl = [0.0, 1.0, 2.0, 2.0, 3.0, 1.5]
    reward = [0.1, 0.5, 0.4, 0.7, 0.7, 0.5]
    # (2, 0.4) is beaten by (1, 0.5); (3, 0.7) by (2, 0.7); (1.5, 0.5) by (1, 0.5)
    assert pareto_front(kl, reward) == [True, True, False, True, False, False]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]


def test_an_unreadable_searcher_state_refuses_to_resume_by_name(tmp_path):
    """A searcher state cut short (a driver killed while Tune copied it to storage) stops the resume
    naming the file and resume=never; the newest readable one passes, older ones are not read."""
    import ray.cloudpickle as cloudpickle

    from align.runtime.config import ConfigError
    from tune.sweep import check_searcher_state

    whole = cloudpickle.dumps({"trials": ["a", "b"], "lam": [0.0, 1.0]})
    (tmp_path / "basic-variant-state-2026-01-01.json").write_bytes(whole[:7])
    (tmp_path / "basic-variant-state-2026-01-02.json").write_bytes(whole)
    check_searcher_state(tmp_path)
    (tmp_path / "basic-variant-state-2026-01-03.json").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="never for this sweep") as err:
        check_searcher_state(tmp_path)
    assert err.value.field == "resume" and "basic-variant-state-2026-01-03.json" in str(err.value)


@pytest.fixture(scope="module")
def sweep_setup(tiny_lm_dir, tmp_path_factory):
    from conftest import save_tiny_lm

    root = tmp_path_factory.mktemp("tune_dera")
    aligned = save_tiny_lm(root / "aligned", seed=7)
    (root / "prompts.txt").write_text("the movie was\na bad\nthe plot\n")
    return root, aligned


def sweep_config(root, tiny_lm_dir, aligned, *overrides):
    from align.runtime.config import load_config
    from tune.dera import TuneDeraConfig

    return load_config(TuneDeraConfig, "configs/tune_dera.yaml", [
        f"reference={tiny_lm_dir}", f"aligned={aligned}", f"prompts.source={root / 'prompts.txt'}",
        "search={lam: {grid: [0.0, 1.0, 2.0]}}", "sampling.n=2", "sampling.max_new_tokens=4",
        "sampling.min_new_tokens=4", "device=cpu", "reward.kind=brevity", "reward.params.max_words=4",
        f"output_dir={root / 'out'}", *overrides])


@pytest.mark.ray
def test_dera_sweep_metrics_resume_and_stale_config(ray_session, tiny_lm_dir, sweep_setup):
    from actors.generator import Generator, prompt_seeds
    from actors.scorer import make_scorer
    from align.runtime.runstate import StaleStateError
    from tune.dera import run

    root, aligned = sweep_setup
    cfg = sweep_config(root, tiny_lm_dir, aligned, "tracking=tensorboard+mlflow")
    result = run(cfg)
    rows = {r["lam"]: r for r in result["trials"]}
    assert set(rows) == {0.0, 1.0, 2.0}
    # lambda 0: its pi_0 baseline is the same samples (common random numbers)
    assert rows[0.0]["win_rate_vs_pi0"] == 0.5 and abs(rows[0.0]["kl"]) < 1e-4
    # lambda 1's gold reward is the aligned model's own samples, seeded per prompt, scored (brevity)
    prompts = ["the movie was", "a bad", "the plot"]
    gen = Generator(str(tiny_lm_dir), device="cpu", aligned_path=str(aligned))
    samples = make_scorer({"kind": "brevity", "max_words": 4}).score_samples(
        gen.sample(prompts, 2, 4, min_new_tokens=4, lam=1.0, seeds=prompt_seeds(0, 3))["samples"])
    want = torch.tensor([r for s in samples for r in s.rewards], dtype=torch.float64).mean().item()
    assert rows[1.0]["gold"] == pytest.approx(want, abs=1e-9)
    assert rows[1.0]["kl"] > 0 and rows[2.0]["kl"] > rows[1.0]["kl"]
    assert len({r["gold"] for r in rows.values()}) > 1, "the rewards must tell the trials apart"

    out = root / "out"
    table = (out / "results.md").read_text()
    assert table.index("| 0 |") > 0 and (out / "pareto.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())["trials"]
    assert [t["objective"] for t in saved] == sorted((t["objective"] for t in saved), reverse=True)
    assert next(t for t in saved if t["lam"] == 0.0)["pareto"]  # the lowest KL is always on the front
    assert len((out / "results.csv").read_text().strip().splitlines()) == 4
    # Tune's own TensorBoard events (tensorboardX is a dependency), one per trial, read back from the files.
    from conftest import tensorboard_scalars

    gold = [v for _, v in tensorboard_scalars(out / "tune" / "dera")["ray/tune/gold"]]
    assert sorted(gold) == pytest.approx(sorted(r["gold"] for r in rows.values()), rel=1e-6)
    # And an MLflow run per trial (tracking=tensorboard+mlflow), in the sweep's file store.
    from mlflow.tracking import MlflowClient

    from actors.tracking import mlflow_uri

    client = MlflowClient(tracking_uri=mlflow_uri(out))
    runs = client.search_runs([client.get_experiment_by_name("dera").experiment_id])
    assert sorted(float(r.data.params["lam"]) for r in runs) == [0.0, 1.0, 2.0]
    assert sorted(r.data.metrics["gold"] for r in runs) == pytest.approx(sorted(r["gold"] for r in rows.values()), rel=1e-6)

    # A rerun under the same config resumes: no trial runs again, the same table comes back.
    trial_files = sorted((out / "tune" / "dera").glob("*/result.json"))
    reports = [p.read_text() for p in trial_files]  # each holds its trial's timestamp and run time
    again = run(cfg)
    assert sorted(trial_files) == sorted((out / "tune" / "dera").glob("*/result.json"))
    assert [p.read_text() for p in trial_files] == reports
    assert {r["lam"]: r["gold"] for r in again["trials"]} == {k: r["gold"] for k, r in rows.items()}

    # Another n is another sweep: refused by name unless resume=never.
    with pytest.raises(StaleStateError, match="sampling.n"):
        run(sweep_config(root, tiny_lm_dir, aligned, "sampling.n=3"))


@pytest.mark.ray
@pytest.mark.slow
def test_dera_sweep_killed_mid_run_resumes_without_rerunning_finished_trials(ray_cluster, ray_session, tiny_lm_dir,
                                                                             sweep_setup, tmp_path):
    """The sweep's driver, a process of its own on the cluster, is killed (SIGKILL) once two of its four
    trials have finished. The same command then restores the experiment: the finished trials are
    kept as they were, never run again, and the others run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tune.dera import run

    root, aligned = sweep_setup
    extra = ["search={lam: {grid: [0.0, 0.5, 1.0, 2.0]}}", "max_concurrent_trials=1",
             f"output_dir={tmp_path / 'out'}"]
    cfg = sweep_config(root, tiny_lm_dir, aligned, *extra)
    trials = tmp_path / "out" / "tune" / "dera"

    def finished():
        """{trial dir: its result.json} of the trials the newest experiment state (what a restore
        reads) records as terminated."""
        states = sorted(trials.glob("experiment_state-*.json"))
        if not states:
            return {}
        try:
            data = json.loads(states[-1].read_text())
        except ValueError:  # being written
            return {}
        done = [json.loads(t) for t, _ in data["trial_data"]]
        return {t["relative_logdir"]: (trials / t["relative_logdir"] / "result.json").read_text()
                for t in done if t["status"] == "TERMINATED"}

    def searcher_state_readable() -> bool:
        import pickle

        import cloudpickle

        states = sorted(trials.glob("basic-variant-state-*.json"))
        try:
            with open(states[-1], "rb") as f:
                cloudpickle.load(f)
            return True
        except (IndexError, EOFError, OSError, ValueError, pickle.UnpicklingError):
            return False

    args = [f"reference={tiny_lm_dir}", f"aligned={aligned}", f"prompts.source={root / 'prompts.txt'}",
            "sampling.n=2", "sampling.max_new_tokens=4", "sampling.min_new_tokens=4", "device=cpu", "reward.kind=brevity",
            "reward.params.max_words=4", f"ray_address={ray_cluster[0]}", *extra]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # the experiment state is saved after every result
    proc = subprocess.Popen([sys.executable, "-m", "tune.dera", "--config", "configs/tune_dera.yaml", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        # Killed between writes: Tune copies its searcher state to storage without a rename, so a kill
        # inside that copy leaves it truncated and the restore fails (a known gap, not this test's case).
        while len(finished()) < 2 or not searcher_state_readable():
            assert proc.poll() is None and time.time() < deadline, "the sweep ended or stalled before it was killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = finished()
    assert 2 <= len(before) < 4
    result = run(cfg)
    after = finished()
    assert sorted(t["lam"] for t in result["trials"]) == [0.0, 0.5, 1.0, 2.0] and len(after) == 4
    assert {k: after[k] for k in before} == before, "finished trials are kept, not run again"
    assert all(len(text.strip().splitlines()) == 1 for text in after.values()), "each trial reported once"


@pytest.mark.ray
def test_dera_sweep_with_optuna(ray_session, tiny_lm_dir, sweep_setup):
    from tune.dera import run

    root, aligned = sweep_setup
    cfg = sweep_config(root, tiny_lm_dir, aligned, "searcher=optuna", "search={lam: {uniform: [0.5, 1.5]}}",
                       "num_samples=2", "objective=reward_at_kl", "kl_budget=1.0", f"output_dir={root / 'optuna'}")
    result = run(cfg)
    assert len(result["trials"]) == 2 and all(0.5 <= r["lam"] <= 1.5 for r in result["trials"])
    for r in result["trials"]:
        assert r["objective"] == pytest.approx(r["gold"] - 1000.0 * max(0.0, r["kl"] - 1.0))


@pytest.mark.ray
@pytest.mark.slow
def test_train_sweep_asha_evaluates_and_keeps_the_best(ray_session, tiny_lm_dir, tmp_path):
    """Two DPO trials of 4 steps, one after the other, each training in its trial's own process
    (workers.num_workers 0), validation every 2, ASHA with a grace of 2
    steps. beta 1 runs first and lowers the validation loss faster than beta 0.1 does: at the step-2
    rung beta 0.1 lags, and ASHA stops it there, unevaluated. beta 1 finishes, is evaluated (gold,
    win rate, KL) and is the one trial that keeps its model."""
    from align.runtime.config import load_config
    from tune.train import TuneTrainConfig, run

    pairs = tmp_path / "pairs.jsonl"
    rows = [("the movie was", " great .", " awful ."), ("a good film", " lovely .", " bad ."),
            ("the plot", " is fine .", " is weak ."), ("the music is", " lovely .", " terrible .")]
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\na bad\n")
    overrides = [f"model={tiny_lm_dir}", f"data.source={pairs}", "data.eval_split=test", "train.steps=4",
                 "train.batch_size=2", "train.eval_every=2", "train.run.log_every=2", "train.run.checkpoint_every=4",
                 "train.optim.lr=1e-2", "train.workers.num_workers=0", "dpo.ref_update=none"]
    cfg = load_config(TuneTrainConfig, "configs/tune_train.yaml", [
        f"overrides={json.dumps(overrides)}", "search={dpo.beta: {grid: [1.0, 0.1]}}", "metric=val/loss", "mode=min", "asha.grace_period=2",
        f"evaluate.prompts.source={prompts}", "evaluate.n=2", "evaluate.reward.kind=brevity", "evaluate.reward.params.max_words=3",
        "keep_best=1", f"output_dir={tmp_path / 'sweep'}"])
    result = run(cfg)
    trials = result["trials"]
    assert sorted(t["dpo.beta"] for t in trials) == [0.1, 1.0] and result["failed"] == 0
    by_beta = {t["dpo.beta"]: t for t in trials}
    done, stopped = by_beta[1.0], by_beta[0.1]
    assert not done["stopped_early"] and done["steps"] == 4 and 0 <= done["win_rate_vs_pi0"] <= 1 and done["kl"] > 0
    assert stopped["stopped_early"] and stopped["steps"] == 2 and "kl" not in stopped
    assert all(math.isfinite(t["val/loss"]) for t in trials)
    kept = [t for t in trials if (tmp_path / "sweep" / "trials" / t["trial_id"] / "model").is_dir()]
    assert kept == [done] and result["best"] is done
    assert (tmp_path / "sweep" / "results.csv").is_file() and (tmp_path / "sweep" / "pareto.png").is_file()


@pytest.mark.ray
def test_train_sweep_that_cannot_place_a_trial_stops_naming_the_knob(ray_session, tmp_path):
    """The session's cluster has 4 CPUs: a trial whose 8 workers need 8 would wait forever."""
    from align.runtime.config import ConfigError, load_config
    from tune.train import TuneTrainConfig, run

    cfg = load_config(TuneTrainConfig, "configs/tune_train.yaml", [
        "overrides=[train.eval_every=2, data.eval_split=test, train.workers.num_workers=8, train.batch_size=8]",
        f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="cpus_per_worker.*4 CPUs"):
        run(cfg)
    assert not (tmp_path / "trials").exists()
