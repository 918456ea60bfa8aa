"""jobs.evaluate: the Monte Carlo KL is exactly zero for pi = pi_0 and positive for another policy."""
import json

from align.config import load_config
from jobs.evaluate import EvalConfig, run


def test_kl_zero_against_itself_and_positive_otherwise(tiny_lm_dir, tmp_path):
    from conftest import save_tiny_lm

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "a good film", "the plot"]))
    common = [f"reference={tiny_lm_dir}", f"prompts.source={prompts}", "sampling.n=8", "sampling.max_new_tokens=6",
              "sampling.min_new_tokens=6", f"output_dir={tmp_path}", "device=cpu"]
    same = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={tiny_lm_dir}", *common]))
    assert abs(same["kl_to_pi0"]) < 1e-4 and same["samples"] == 24
    other = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={save_tiny_lm(tmp_path / 'other', seed=1)}", *common]))
    assert other["kl_to_pi0"] > 1e-3  # two random nets, both near uniform: small but clearly not zero
    assert 0.0 <= other["win_rate_vs_pi0"] <= 1.0
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == other
    assert other["kl_to_pi0_stderr"] > 0
