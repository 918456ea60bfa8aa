"""jobs.evaluate: the KL it reports is the KL between the sampling processes actually run (temperature
and early end-of-sequence blocking on both sides), checked against exact enumeration on a tiny model;
it is exactly zero for pi = pi_0. Decoders (BoN, RBoN, DeRa over pi_0) are rows of the same comparison:
oracle BoN against its closed form, DeRa at lambda 0 / 1 against either model, RBoN-KL at its limits."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from align.runtime.config import ConfigError, load_config
from align.runtime.runstate import StaleStateError
from align.engine.sampling import continuation_logprobs
from align.math.stats import clustered_mean_stderr
from jobs.evaluate import DecoderSpec, EvalConfig, decoder_seed, run, run_decoder, sample_with_logprobs

V, EOS = 4, 0  # tokens: 0 = end of sequence, 1..3 = "a", "b", "c"


class CharTokenizer:
    """A character tokenizer over 'abc' with id 0 as end-of-sequence and pad: just what the sampler needs."""

    eos_token_id = pad_token_id = EOS

    def __call__(self, texts, return_tensors=None, padding=False):
        ids = [[" abc".index(ch) for ch in t] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([[0] * (width - len(x)) + x for x in ids]),
                "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(" abc"[i] for i in r if i != EOS) for r in rows]


def tiny_model(seed: int, sharpen: float):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=V, n_layer=1, n_embd=16, n_head=2, n_positions=16, bos_token_id=EOS, eos_token_id=EOS)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # far from uniform, so the KL is large
    return model


@torch.no_grad()
def process_distribution(model, prompt_ids, max_new, min_new, temperature):
    """{completion: probability} of the process by enumeration: every token from softmax(logits / T)
    with end-of-sequence at probability 0 before min_new; a sequence ends at EOS or at max_new."""
    out = {}

    def extend(prefix, p):
        if len(prefix) == max_new or (prefix and prefix[-1] == EOS):
            out[tuple(prefix)] = p
            return
        logits = model(input_ids=torch.tensor([prompt_ids + prefix])).logits[0, -1].double() / temperature
        if len(prefix) < min_new:
            logits[EOS] = -math.inf
        probs = logits.softmax(-1)
        for tok in range(V):
            if probs[tok] > 0:
                extend(prefix + [tok], p * probs[tok].item())

    extend([], 1.0)
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_matches_exact_enumeration_of_the_sampled_process(temperature):
    pi, pi0, tok = tiny_model(1, 4.0), tiny_model(0, 4.0), CharTokenizer()
    prompts, max_new, min_new = ["ab", "c", "bca"], 4, 2
    cfg = load_config(EvalConfig, None, ["sampling.n=3000", f"sampling.max_new_tokens={max_new}",
                                         f"sampling.min_new_tokens={min_new}", f"sampling.temperature={temperature}", "batch_size=3"])
    exact = []
    for prompt in prompts:
        ids = tok([prompt])["input_ids"][0].tolist()
        p, q = (process_distribution(m, ids, max_new, min_new, temperature) for m in (pi, pi0))
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-9) and p.keys() == q.keys()
        assert any(len(y) < max_new for y in p), "some sequences end early, at EOS"
        exact.append(sum(pv * (math.log(pv) - math.log(q[y])) for y, pv in p.items()))
        # continuation_logprobs (what the trainers and evaluate use) is the enumerated process, sequence by sequence.
        seqs = sorted(p)
        toks = torch.tensor([list(y) + [EOS] * (max_new - len(y)) for y in seqs])
        mask = torch.tensor([[i < len(y) for i in range(max_new)] for y in seqs])
        rep = torch.tensor([ids] * len(seqs))
        got = continuation_logprobs(pi, rep, torch.ones_like(rep), toks, mask, temperature, min_new, EOS)
        torch.testing.assert_close(got.double(), torch.tensor([math.log(p[y]) for y in seqs], dtype=torch.float64),
                                   atol=1e-5, rtol=0)
    texts, logp, logp_ref = sample_with_logprobs(pi, tok, pi0, prompts, cfg, seed=0)
    kl = logp - logp_ref  # (P * n,)
    mc = kl.double().view(len(prompts), -1).mean(1)  # per prompt
    se = kl.double().view(len(prompts), -1).std(1) / math.sqrt(cfg.sampling.n)
    exact = torch.tensor(exact, dtype=torch.float64)
    assert (exact > 0.05).all(), exact
    assert ((mc - exact).abs() < 4 * se).all(), (mc, exact, se)
    # The plain model's log-probs (temperature 1, nothing blocked) are not the process's.
    y, m = torch.tensor([[1, 2, 3, 1]]), torch.ones(1, 4, dtype=torch.bool)
    plain = continuation_logprobs(pi, *tok(prompts[:1]).values(), y, m)
    assert (plain - continuation_logprobs(pi, *tok(prompts[:1]).values(), y, m, temperature, min_new, EOS)).abs() > 1e-3


def test_clustered_standard_error():
    # Two prompts, n = 3 each: per-prompt means 2 and 6 -> mean 4, std of the means 2 sqrt(2), se = 2.
    mean, se = clustered_mean_stderr(torch.tensor([1.0, 2.0, 3.0, 5.0, 6.0, 7.0]), 3)
    assert mean == pytest.approx(4.0) and se == pytest.approx(2.0)
    # Identical samples within a prompt carry no extra information: the se does not shrink with n.
    _, se_rep = clustered_mean_stderr(torch.tensor([2.0] * 50 + [6.0] * 50), 50)
    assert se_rep == pytest.approx(2.0)


def test_kl_zero_against_itself_and_positive_otherwise(tiny_lm_dir, tmp_path):
    from conftest import save_tiny_lm

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "a good film", "the plot"]))
    common = [f"reference={tiny_lm_dir}", f"prompts.source={prompts}", "sampling.n=8", "sampling.max_new_tokens=6",
              "sampling.min_new_tokens=3", f"output_dir={tmp_path}", "device=cpu"]
    same = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={tiny_lm_dir}", *common]))
    assert same["kl_to_pi0"] == 0.0 and same["kl_to_pi0_stderr"] == 0.0 and same["samples"] == 24
    assert same["win_rate_vs_pi0"] == pytest.approx(0.5, abs=0.25)
    other_cfg = load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={save_tiny_lm(tmp_path / 'other', seed=1)}", *common])
    with pytest.raises(StaleStateError, match=r"differing keys: policy: .*tiny_lm.* -> .*other.*Set replace=true"):
        run(other_cfg)  # the first policy's results are there
    other = run(dataclasses.replace(other_cfg, replace=True))
    assert yaml.safe_load((tmp_path / "eval_config.yaml").read_text())["policy"] == other_cfg.policy
    assert other["kl_to_pi0"] > 0.01 and other["kl_to_pi0_stderr"] > 0  # two random nets near uniform: small, not 0
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == other
    assert other["process"] == {"temperature": 1.0, "min_new_tokens": 3, "eos_token_id": 0}




def test_compare_policies_against_one_set_of_pi0_samples(tiny_lm_dir, tmp_path):
    """`compare`: each policy's row equals its own single evaluation (the same pi_0 samples, seeds),
    and the table and plot carry BoN's closed forms."""
    from align.math.bon import bon_kl_closed_form, bon_win_rate_closed_form
    from conftest import save_tiny_lm

    prompts = tmp_path / "p.txt"
    prompts.write_text("the movie was\na good film\n")
    other = save_tiny_lm(tmp_path / "other", seed=1)
    common = [f"reference={tiny_lm_dir}", f"prompts.source={prompts}", "sampling.n=4", "sampling.max_new_tokens=4",
              "sampling.min_new_tokens=4", "device=cpu", "reward.kind=brevity", "reward.params.max_words=3", "bon_n=[2, 8]"]
    alone = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={other}", f"output_dir={tmp_path / 'a'}", *common]))
    run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={tiny_lm_dir}", f"output_dir={tmp_path / 'b'}",
                                                          f"compare=[{{name: other, path: {other}}}]", *common]))
    table = json.loads((tmp_path / "b" / "comparison.json").read_text())
    rows = {r["name"]: r for r in table["policies"]}
    assert rows["other"]["kl_to_pi0"] == alone["kl_to_pi0"] and rows["other"]["win_rate_vs_pi0"] == alone["win_rate_vs_pi0"]
    assert rows[str(tiny_lm_dir)]["kl_to_pi0"] == 0.0
    # Length, the off-target measure: every row read against the same pi_0 samples' (max_new_tokens 4).
    assert len({r["mean_words_pi0"] for r in rows.values()}) == 1 and all(0 < r["mean_words"] <= 4 for r in rows.values())
    assert [b["kl_to_pi0"] for b in table["bon_closed_form"]] == [bon_kl_closed_form(2), bon_kl_closed_form(8)]
    assert table["bon_closed_form"][1]["win_rate_vs_pi0"] == bon_win_rate_closed_form(8)
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 0 and "BoN n=8" in (tmp_path / "b" / "comparison.md").read_text()


def test_bon_decoder_with_the_gold_selector_matches_the_closed_form(small_task, tmp_path):
    """Oracle BoN over pi_0 (the default task's model), 20 prompts x 80 outputs: win rate n / (n + 1) at
    n = 4 and 1/2 at n = 1, each pair an independent Bernoulli, within 4 standard errors. The gold judge
    is a random reward model: continuous rewards, as the closed form assumes (VADER is not: a third of
    short completions score exactly 0, and ties counted 1/2 put BoN below n / (n + 1))."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from align.math.bon import bon_kl_closed_form

    rm, tok = tmp_path / "rm", AutoTokenizer.from_pretrained(small_task.policy_dir)
    torch.manual_seed(1)  # one layer, 16 wide: 12,800 texts to score, cheaply
    judge = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64,
                                                     num_labels=1, pad_token_id=tok.pad_token_id))
    judge.save_pretrained(rm)
    tok.save_pretrained(rm)
    cfg = load_config(EvalConfig, "configs/evaluate.yaml", [
        "policy=null", f"output_dir={tmp_path / 'out'}", f"reference={small_task.policy_dir}",
        f"prompts.source={small_task.root / 'prompts'}", "sampling.n=80", "sampling.max_new_tokens=8",
        "sampling.min_new_tokens=4", "reward.kind=classifier", f"reward.path={rm}", "reward.device=cpu", "device=cpu",
        "bon_n=[4]", "decoders=[{name: bon4, kind: bon, n: 4}, {name: bon1, kind: bon, n: 1}]"])
    rows = {r["name"]: r for r in run(cfg)["decoders"]}
    for name, n in (("bon4", 4), ("bon1", 1)):
        r, p = rows[name], n / (n + 1)
        assert r["samples"] == 20 * 80 and r["tie_rate"] < 0.01
        assert abs(r["win_rate_vs_pi0"] - p) < 4 * math.sqrt(p * (1 - p) / r["samples"]), (name, r["win_rate_vs_pi0"])
        # KL from the samples (F_x from the prompt's other 79 x n candidates) beside the closed form.
        assert r["kl_source"] == "sample estimate" and r["kl_closed_form"] == bon_kl_closed_form(n)
        assert abs(r["kl_to_pi0"] - bon_kl_closed_form(n)) < 4 * r["kl_to_pi0_stderr"] + 0.02, (name, r["kl_to_pi0"])
    assert not (tmp_path / "out" / "eval_metrics.json").exists()  # no policy, no policy metrics


def test_dera_decoder_at_lambda_0_is_pi0_and_at_1_the_aligned_model(tiny_lm_dir, tmp_path):
    """The same seed: lambda 0 draws pi_0's samples with KL exactly 0, lambda 1 the aligned model's,
    token for token, with exactly its log-probs (lerp is exact at both ends; full forwards on both sides)."""
    from align.engine.models import load_causal_lm
    from conftest import save_tiny_lm

    aligned_dir = str(save_tiny_lm(tmp_path / "aligned", seed=1))
    cfg = load_config(EvalConfig, None, ["sampling.n=4", "sampling.max_new_tokens=6", "sampling.min_new_tokens=2",
                                         "batch_size=2", "device=cpu"])  # two batches: seed + b on both sides
    (ref, tok), (aligned, _) = load_causal_lm(str(tiny_lm_dir), "cpu", "float32"), load_causal_lm(aligned_dir, "cpu", "float32")
    prompts, seed = ["the movie was", "a good film", "the plot"], decoder_seed(0, 0)
    at = {lam: run_decoder(DecoderSpec("d", "dera", lam=lam, aligned=aligned_dir), ref, tok, prompts, cfg, seed, None)
          for lam in (0.0, 1.0)}
    assert at[0.0].texts == sample_with_logprobs(ref, tok, None, prompts, cfg, seed)[0]
    assert torch.equal(at[0.0].logp, at[0.0].logp_ref)
    assert clustered_mean_stderr(at[0.0].logp - at[0.0].logp_ref, 4) == (0.0, 0.0)
    texts, logp, logp_ref = sample_with_logprobs(aligned, tok, ref, prompts, cfg, seed)
    assert at[1.0].texts == texts and torch.equal(at[1.0].logp, logp) and torch.equal(at[1.0].logp_ref, logp_ref)
    assert at[0.0].texts != at[1.0].texts and (logp - logp_ref).abs().max() > 0


def test_rbon_kl_decoder_at_beta_0_is_bon_and_at_large_beta_the_likeliest_candidate(tiny_lm_dir):
    from actors.scorer import make_scorer
    from align.engine.models import load_causal_lm

    cfg = load_config(EvalConfig, None, ["sampling.n=3", "sampling.max_new_tokens=5", "sampling.min_new_tokens=1",
                                         "batch_size=8", "device=cpu"])  # 8 // n = 2 prompts a batch
    ref, tok = load_causal_lm(str(tiny_lm_dir), "cpu", "float32")
    gold = make_scorer({"kind": "brevity", "max_words": 3})
    args = (ref, tok, ["the movie was", "a good film", "the plot"], cfg, 11, gold)
    bon = run_decoder(DecoderSpec("b", "bon", n=4), *args)
    at0 = run_decoder(DecoderSpec("k", "rbon_kl", n=4, beta=0.0), *args)
    big = run_decoder(DecoderSpec("h", "rbon_kl", n=4, beta=1e9), *args)
    assert bon.chosen.shape == (9,) and bon.candidate_logps.shape == (9, 4) and len(bon.texts) == 9
    assert torch.equal(bon.selector_reward, bon.candidate_rewards.max(1).values)  # the best of each n
    assert at0.texts == bon.texts and torch.equal(at0.chosen, bon.chosen)
    assert torch.equal(big.candidate_logps, bon.candidate_logps)  # the same seed, the same candidates
    likeliest = big.candidate_logps.gather(1, big.chosen[:, None])[:, 0]
    assert torch.equal(likeliest, big.candidate_logps.max(1).values) and not torch.equal(big.chosen, bon.chosen)


def test_decoders_alone_are_rows_of_the_comparison(tiny_lm_dir, tmp_path):
    """policy: null with one decoder of every kind: comparison.md/json and pareto.png list each, with
    its KL source; no eval_metrics.json."""
    from align.math.bon import bon_kl_closed_form
    from conftest import save_tiny_lm

    aligned = save_tiny_lm(tmp_path / "aligned", seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the movie was\na good film\nthe plot\n")
    decoders = (f"[{{name: best of 4, kind: bon, n: 4}}, {{name: rbon-kl, kind: rbon_kl, n: 3, beta: 0.5}}, "
                f"{{name: rbon-wd, kind: rbon_wd, n: 3, beta: 1.0}}, {{name: dera 0, kind: dera, lam: 0, aligned: {aligned}}}, "
                f"{{name: dera 0.5, kind: dera, lam: 0.5, aligned: {aligned}}}]")
    out = tmp_path / "out"
    table = run(load_config(EvalConfig, "configs/evaluate.yaml", [
        "policy=null", f"decoders={decoders}", f"output_dir={out}", f"reference={tiny_lm_dir}", f"prompts.source={prompts}",
        "sampling.n=2", "sampling.max_new_tokens=4", "sampling.min_new_tokens=2", "device=cpu", "reward.kind=brevity",
        "reward.params.max_words=3", "bon_n=[4]"]))
    assert table == json.loads((out / "comparison.json").read_text()) and table["policies"] == []
    rows = {r["name"]: r for r in table["decoders"]}
    assert list(rows) == ["best of 4", "rbon-kl", "rbon-wd", "dera 0", "dera 0.5"]
    # BoN's KL from its own candidates (brevity ties a lot: the reward-level law), beside the closed form.
    assert rows["best of 4"]["kl_source"] == "sample estimate" and rows["best of 4"]["kl_closed_form"] == bon_kl_closed_form(4)
    assert math.isfinite(rows["best of 4"]["kl_to_pi0"]) and rows["best of 4"]["kl_to_pi0_stderr"] >= 0
    assert all(rows[k]["kl_to_pi0"] is None and rows[k]["kl_source"] == "-" for k in ("rbon-kl", "rbon-wd"))
    assert rows["dera 0"]["kl_to_pi0"] == 0.0 and rows["dera 0"]["kl_to_pi0_stderr"] == 0.0
    assert rows["dera 0.5"]["kl_to_pi0"] > 0 and rows["dera 0.5"]["kl_source"] == "Monte Carlo"
    assert all(r["samples"] == 6 for r in rows.values())
    md = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and "closed form" in md and "BoN n=4 (closed form)" in md
    assert (out / "pareto.png").stat().st_size > 0 and not (out / "eval_metrics.json").exists()


@pytest.mark.parametrize("overrides, field, allowed", [
    (["decoders=[{name: d, kind: dera, lam: 0.5}]"], "decoders[0].aligned", "when kind is 'dera'"),
    (["decoders=[{name: b, kind: bon, n: 0}]"], "decoders[0].n", "an integer >= 1"),
    (["decoders=[{name: b, kind: bon}, {name: r, kind: rbon_kl, beta: -1}]"], "decoders[1].beta", ">= 0"),
    (["decoders=[{name: d, kind: dera, lam: .inf, aligned: m}]"], "decoders[0].lam", ">= 0"),
    (["decoders=[{name: b, kind: best}]"], "decoders[0].kind", "'bon'"),
    (["decoders=[{name: b, kind: bon, beta: 0.1}]"], "decoders[0].beta", "unless kind is rbon_kl or rbon_wd"),
    (["decoders=[{name: d, kind: dera, aligned: m, selector: {kind: vader}}]"], "decoders[0].selector", "null when"),
    (["decoders=[{kind: bon}]"], "decoders[0].name", "required"),
    (["decoders=[{name: b, kind: bon}, {name: b, kind: bon, n: 2}]"], "decoders", "distinct"),
    (["policy=null", "output_dir=out"], "policy", "compare or decoders"),
    (["policy=null", "decoders=[{name: b, kind: bon}]"], "output_dir", "policy is null"),
])
def test_decoder_config_errors_name_the_field(overrides, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(EvalConfig, "configs/evaluate.yaml", overrides)
    assert e.value.field == field and allowed in str(e.value)


def test_yaml_decoder_example_is_a_valid_config():
    """The commented `decoders:` example in configs/evaluate.yaml loads as it stands."""
    import yaml

    text = (Path(__file__).parent.parent / "configs" / "evaluate.yaml").read_text()
    example = text[text.index("# decoders:\n") :].split("\n")[1:]
    example = yaml.safe_load("\n".join(line[2:] for line in example if line.startswith("#   - ")))
    cfg = load_config(EvalConfig, "configs/evaluate.yaml", ["policy=null", "output_dir=o", f"decoders={json.dumps(example)}"])
    assert [d.kind for d in cfg.decoders] == ["bon", "bon", "bon", "rbon_kl", "dera"]
    assert cfg.decoders[2].selector.kind == "classifier" and cfg.decoders[4].lam == 0.5 and cfg.decoders[1].n == 16
