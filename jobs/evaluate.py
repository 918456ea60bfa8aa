"""Evaluate a policy against pi_0 as the papers do (docs/algorithms.md, Evaluation): win rate of one policy
sample over one pi_0 sample under the gold reward (ties 1/2), and KL(pi || pi_0) by Monte Carlo,
E_{y ~ pi}[log pi(y|x) - log pi_0(y|x)], with its standard error.

    python -m jobs.evaluate --config configs/evaluate.yaml policy=outputs/bonbon/model
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import torch

from align.config import require, run_job
from align.runstate import write_atomic
from jobs.bon import PromptsConfig, RewardConfig, SamplingConfig

log = logging.getLogger("sweetspot.evaluate")


@dataclass
class EvalConfig:
    policy: str = "outputs/bonbon/model"  # the trained policy (directory or HF name)
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


def clustered_mean_stderr(values: torch.Tensor, n: int) -> tuple[float, float]:
    """Mean of P*n values (n consecutive per prompt) and its standard error clustered by prompt: the
    n samples of a prompt are not independent, so the error is that of the P per-prompt means."""
    per_prompt = values.double().view(-1, n).mean(1)  # (P,)
    se = per_prompt.std().item() / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return per_prompt.mean().item(), se


def run(cfg: EvalConfig) -> dict:
    from actors.scorer import make_scorer
    from align.bon import tie_rate, win_rate
    from align.data import load_prompts
    from align.models import load_causal_lm
    from jobs.bon import reward_spec

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    policy, tok = load_causal_lm(cfg.policy, cfg.device, "float32")
    ref, ref_tok = load_causal_lm(cfg.reference, cfg.device, "float32")
    if tok.get_vocab() != ref_tok.get_vocab():
        raise ValueError("policy and reference must share a tokenizer for the KL estimate")
    scorer = make_scorer(reward_spec(cfg.reward))

    def reward(prompts, texts):
        return scorer.score(prompts, texts).mean

    rep = [p for p in prompts for _ in range(cfg.sampling.n)]
    pol_texts, pol_logp, pol_logp_ref = sample_and_score(policy, tok, ref, prompts, cfg, cfg.seed)
    ref_texts, _, _ = sample_and_score(ref, ref_tok, None, prompts, cfg, cfg.seed + 10_000)
    r_pol, r_ref = reward(rep, pol_texts), reward(rep, ref_texts)
    kl, kl_se = clustered_mean_stderr(pol_logp - pol_logp_ref, cfg.sampling.n)
    metrics = {
        "samples": len(rep),
        "win_rate_vs_pi0": win_rate(r_pol, r_ref),
        "tie_rate": tie_rate(r_pol, r_ref),
        "mean_reward_policy": r_pol.mean().item(),
        "mean_reward_pi0": r_ref.mean().item(),
        "kl_to_pi0": kl,
        "kl_to_pi0_stderr": kl_se,
        "process": process_of(cfg, tok),
    }
    from align.paths import resolve_input, resolve_output

    out = resolve_output(cfg.output_dir) if cfg.output_dir else resolve_input(cfg.policy).parent
    write_atomic(out / "eval_metrics.json", json.dumps(metrics, indent=2))
    print(f"\n  {cfg.policy} vs pi_0 ({cfg.reference}) on {len(prompts)} prompts x {cfg.sampling.n} samples")
    print(f"    gold win rate      {metrics['win_rate_vs_pi0']:.3f}  (ties {metrics['tie_rate']:.3f})")
    print(f"    mean gold reward   {metrics['mean_reward_policy']:+.3f} vs {metrics['mean_reward_pi0']:+.3f}")
    print(f"    KL(pi || pi_0)     {kl:.3f} +- {kl_se:.3f} nats (Monte Carlo over the sampling process; "
          f"standard error clustered by prompt)")
    return metrics


def main(argv=None) -> dict:
    return run_job(EvalConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
