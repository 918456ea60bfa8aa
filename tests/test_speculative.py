"""Speculative rejection: the schedule and the keep rule in closed form, the generator keeping exactly
the best partial completions, and jobs.bon with selection: speculative_rejection end to end."""
import json

import pytest
import torch

from align.runtime.config import ConfigError, load_config
from align.math.speculative import average_ranks, best_survives, expected_tokens, rank_correlation, rows_to_keep, survivors


def test_survivors_and_expected_tokens():
    assert survivors(64, 0.75, 2) == [16, 4]
    assert survivors(5, 0.5, 3) == [3, 2, 1]  # ceil at every step, never below 1
    assert survivors(4, 0.0, 2) == [4, 4]
    # 64 rows to token 4, 16 rows to token 8, 4 rows to token 24: 256 + 64 + 64.
    assert expected_tokens(64, 24, 0.75, [4, 8]) == 384
    assert expected_tokens(8, 24, 0.5, []) == 8 * 24  # no decision point: plain best-of-n
    with pytest.raises(ValueError, match="rejection_rate"):
        survivors(4, 1.0, 1)


def test_rows_to_keep_top_per_prompt_with_ties_and_an_exempt_row():
    r = torch.tensor([[0.1, 0.9, 0.5, 0.9, -5.0],
                      [3.0, 2.0, 1.0, 0.0, 9.0]])
    # Prompt 0: the two best are rows 1 and 3 (tied at 0.9, both kept); prompt 1: rows 0 and 1.
    assert rows_to_keep(r, 2).tolist() == [1, 3, 5, 9]
    # Tie at the cut: the lower index wins. The exempt last row stays whatever its score.
    assert rows_to_keep(r, 1, exempt_last=True).tolist() == [1, 4, 5, 9]
    assert rows_to_keep(torch.zeros(1, 4), 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="keep must be"):
        rows_to_keep(r, 5, exempt_last=True)


def test_rank_correlation_and_best_survives_by_hand():
    # Average ranks: the two 3s share ranks 2 and 3.
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[2.5, 0.0, 2.5, 1.0]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    y = torch.tensor([[10.0, 20.0, 35.0, 99.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    rho = rank_correlation(x, y)
    # Monotone: 1; reversed: -1; ranks (0.5, 0.5, 2.5, 2.5) against (0, 1, 2, 3): 4 / sqrt(4 * 5); constant: NaN.
    assert rho[:3].tolist() == pytest.approx([1.0, -1.0, 4 / (4 * 5) ** 0.5]) and rho[3].isnan()
    partial = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.9, 0.1, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0]])
    final = torch.tensor([[0.0, 1.0, 0.2, 0.3], [0.0, 0.1, 0.7, 0.3], [0.1, 0.5, 0.5, 0.2]])
    # Keep 2 by partial: rows 0 and 2 (prompts 0, 1); all tied -> rows 0 and 1 (prompt 2, whose best, 0.5, is row 1 or 2).
    assert best_survives(partial, final, 2).tolist() == [False, True, True]
    assert best_survives(partial, final, 4).all()


def test_generator_keeps_the_best_partial_completions(tiny_lm_dir):
    from actors.generator import Generator
    from align.rewards.vader import VaderReward
    from align.math.speculative import rows_to_keep as keep_rule

    gen = Generator(str(tiny_lm_dir))
    prompts, n, t = ["the movie was", "a bad"], 9, 3  # 8 candidates + the exempt pi_0 row
    spec = {"rejection_rate": 0.5, "decision_tokens": [t], "reward": {"kind": "vader"}}
    out = gen.sample(prompts, n, 6, stop_at_eos=False, seed=5, rejection=spec)
    # The same seed without rejection draws the same first t tokens for all n rows.
    head = gen.sample(prompts, n, t, stop_at_eos=False, seed=5)
    reward = VaderReward()
    for p, s, h in zip(prompts, out["samples"], head["samples"]):
        partial = reward([p] * n, h.completions).view(1, n)
        kept = keep_rule(partial, 4, exempt_last=True).tolist()
        assert [c[:t] for c in s.completion_ids] == [h.completion_ids[j] for j in kept]
        assert len(s.completions) == 5 and s.drawn_tokens == 8 * t + 4 * (6 - t) + 6  # the pi_0 row runs to the end
    assert out["new_tokens"] == 2 * (8 * t + 4 * (6 - t) + 6)


@pytest.mark.ray
def test_bon_job_with_speculative_rejection(ray_session, tiny_lm_dir, tmp_path):
    from jobs.bon import BonConfig, run

    prompts = ["the movie was", "a good film", "the plot"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    cfg = load_config(BonConfig, "configs/bon.yaml", [
        f"model.path={tiny_lm_dir}", f"prompts.source={tmp_path / 'p.jsonl'}", "prompts.column=text", "prompts.repeats=1",
        "sampling.n=8", "sampling.max_new_tokens=6", "sampling.min_new_tokens=6", "pool.num_actors=1",
        "selection=speculative_rejection", "speculative.rejection_rate=0.5", "speculative.decision_tokens=[2,4]",
        f"output_dir={tmp_path / 'out'}"])
    metrics = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        assert len(r["completions"]) == len(r["rewards"]) == 2  # 8 -> 4 -> 2 survivors
        assert r["chosen"] == int(torch.tensor(r["rewards"]).argmax())
        assert r["drawn_tokens"] == 8 * 2 + 4 * 2 + 2 * 2 and len(r["pi0_completion_ids"]) == 6
    assert metrics["selection"] == "speculative_rejection" and metrics["win_rate_closed_form"] is None
    assert metrics["drawn_tokens_per_prompt"] == 28 and metrics["new_tokens"] == 3 * (28 + 6)


@pytest.mark.parametrize("overrides, field, allowed", [
    (["selection=best"], "selection", "'argmax', 'rbon_kl', 'rbon_wd', 'speculative_rejection'"),
    (["speculative.rejection_rate=1"], "speculative.rejection_rate", "[0, 1)"),
    (["speculative.decision_tokens=[8,4]"], "speculative.decision_tokens", "strictly increasing"),
    (["selection=speculative_rejection", "speculative.decision_tokens=[30]"], "speculative.decision_tokens", "below sampling.max_new_tokens"),
    (["selection=speculative_rejection", "sampling.n=1"], "sampling.n", ">= 2"),
])
def test_speculative_config_errors(overrides, field, allowed):
    from jobs.bon import BonConfig

    with pytest.raises(ConfigError) as err:
        load_config(BonConfig, "configs/bon.yaml", overrides)
    assert err.value.field == field and allowed in str(err.value)


@pytest.mark.ray
def test_bench_speculative_table_and_plot(ray_session, tiny_lm_dir, tmp_path):
    from jobs.bench.speculative import BenchSpeculativeConfig, run

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in ["the movie was", "a bad", "the plot"]))
    cfg = load_config(BenchSpeculativeConfig, "configs/bench/speculative.yaml", [
        f"bon.model.path={tiny_lm_dir}", f"bon.prompts.source={tmp_path / 'p.jsonl'}", "bon.prompts.column=text",
        "bon.prompts.repeats=1", "bon.sampling.max_new_tokens=6", "bon.sampling.min_new_tokens=6", "bon.pool.num_actors=1",
        "ns=[2,4]", "reference_n=4", "settings=[{n: 4, rejection_rate: 0.5, decision_tokens: [2]}]", f"output_dir={tmp_path / 'b'}"])
    result = run(cfg)
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["BoN n=2", "BoN n=4", "SR n=4 rate=0.5 at 2"]
    assert [r["tokens_per_prompt"] for r in rows.values()] == [12, 24, 4 * 2 + 2 * 4]
    assert rows["SR n=4 rate=0.5 at 2"]["token_ratio"] == pytest.approx(16 / 24)
    assert rows["BoN n=4"]["reward_gap"] == 0 and rows["BoN n=4"]["token_ratio"] == 1
    assert (tmp_path / "b" / "reward_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "SR n=4 rate=0.5 at 2" in (tmp_path / "b" / "results.md").read_text()
    # The partial-score table: at the decision point 2 and at 4 (below max_new_tokens 6), over BoN n=4's candidates.
    quality = {q["tokens"]: q for q in result["partial_score_quality"]}
    assert sorted(quality) == [2, 4] and all(q["candidates"] == 4 and q["keep"] == 1 and q["chance"] == 0.25 for q in quality.values())
    assert all(0 <= q["best_kept"] <= 1 and (q["spearman"] is None or -1 <= q["spearman"] <= 1) for q in quality.values())
    # Recomputed by hand from the reference run's samples: partial VADER of the first 2 tokens.
    from align.engine.models import load_tokenizer
    from align.rewards.vader import VaderReward

    records = [json.loads(line) for line in (tmp_path / "b" / "bon_n4" / "samples.jsonl").read_text().splitlines()]
    tok, vader = load_tokenizer(str(tiny_lm_dir)), VaderReward()
    kept = []
    for r in records:
        partial = vader([r["prompt"]] * 4, tok.batch_decode([ids[:2] for ids in r["completion_ids"]], skip_special_tokens=True))
        top = int(torch.sort(partial.to(torch.float64), descending=True, stable=True).indices[0])
        kept.append(r["rewards"][top] == max(r["rewards"]))
    assert quality[2]["best_kept"] == pytest.approx(sum(kept) / len(kept))
    assert "Spearman(partial, final)" in (tmp_path / "b" / "results.md").read_text()
