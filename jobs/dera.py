"""Decoding-time realignment over a lambda sweep (Liu et al. 2402.02992; align/math/dera.py): for every
lambda, n samples per prompt from softmax(lam * aligned + (1 - lam) * reference logits), without
training anything. All lambdas decode in one pass (one lambda per batch row) on a GeneratorPool whose
actors hold both models; a ScorerPool scores them with the gold reward (and a proxy, if given).

    python -m jobs.dera --config configs/dera.yaml aligned=outputs/bonbon/model
    ray job submit --working-dir . -- python -m jobs.dera --config configs/dera.yaml

Per lambda: mean gold (and proxy) reward, win rate over pi_0 (lambda 0, drawn in the same pass; ties
1/2) and KL(pi_lam || pi_0) by Monte Carlo with its standard error, as results.md/json, samples.jsonl
and dera.png (reward and KL against lambda, reward against KL).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.runtime.config import ConfigError, InputRef, OutputPath, require, run_job
from jobs.sections import PoolConfig, PromptsConfig, RewardConfig, SamplingConfig


@dataclass
class DeraConfig:
    reference: InputRef = "default"  # pi_0
    aligned: InputRef = "outputs/bonbon/model"  # the aligned model (same tokenizer), e.g. from jobs.train_bonbon / train_dpo
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="validation"))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))  # n samples per prompt and lambda
    pool: PoolConfig = field(default_factory=PoolConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge
    proxy: RewardConfig | None = None  # optional: a proxy reward reported beside the gold one
    seed: int = 0
    output_dir: OutputPath = "outputs/dera"
    replace: bool = False  # replace another config's results in output_dir (otherwise refused, naming the keys)

    def __post_init__(self):
        ok = len(self.lambdas) > 0 and all(lam >= 0 and lam == lam and lam != float("inf") for lam in self.lambdas)
        require(ok, "lambdas", "a non-empty list of finite numbers >= 0 (lambda > 1 extrapolates)", self.lambdas)
        from align.engine.engines import require_capability

        require_capability(self.pool.engine, "dera")


def per_lambda(rows: list[dict], lambdas: list[float], n: int) -> list[dict]:
    """Metrics per lambda from the scored samples (rows: one per (lambda, prompt))."""
    from align.math.bon import win_rate
    from align.math.stats import clustered_mean_stderr, win_rate_interval

    base = {r["prompt_index"]: torch.tensor(r["gold"], dtype=torch.float64) for r in rows if r["lambda"] == 0.0}
    out = []
    for lam in lambdas:
        rs = [r for r in rows if r["lambda"] == lam]
        gold = torch.tensor([g for r in rs for g in r["gold"]], dtype=torch.float64)
        log_ratio = torch.tensor([a - b for r in rs for a, b in zip(r["logprobs"], r["ref_logprobs"])], dtype=torch.float64)
        kl, kl_se = clustered_mean_stderr(log_ratio, n)
        gold_mean, gold_se = clustered_mean_stderr(gold, n)
        pi0 = torch.cat([base[r["prompt_index"]] for r in rs])
        m = {"lambda": lam, "gold": gold_mean, "gold_se": gold_se, "win_rate_vs_pi0": win_rate(gold, pi0),
             "win_rate_ci95": list(win_rate_interval(gold, pi0, n)), "kl": kl, "kl_se": kl_se}
        if rs and "proxy" in rs[0]:
            m["proxy"] = float(torch.tensor([p for r in rs for p in r["proxy"]]).mean())
        out.append(m)
    return out


def plot(metrics: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = [m["lambda"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].errorbar(lam, [m["gold"] for m in metrics], yerr=[m["gold_se"] for m in metrics], marker="o", capsize=3, label="gold")
    if "proxy" in metrics[0]:
        axes[0].plot(lam, [m["proxy"] for m in metrics], marker="s", label="proxy")
    axes[0].set(xlabel="lambda", ylabel="mean reward", title="Reward vs lambda")
    axes[1].errorbar(lam, [m["kl"] for m in metrics], yerr=[m["kl_se"] for m in metrics], marker="o", capsize=3)
    axes[1].set(xlabel="lambda", ylabel="KL(pi_lambda || pi_0) (nats)", title="KL vs lambda")
    axes[2].plot([m["kl"] for m in metrics], [m["gold"] for m in metrics], marker="o")
    for m in metrics:
        axes[2].annotate(f"{m['lambda']:g}", (m["kl"], m["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[2].set(xlabel="KL(pi_lambda || pi_0) (nats)", ylabel="mean gold reward", title="Gold reward vs KL (labels: lambda)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DeraConfig) -> dict:
    import ray
    from tqdm.auto import tqdm

    from actors.cluster import init_ray
    from actors.generator import GeneratorPool
    from actors.scorer import ScorerPool
    from align.data.prompts import load_prompts
    from align.engine.models import model_path_problem, resolve_model_path
    from align.runtime.config import to_dict
    from align.runtime.runstate import claim_output, write_atomic
    from jobs.sections import check_model_paths
    from jobs.tables import format_table, write_results

    check_model_paths(cfg)  # a wrong reward model path stops here, before any work

    claim_output(cfg.output_dir, to_dict(cfg), cfg.replace)
    for name in ("reference", "aligned"):  # here, not at load: the YAML's default points at a job's output
        problem = model_path_problem(getattr(cfg, name))
        if problem:
            raise ConfigError(name, f"'default', an HF model name or a directory with config.json ({problem})")
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    lambdas = sorted(set(cfg.lambdas) | {0.0})  # lambda 0 (pi_0) is the baseline of the win rate and the KL
    todo = [(lam, i) for lam in lambdas for i in range(len(prompts))]  # one pass: a lambda per row
    bs, s = cfg.pool.batch_size, cfg.sampling
    batches = [todo[k : k + bs] for k in range(0, len(todo), bs)]
    started = init_ray()
    pool = scorers = None
    rows = []
    try:
        pool = GeneratorPool(resolve_model_path(cfg.reference), cfg.pool.num_actors, cfg.pool.num_cpus_per_actor,
                             cfg.pool.num_gpus_per_actor, cache=cfg.pool.cache, aligned_path=resolve_model_path(cfg.aligned))
        scorers = {"gold": ScorerPool(cfg.reward.spec(), cfg.reward.num_actors, cfg.reward.num_cpus, cfg.reward.num_gpus)}
        if cfg.proxy is not None:
            scorers["proxy"] = ScorerPool(cfg.proxy.spec(), cfg.proxy.num_actors, cfg.proxy.num_cpus, cfg.proxy.num_gpus)
        calls = [pool.submit([prompts[i] for _, i in b], s.n, s.max_new_tokens, k, cfg.seed, temperature=s.temperature,
                             min_new_tokens=s.min_new_tokens, stop_at_eos=s.stop_at_eos, lam=[lam for lam, _ in b])
                 for k, b in enumerate(batches)]
        for k, call in enumerate(tqdm(calls, desc=f"DeRa, {len(lambdas)} lambdas", unit="batch")):
            samples = pool.group.get(call)["samples"]
            scored = {name: sp.get(sp.call("score_samples", samples)) for name, sp in scorers.items()}
            for (lam, i), smp, gold in zip(batches[k], samples, scored["gold"]):
                row = {"lambda": lam, "prompt_index": i, "prompt": smp.prompt, "completions": smp.completions,
                       "completion_ids": smp.completion_ids, "logprobs": smp.logprobs, "ref_logprobs": smp.ref_logprobs,
                       "gold": gold.rewards}
                if "proxy" in scored:
                    row["proxy"] = scored["proxy"][batches[k].index((lam, i))].rewards
                rows.append(row)
    finally:
        for group in [pool, *(scorers or {}).values()]:
            if group is not None:
                group.shutdown()
        if started:
            ray.shutdown()

    metrics = per_lambda(rows, lambdas, s.n)
    columns = [("lambda", "lambda", "{:g}"), ("gold", "gold", "{:+.3f}"), ("+-se", "gold_se", "{:.3f}"),
               ("win rate vs pi_0", "win_rate_vs_pi0", "{:.3f}"), ("KL (nats)", "kl", "{:.2f}"), ("+-se", "kl_se", "{:.2f}")]
    if cfg.proxy is not None:
        columns.insert(3, ("proxy", "proxy", "{:+.3f}"))
    text, md = format_table(metrics, columns)
    head = f"DeRa: {cfg.aligned} over {cfg.reference}, {len(prompts)} prompts x {s.n} samples per lambda"
    out = write_results(cfg, {"lambdas": metrics}, f"# {head}\n\n{md}\n")
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    plot(metrics, out / "dera.png")
    print(f"\n  {head}\n\n{text}\n\n  wrote {Path(cfg.output_dir) / 'results.md'} and dera.png", flush=True)
    return {"lambdas": metrics}


def main(argv=None) -> dict:
    return run_job(DeraConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
