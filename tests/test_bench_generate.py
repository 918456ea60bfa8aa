"""The generation benchmark runs end to end on a tiny grid: one row per cell, every method timed, the
peak memory measured in fresh processes, files written."""
import json

import pytest

from jobs.bench.generate import METHODS, BenchGenerateConfig, ModelShape, cells, main, run


def test_bench_generate_smoke(tmp_path):
    cfg = BenchGenerateConfig(
        models=[ModelShape("tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=64)],
        prompt_lens=[4, 8], ns=[2], num_prompts=2, max_new_tokens=3, repeats=2, warmup_new_tokens=1,
        device="cpu", vllm="never", output_dir=str(tmp_path / "bench"),
    )
    result = run(cfg)
    rows = result["rows"]
    assert [(r["model"], r["prompt_len"], r["n"]) for r in rows] == [("tiny", 4, 2), ("tiny", 8, 2)]
    for r in rows:
        assert r["new_tokens"] == 2 * 2 * 3
        assert all(len(r[f"{m}_seconds_all"]) == 2 for m in METHODS)
        # The ratios are the table's arithmetic on the measured speeds (speeds themselves are not asserted).
        assert r["shared_over_hf"] == r["shared_prefix_tokens_per_s"] / r["hf_tokens_per_s"]
        assert r["shared_over_expanded"] == r["shared_prefix_tokens_per_s"] / r["expanded_tokens_per_s"]
    [mem] = result["memory"]
    assert (mem["prompt_len"], mem["n"]) == (8, 2)
    assert all(mem[f"{m}_peak_mb"] >= 0 for m in ("shared_prefix", "expanded", "hf"))
    assert result["env"]["torch"] and result["env"]["cpu"]
    saved = json.loads((tmp_path / "bench/results.json").read_text())
    assert len(saved["rows"]) == 2
    md = (tmp_path / "bench/results.md").read_text()
    assert md.count("| tiny |") == 3 and "Peak memory" in md


def test_per_model_grid_and_bad_config(tmp_path, capsys):
    cfg = BenchGenerateConfig(models=[ModelShape("a", 1, 32, 2, 64), ModelShape("b", 1, 32, 2, 64, ns=[8], prompt_lens=[5])],
                              prompt_lens=[4], ns=[2, 3])
    got = [(s.name, L, n) for s, L, n in cells(cfg)]
    assert got == [("a", 4, 2), ("a", 4, 3), ("b", 5, 8)]
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/bench/generate.yaml", "max_new_tokens=1", f"output_dir={tmp_path}"])
    assert e.value.code == 2
    assert "max_new_tokens" in capsys.readouterr().err and not any(tmp_path.iterdir())


@pytest.mark.ray
def test_bench_ray_smoke(ray_session, tiny_lm_dir, tmp_path):
    from jobs.bench.ray_overhead import BenchRayConfig, run

    (tmp_path / "p.txt").write_text("the movie was\na bad\nthe plot\n")
    result = run(BenchRayConfig(model=str(tiny_lm_dir), prompts=str(tmp_path / "p.txt"), quick=True, actors=[1],
                                profile_seconds=2, output_dir=str(tmp_path / "r")))
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["in_process", "pool_1", "serve_call", "serve_call_colocated", "serve_sequential",
                          "serve_concurrent"]
    # Every method draws the same number of tokens (3 prompts x n 2 x 4 tokens, no stop); Serve over HTTP too.
    assert {r["new_tokens"] for r in rows.values()} == {3 * 2 * 4}
    assert rows["in_process"]["vs_in_process"] == 1.0
    md = (tmp_path / "r" / "results.md").read_text()
    assert "pool_1" in md and "serve_concurrent" in md and "| GET /healthz: HTTP proxy + ingress |" in md
    costs = {c["part"]: c["ms"] for c in result["request_costs"]}
    assert len(costs) == 7 and all(ms > 0 for ms in costs.values())
    assert [c["vs_in_process"] for c in result["request_costs"] if "vs_in_process" in c][0] == 1.0
    # py-spy attached to the four Serve processes and sampled them; shares are of each one's samples.
    profile = {p["process"]: p for p in result["profile"]}
    assert sorted(profile) == ["HTTP proxy", "generator", "ingress (Api)", "scorer"], result["profile"]
    assert all(p["samples"] > 0 and p["cpu_ms_per_request"] > 0 for p in profile.values())
    assert "sweetspot" in profile["generator"]["by_owner"] and "py-spy on the Serve processes" in md


def test_frame_owner_names_whose_code_a_py_spy_frame_is():
    from jobs.bench.ray_overhead import frame_owner

    site = "/x/.venv/lib/python3.11/site-packages"
    assert frame_owner("sample_together (serve/batching.py:57)") == "sweetspot"  # relative to the repo root
    assert frame_owner("sample (/repo/actors/generator.py:140)") == "sweetspot"
    assert frame_owner("Module._call_impl (torch/nn/modules/module.py:1789)") == "torch"
    assert frame_owner("GPT2Model.forward (transformers/models/gpt2/modeling_gpt2.py:608)") == "torch"
    assert frame_owner("handle (ray/serve/handle.py:551)") == "ray"  # Ray's serve package is not ours
    assert frame_owner(f"main_loop ({site}/ray/_private/worker.py:946)") == "ray"
    assert frame_owner("app (fastapi/routing.py:161)") == "web stack"
    assert frame_owner(f"post ({site}/serve/app.py:1)") == "other"  # an installed package named serve
    assert frame_owner("Thread.run (threading.py:982)") == "python stdlib"
    assert frame_owner("_worker (concurrent/futures/thread.py:83)") == "python stdlib"
    assert frame_owner("run (/usr/lib/python3.11/threading.py:982)") == "python stdlib"
    assert frame_owner("get (requests/api.py:73)") == "other"
