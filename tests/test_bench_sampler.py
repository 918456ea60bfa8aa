"""The sampler benchmark runs end to end on a tiny grid: one row per cell, every method timed, files written."""
import json

from jobs.bench_sampler import METHODS, BenchSamplerConfig, ModelShape, run


def test_bench_sampler_smoke(tmp_path):
    cfg = BenchSamplerConfig(
        models=[ModelShape("tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=64)],
        prompt_lens=[4, 8], ns=[2], num_prompts=2, max_new_tokens=3, repeats=2, warmup_new_tokens=1,
        device="cpu", output_dir=str(tmp_path / "bench"),
    )
    result = run(cfg)
    rows = result["rows"]
    assert [(r["model"], r["prompt_len"], r["n"]) for r in rows] == [("tiny", 4, 2), ("tiny", 8, 2)]
    for r in rows:
        assert r["new_tokens"] == 2 * 2 * 3
        # The ratios are the table's arithmetic on the measured speeds (speeds themselves are not asserted).
        assert r["shared_over_hf"] == r["shared_tokens_per_s"] / r["hf_tokens_per_s"]
        assert r["shared_over_repeated"] == r["shared_tokens_per_s"] / r["repeated_tokens_per_s"]
        assert set(METHODS) == {"shared", "repeated", "hf"}
    saved = json.loads((tmp_path / "bench/results.json").read_text())
    assert len(saved["rows"]) == 2
    assert (tmp_path / "bench/results.md").read_text().count("| tiny |") == 2
    assert (tmp_path / "bench/config.yaml").is_file()
