"""jobs.evaluate: the KL it reports is the KL between the sampling processes actually run (temperature
and early end-of-sequence blocking on both sides), checked against exact enumeration on a tiny model;
it is exactly zero for pi = pi_0."""
import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from align.config import load_config
from align.sampling import continuation_logprobs
from align.stats import clustered_mean_stderr
from jobs.evaluate import EvalConfig, run, sample_and_score

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
    texts, logp, logp_ref = sample_and_score(pi, tok, pi0, prompts, cfg, seed=0)
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
    other = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={save_tiny_lm(tmp_path / 'other', seed=1)}", *common]))
    assert other["kl_to_pi0"] > 0.01 and other["kl_to_pi0_stderr"] > 0  # two random nets near uniform: small, not 0
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == other
    assert other["process"] == {"temperature": 1.0, "min_new_tokens": 3, "eos_token_id": 0}




def test_compare_policies_against_one_set_of_pi0_samples(tiny_lm_dir, tmp_path):
    """`compare`: each policy's row equals its own single evaluation (the same pi_0 samples, seeds),
    and the table and plot carry BoN's closed forms."""
    from align.bon import bon_kl_closed_form, bon_win_rate_closed_form
    from conftest import save_tiny_lm

    prompts = tmp_path / "p.txt"
    prompts.write_text("the movie was\na good film\n")
    other = save_tiny_lm(tmp_path / "other", seed=1)
    common = [f"reference={tiny_lm_dir}", f"prompts.source={prompts}", "sampling.n=4", "sampling.max_new_tokens=4",
              "sampling.min_new_tokens=4", "device=cpu", "reward.kind=brevity", "reward.max_words=3", "bon_n=[2, 8]"]
    alone = run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={other}", f"output_dir={tmp_path / 'a'}", *common]))
    run(load_config(EvalConfig, "configs/evaluate.yaml", [f"policy={tiny_lm_dir}", f"output_dir={tmp_path / 'b'}",
                                                          f"compare=[{{name: other, path: {other}}}]", *common]))
    table = json.loads((tmp_path / "b" / "comparison.json").read_text())
    rows = {r["name"]: r for r in table["policies"]}
    assert rows["other"]["kl_to_pi0"] == alone["kl_to_pi0"] and rows["other"]["win_rate_vs_pi0"] == alone["win_rate_vs_pi0"]
    assert rows[str(tiny_lm_dir)]["kl_to_pi0"] == 0.0
    assert [b["kl_to_pi0"] for b in table["bon_closed_form"]] == [bon_kl_closed_form(2), bon_kl_closed_form(8)]
    assert table["bon_closed_form"][1]["win_rate_vs_pi0"] == bon_win_rate_closed_form(8)
    assert (tmp_path / "b" / "pareto.png").stat().st_size > 0 and "BoN n=8" in (tmp_path / "b" / "comparison.md").read_text()
