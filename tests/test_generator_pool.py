"""GeneratorPool on Ray: n completions per prompt, prompt order, seeds that do not depend on actors."""
import pytest

from actors.generator import Generator, GeneratorPool, batch_seed

pytestmark = pytest.mark.ray

PROMPTS = ["the movie was", "a good film", "the plot", "the music is lovely", "the cast", "a bad"]


def collect(pool, **kw):
    return [s for r in pool.sample(PROMPTS, progress=False, **kw) for s in r["samples"]]


def test_pool_n_per_prompt_in_order_and_reproducible(ray_session, tiny_lm_dir):
    kw = dict(n=3, max_new_tokens=5, batch_size=2, seed=11)
    two = GeneratorPool(str(tiny_lm_dir), num_actors=2)
    a, b = collect(two, **kw), collect(two, **kw)
    two.shutdown()
    assert [s.prompt for s in a] == PROMPTS
    assert all(len(s.completions) == 3 == len(s.logprobs) == len(s.num_tokens) for s in a)
    assert [s.completions for s in a] == [s.completions for s in b]
    one = GeneratorPool(str(tiny_lm_dir), num_actors=1)
    c = collect(one, **kw)
    one.shutdown()
    assert [s.completions for s in a] == [s.completions for s in c], "samples must not depend on the actor count"
    d = [s for r in [Generator(str(tiny_lm_dir)).sample(PROMPTS[i : i + 2], 3, 5, seed=batch_seed(11, i // 2)) for i in (0, 2, 4)] for s in r["samples"]]
    assert [s.completions for s in a] == [s.completions for s in d], "the pool runs the same Generator in-process"


def test_different_seed_different_samples(ray_session, tiny_lm_dir):
    pool = GeneratorPool(str(tiny_lm_dir), num_actors=1)
    a = collect(pool, n=4, max_new_tokens=8, batch_size=6, seed=0)
    b = collect(pool, n=4, max_new_tokens=8, batch_size=6, seed=1)
    pool.shutdown()
    assert [s.completions for s in a] != [s.completions for s in b]


def test_batch_seeds_are_distinct():
    seeds = {batch_seed(s, i) for s in range(20) for i in range(50)}
    assert len(seeds) == 1000


def test_device_auto_takes_a_gpu_only_where_ray_reserved_one(ray_session):
    """Ray hides no GPU from an actor that reserved none, so "auto" there means the CPU: for a pool that
    knows its reservation, and inside an actor (a Serve replica) that asks Ray; a named device is kept."""
    import ray

    from actors.cluster import reserved_device

    assert [reserved_device("auto", 0), reserved_device("auto", 1), reserved_device("cuda:1", 0)] == ["cpu", "auto", "cuda:1"]
    assert reserved_device("auto") == "auto", "the driver is not an actor: its own choice"

    @ray.remote(num_cpus=0)
    class Replica:
        def device(self):
            return reserved_device("auto")

    replica = Replica.remote()
    assert ray.get(replica.device.remote()) == "cpu"
    ray.kill(replica)
