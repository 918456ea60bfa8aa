"""Evaluate a policy against pi_0 as the papers do (docs/algorithms.md, Evaluation): win rate of one policy
sample over one pi_0 sample under the gold reward (ties 1/2), and KL(pi || pi_0) by Monte Carlo,
E_{y ~ pi}[log pi(y|x) - log pi_0(y|x)], with its standard error.

    python -m jobs.evaluate --config configs/evaluate.yaml policy=outputs/bonbon/model
    python -m jobs.evaluate --config configs/evaluate.yaml policy=outputs/vbon/model \
        'compare=[{name: bonbon, path: outputs/bonbon/model}, {name: dpo, path: outputs/dpo/model}]'

With `compare`, every policy is evaluated against the same pi_0 samples and the run also writes
comparison.md/json and pareto.png: gold win rate against KL per policy, beside best-of-n's closed
forms for n in `bon_n` (win rate n / (n + 1), KL log n - (n - 1) / n), the reward-KL front policies
are judged against.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from align.config import require, run_job
from align.runstate import write_atomic
from align.stats import clustered_mean_stderr
from jobs.bon import PromptsConfig, RewardConfig, SamplingConfig

log = logging.getLogger("sweetspot.evaluate")


@dataclass
class NamedPolicy:
    name: str  # the label in the table and the plot
    path: str  # a model directory or HF name


@dataclass
class EvalConfig:
    policy: str = "outputs/bonbon/model"  # the trained policy (directory or HF name)
    policy_name: str | None = None  # its label in the comparison (default: its path)
    compare: list[NamedPolicy] = field(default_factory=list)  # more policies: a comparison table and pareto.png
    bon_n: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])  # BoN closed forms on the plot
    reference: str = "default"  # pi_0
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))  # n samples per prompt from each
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    output_dir: str | None = None  # where metrics.json goes; null = next to the policy

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)


def process_of(cfg: EvalConfig, tokenizer) -> dict:
    """The sampling process both models are run as (docs/algorithms.md, "What KL(pi || pi_0) measures")."""
    eos = tokenizer.eos_token_id if cfg.sampling.stop_at_eos else None
    return {"temperature": cfg.sampling.temperature, "min_new_tokens": cfg.sampling.min_new_tokens if eos is not None else 0,
            "eos_token_id": eos}


def sample_and_score(model, tokenizer, ref_model, prompts, cfg: EvalConfig, seed: int):
    """n samples per prompt from `model`, as texts, with log pi(y|x) and log pi_0(y|x) per sample, both
    under the same sampling process and by the same full forward (so pi = pi_0 gives exactly 0)."""
    from align.models import encode_prompts
    from align.sampling import continuation_logprobs, sample_n

    device = next(model.parameters()).device
    process = process_of(cfg, tokenizer)
    n = cfg.sampling.n
    texts, logp, logp_ref = [], [], []
    for b, i in enumerate(range(0, len(prompts), cfg.batch_size)):
        ids, mask = encode_prompts(tokenizer, prompts[i : i + cfg.batch_size], device)
        s = sample_n(model, ids, mask, n, cfg.sampling.max_new_tokens, cfg.sampling.temperature,
                     process["min_new_tokens"], process["eos_token_id"], tokenizer.pad_token_id,
                     torch.Generator(device=device).manual_seed(seed + b))
        texts += tokenizer.batch_decode(s.completion_ids(), skip_special_tokens=True)
        if ref_model is not None:
            rep_ids, rep_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            logp.append(continuation_logprobs(model, rep_ids, rep_mask, s.tokens, s.mask, **process).cpu())
            logp_ref.append(continuation_logprobs(ref_model, rep_ids, rep_mask, s.tokens, s.mask, **process).cpu())
    if ref_model is None:
        return texts, None, None
    return texts, torch.cat(logp), torch.cat(logp_ref)


def run(cfg: EvalConfig) -> dict:
    from actors.scorer import make_scorer
    from align.data import load_prompts
    from align.models import load_causal_lm
    from align.paths import resolve_input, resolve_output
    from jobs.bon import reward_spec

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    ref, ref_tok = load_causal_lm(cfg.reference, cfg.device, "float32")
    scorer = make_scorer(reward_spec(cfg.reward))
    rep = [p for p in prompts for _ in range(cfg.sampling.n)]
    ref_texts, _, _ = sample_and_score(ref, ref_tok, None, prompts, cfg, cfg.seed + 10_000)
    r_ref = scorer.score(rep, ref_texts).mean  # one set of pi_0 samples for every policy

    out = resolve_output(cfg.output_dir) if cfg.output_dir else resolve_input(cfg.policy).parent
    rows = []
    for name, path in [("policy", cfg.policy), *((c.name, c.path) for c in cfg.compare)]:
        policy, tok = load_causal_lm(path, cfg.device, "float32")
        if tok.get_vocab() != ref_tok.get_vocab():
            raise ValueError(f"{name}: policy and reference must share a tokenizer for the KL estimate ({path})")
        metrics = evaluate_policy(policy, tok, ref, prompts, rep, r_ref, scorer, cfg)
        del policy
        print(f"\n  {path} vs pi_0 ({cfg.reference}) on {len(prompts)} prompts x {cfg.sampling.n} samples")
        low, high = metrics["win_rate_ci95"]
        print(f"    gold win rate      {metrics['win_rate_vs_pi0']:.3f}  (95% bootstrap interval over prompts "
              f"{low:.3f}-{high:.3f}; ties {metrics['tie_rate']:.3f})")
        print(f"    mean gold reward   {metrics['mean_reward_policy']:+.3f} vs {metrics['mean_reward_pi0']:+.3f}")
        print(f"    KL(pi || pi_0)     {metrics['kl_to_pi0']:.3f} +- {metrics['kl_to_pi0_stderr']:.3f} nats (Monte Carlo over "
              "the sampling process; standard error clustered by prompt)")
        if name == "policy":
            write_atomic(out / "eval_metrics.json", json.dumps(metrics, indent=2))
            first = metrics
        rows.append({"name": name if name != "policy" else (cfg.policy_name or str(path)), **metrics})
    if cfg.compare:
        compare_table(rows, cfg, out)
    return first


def evaluate_policy(policy, tok, ref, prompts, rep, r_ref, scorer, cfg: EvalConfig) -> dict:
    """Win rate over the given pi_0 rewards and the Monte Carlo KL of one policy."""
    from align.bon import tie_rate, win_rate

    from align.stats import win_rate_interval

    texts, logp, logp_ref = sample_and_score(policy, tok, ref, prompts, cfg, cfg.seed)
    r_pol = scorer.score(rep, texts).mean
    kl, kl_se = clustered_mean_stderr(logp - logp_ref, cfg.sampling.n)
    low, high = win_rate_interval(r_pol, r_ref, cfg.sampling.n, seed=cfg.seed)
    return {"samples": len(rep), "win_rate_vs_pi0": win_rate(r_pol, r_ref), "win_rate_ci95": [low, high],
            "tie_rate": tie_rate(r_pol, r_ref),
            "mean_reward_policy": r_pol.mean().item(), "mean_reward_pi0": r_ref.mean().item(),
            "kl_to_pi0": kl, "kl_to_pi0_stderr": kl_se, "process": process_of(cfg, tok)}


def compare_table(rows: list[dict], cfg: EvalConfig, out) -> None:
    """comparison.md/json and pareto.png: each policy's win rate against its KL, with BoN's closed forms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.bon import bon_kl_closed_form, bon_win_rate_closed_form
    from jobs.benchmarking import format_table

    for r in rows:
        r["win_rate_ci"] = "{:.3f}-{:.3f}".format(*r["win_rate_ci95"])
    columns = [("policy", "name", "{}"), ("gold win rate", "win_rate_vs_pi0", "{:.3f}"), ("95% CI", "win_rate_ci", "{}"),
               ("ties", "tie_rate", "{:.3f}"),
               ("mean gold", "mean_reward_policy", "{:+.3f}"), ("KL (nats)", "kl_to_pi0", "{:.3f}"),
               ("+-se", "kl_to_pi0_stderr", "{:.3f}")]
    bon = [{"name": f"BoN n={n} (closed form)", "win_rate_vs_pi0": bon_win_rate_closed_form(n),
            "kl_to_pi0": bon_kl_closed_form(n)} for n in cfg.bon_n]
    text, md = format_table(rows + bon, columns)
    write_atomic(out / "comparison.md", f"# Policies against pi_0 ({cfg.reference}), gold win rate and KL\n\n{md}\n")
    write_atomic(out / "comparison.json", json.dumps({"policies": rows, "bon_closed_form": bon}, indent=2))
    print(f"\n{text}\n\n  wrote {out / 'comparison.md'} and pareto.png", flush=True)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot([b["kl_to_pi0"] for b in bon], [b["win_rate_vs_pi0"] for b in bon], "-o", color="tab:gray",
            label="best-of-n (closed form)")
    for b, n in zip(bon, cfg.bon_n):
        ax.annotate(f"n={n}", (b["kl_to_pi0"], b["win_rate_vs_pi0"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for r in rows:
        low, high = r["win_rate_ci95"]
        ax.errorbar(r["kl_to_pi0"], r["win_rate_vs_pi0"], xerr=r["kl_to_pi0_stderr"],
                    yerr=[[r["win_rate_vs_pi0"] - low], [high - r["win_rate_vs_pi0"]]], fmt="s", capsize=3, label=r["name"])
    ax.set(xlabel="KL(pi || pi_0) (nats)", ylabel="gold win rate over pi_0", title="Win rate against KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    return run_job(EvalConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
