"""Best-of-n survives dead actors and a dead driver: killed generators and scorers are replaced and
their batches redrawn with the same seeds, and a rerun after the driver is killed finishes the same
file an undisturbed run writes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from actors.best_of_n import scored_batches
from actors.generator import GeneratorPool
from actors.scorer import ScorerPool
from align.runtime.config import load_config
from align.runtime.runstate import StaleStateError
from jobs.bon import BonConfig, run

pytestmark = pytest.mark.ray

PROMPTS = [f"the {w} was" for w in ("movie", "plot", "cast", "music", "story", "acting", "ending", "film", "score", "pacing")]


def pid_of(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def collect(pool, scorers, kill=None):
    """Every batch's scored samples as plain tuples, keyed by prompt position; `kill(pool, scorers)`
    runs once, after the first batch is back and while others are in flight."""
    batches = {b: [p] for b, p in enumerate(PROMPTS)}
    out = {}
    for b, samples, _ in scored_batches(pool, scorers, batches, 4, 12, seed=3, min_new_tokens=12):
        (s,) = samples
        out[b] = (s.prompt, s.completion_ids, s.logprobs, s.rewards)
        if kill is not None:
            kill(pool, scorers)
            kill = None
    return out


@pytest.fixture(scope="module")
def undisturbed(ray_session, tiny_lm_dir):
    pool, scorers = GeneratorPool(str(tiny_lm_dir), num_actors=2), ScorerPool({"kind": "vader"})
    try:
        return collect(pool, scorers)
    finally:
        pool.shutdown()
        scorers.shutdown()


@pytest.mark.parametrize("how", ["ray.kill generator", "SIGKILL generator", "ray.kill scorer", "SIGKILL scorer"])
def test_killed_actor_is_replaced_and_its_batches_redrawn(ray_session, tiny_lm_dir, undisturbed, how):
    import ray

    def kill(pool, scorers):
        group = pool.group if "generator" in how else scorers.group
        actor = group.actors[0]
        if how.startswith("SIGKILL"):
            os.kill(pid_of(actor), signal.SIGKILL)
        else:
            ray.kill(actor)

    # One generator and one scorer, two batches in flight: the batches after the first all need the
    # killed actor, so it must be replaced. (The undisturbed run used two generators: same samples.)
    pool, scorers = GeneratorPool(str(tiny_lm_dir), num_actors=1), ScorerPool({"kind": "vader"})
    try:
        got = collect(pool, scorers, kill)
        replaced = (pool.group if "generator" in how else scorers.group).replacements
    finally:
        pool.shutdown()
        scorers.shutdown()
    assert replaced == 1
    assert sorted(got) == list(range(len(PROMPTS))), "every prompt exactly once"
    assert all(len(v[1]) == 4 for v in got.values()), "n samples each"
    assert got == undisturbed, "the same samples, log-probs and rewards as without the failure"


def bon_overrides(tiny_lm_dir, prompts_file, out):
    return [f"model.path={tiny_lm_dir}", f"prompts.source={prompts_file}", "prompts.repeats=1", "sampling.n=8",
            "sampling.max_new_tokens=64", "sampling.min_new_tokens=64", "pool.num_actors=1", "pool.batch_size=1",
            f"output_dir={out}"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(f"{a} {b}" for a in ("the", "a", "this", "that") for b in ("movie", "film", "plot", "cast", "story", "score")))
    return path


def test_killed_driver_rerun_finishes_the_same_file(ray_session, tiny_lm_dir, prompts_file, tmp_path):
    import ray

    whole = load_config(BonConfig, "configs/bon.yaml", bon_overrides(tiny_lm_dir, prompts_file, tmp_path / "whole"))
    run(whole)
    expected = (tmp_path / "whole" / "samples.jsonl").read_text()
    total = len(expected.splitlines())

    out = tmp_path / "killed"
    args = bon_overrides(tiny_lm_dir, prompts_file, out) + [f"ray_address={ray.get_runtime_context().gcs_address}"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.bon", "--config", "configs/bon.yaml", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial, deadline = out / "samples.partial.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and len(partial.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(partial.read_text().splitlines())
    assert not (out / "samples.jsonl").exists() and 3 <= written < total, "killed mid-run"

    again = load_config(BonConfig, "configs/bon.yaml", bon_overrides(tiny_lm_dir, prompts_file, out))
    metrics = run(again)
    assert (out / "samples.jsonl").read_text() == expected
    assert not partial.exists()
    assert metrics["new_tokens"] == (total - written) * 9 * 64, "only the missing prompts were sampled"


def test_rerun_under_another_config_names_the_keys(ray_session, tiny_lm_dir, prompts_file, tmp_path):
    base = bon_overrides(tiny_lm_dir, prompts_file, tmp_path / "o") + ["prompts.limit=2", "sampling.max_new_tokens=8",
                                                                       "sampling.min_new_tokens=8"]
    run(load_config(BonConfig, "configs/bon.yaml", base))
    first = (tmp_path / "o" / "samples.jsonl").read_text()
    # Same config, other pool size: reused as it is, nothing sampled.
    assert run(load_config(BonConfig, "configs/bon.yaml", base + ["pool.num_actors=2"]))["new_tokens"] == 0
    assert (tmp_path / "o" / "samples.jsonl").read_text() == first
    with pytest.raises(StaleStateError, match=r"sampling.n: 8 -> 4.*seed: 0 -> 1|seed: 0 -> 1.*sampling.n: 8 -> 4") as err:
        run(load_config(BonConfig, "configs/bon.yaml", base + ["sampling.n=4", "seed=1"]))
    assert "resume=never" in str(err.value)
    assert (tmp_path / "o" / "samples.jsonl").read_text() == first, "nothing was touched"
    metrics = run(load_config(BonConfig, "configs/bon.yaml", base + ["sampling.n=4", "resume=never"]))
    assert metrics["n"] == 4 and metrics["new_tokens"] == 2 * 5 * 8
    with pytest.raises(StaleStateError, match="nothing to resume"):
        run(load_config(BonConfig, "configs/bon.yaml", bon_overrides(tiny_lm_dir, prompts_file, tmp_path / "new") + ["resume=must"]))
