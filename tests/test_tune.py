"""Sweeps (tune/): search spaces from YAML and their named errors, the reward-KL Pareto front, and
the DeRa lambda sweep end to end at toy size (metrics against a direct computation, resume without
rerunning finished trials, a changed knob refused, Optuna's searcher)."""
import json

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
    from align.config import ConfigError
    from tune.space import parse_space

    with pytest.raises(ConfigError, match=f"'{field}'"):
        parse_space(search, {"lam": (0.0, None)})


def test_pareto_front():
    from align.pareto import pareto_front

    kl = [0.0, 1.0, 2.0, 2.0, 3.0, 1.5]
    reward = [0.1, 0.5, 0.4, 0.7, 0.7, 0.5]
    # (2, 0.4) is beaten by (1, 0.5); (3, 0.7) by (2, 0.7); (1.5, 0.5) by (1, 0.5)
    assert pareto_front(kl, reward) == [True, True, False, True, False, False]
    assert pareto_front([1.0, 1.0], [0.5, 0.5]) == [True, True]


@pytest.fixture(scope="module")
def sweep_setup(tiny_lm_dir, tmp_path_factory):
    from conftest import save_tiny_lm

    root = tmp_path_factory.mktemp("tune_dera")
    aligned = save_tiny_lm(root / "aligned", seed=7)
    (root / "prompts.txt").write_text("the movie was\na bad\nthe plot\n")
    return root, aligned


def sweep_config(root, tiny_lm_dir, aligned, *overrides):
    from align.config import load_config
    from tune.dera import TuneDeraConfig

    return load_config(TuneDeraConfig, "configs/tune_dera.yaml", [
        f"reference={tiny_lm_dir}", f"aligned={aligned}", f"prompts.source={root / 'prompts.txt'}",
        "search={lam: {grid: [0.0, 1.0, 2.0]}}", "sampling.n=2", "sampling.max_new_tokens=4",
        "sampling.min_new_tokens=4", "device=cpu", "reward.kind=brevity", "reward.max_words=4",
        f"output_dir={root / 'out'}", *overrides])


@pytest.mark.ray
def test_dera_sweep_metrics_resume_and_stale_config(ray_session, tiny_lm_dir, sweep_setup):
    from actors.generator import Generator, prompt_seeds
    from actors.scorer import make_scorer
    from align.runstate import StaleStateError
    from tune.dera import run

    root, aligned = sweep_setup
    cfg = sweep_config(root, tiny_lm_dir, aligned)
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
def test_dera_sweep_with_optuna(ray_session, tiny_lm_dir, sweep_setup):
    from tune.dera import run

    root, aligned = sweep_setup
    cfg = sweep_config(root, tiny_lm_dir, aligned, "searcher=optuna", "search={lam: {uniform: [0.5, 1.5]}}",
                       "num_samples=2", "objective=reward_at_kl", "kl_budget=1.0", f"output_dir={root / 'optuna'}")
    result = run(cfg)
    assert len(result["trials"]) == 2 and all(0.5 <= r["lam"] <= 1.5 for r in result["trials"])
    for r in result["trials"]:
        assert r["objective"] == pytest.approx(r["gold"] - 1000.0 * max(0.0, r["kl"] - 1.0))
