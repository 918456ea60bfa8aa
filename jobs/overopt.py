"""The overoptimization study: best-of-n against an imperfect proxy reward model, for n = 1 .. 256,
with every remedy side by side, measured by the gold reward the proxy was trained to imitate.

1. Gold-labelled pairs (jobs.make_pairs) -> a small proxy reward model ensemble with a Laplace
   posterior over member 0's LoRA weights (jobs.train_rm). Small on purpose: an imperfect judge.
2. One generation pass: N = max(ns) samples per test prompt from pi_0, scored once by the gold reward
   (with sentence embeddings), the ensemble and the Laplace posterior, each in its own ScorerPool.
3. For every n, the N samples are cut into N/n disjoint blocks of n (nested reuse: no new samples) and
   each remedy picks one per block: plain proxy, ensemble (mean, worst, uncertainty-weighted),
   Laplace mu - k sigma, RBoN-KL, RBoN-WD, and the gold reward itself (the oracle).
4. Two rewards (the proxy's sentiment and brevity): the sum of LSC-transformed rewards against the
   raw sum, on the share of outputs good on both (gold sentiment > 0 and at most max_words words).

    python -m jobs.overopt --config configs/overopt.yaml
    ray job submit --working-dir . -- python -m jobs.overopt --config configs/overopt.yaml

Writes <output_dir>/results.md (the tables), results.json, overopt.csv, overopt.png (gold reward vs n
and vs the closed-form BoN KL, one curve per remedy), and keeps the pairs, the proxy and the scored
samples (scores.pt, keyed by the config that made them: a rerun with other remedy knobs reuses them).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from align.runtime.config import InputRef, OutputPath, require, run_job
from jobs.sections import PoolConfig, PromptsConfig, SamplingConfig
from jobs.make_pairs import MakePairsConfig
from jobs.train_rm import RmJobConfig


@dataclass
class RemedyParams:
    uncertainty_coef: float = 1.0  # ensemble uncertainty_weighted: mean - coef * variance
    laplace_k: float = 1.0  # Laplace: mu - k * sigma
    rbon_kl_beta: float = 0.05  # RBoN-KL: r + beta * log pi_0(y|x)
    rbon_wd_beta: float = 1.0  # RBoN-WD: r - beta * mean cost
    embedder: str = "minilm"  # RBoN-WD's sentence encoder

    def __post_init__(self):
        for name in ("uncertainty_coef", "laplace_k", "rbon_kl_beta", "rbon_wd_beta"):
            require(getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))


@dataclass
class TwoRewardParams:
    max_words: int = 14  # brevity reward = max_words - words; "good" means at most max_words words
    reference_quantile: float = 0.5  # r_ref(x): this quantile of each reward over the prompt's N samples
    worst_prompt_quantile: float = 0.1  # the low quantile over prompts of the good-on-both share

    def __post_init__(self):
        require(self.max_words >= 1, "max_words", "an integer >= 1", self.max_words)
        require(0 <= self.reference_quantile <= 1, "reference_quantile", "a number in [0, 1]", self.reference_quantile)
        require(0 <= self.worst_prompt_quantile <= 1, "worst_prompt_quantile", "a number in [0, 1]", self.worst_prompt_quantile)


@dataclass
class OveroptConfig:
    policy: InputRef = "default"  # pi_0
    pairs: MakePairsConfig = field(default_factory=MakePairsConfig)  # the proxy's gold-labelled training pairs
    proxy: RmJobConfig = field(default_factory=RmJobConfig)  # the proxy reward model (ensemble + Laplace)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # the evaluation prompts
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=256))  # n: N, samples per prompt
    pool: PoolConfig = field(default_factory=PoolConfig)
    scorer_cpus: float = 0  # logical CPUs reserved per scorer actor (gold, ensemble, Laplace)
    laplace_actors: int = 2  # the Laplace predictive (a Jacobian per sample) is the slowest scorer
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    remedies: RemedyParams = field(default_factory=RemedyParams)
    two_reward: TwoRewardParams = field(default_factory=TwoRewardParams)
    seed: int = 0
    output_dir: OutputPath = "outputs/overopt"
    replace: bool = False  # replace another config's results in output_dir (otherwise refused, naming the keys)

    def __post_init__(self):
        N = self.sampling.n
        ok = len(self.ns) > 0 and all(1 <= n <= N and N % n == 0 for n in self.ns)
        require(ok, "ns", f"a non-empty list of divisors of sampling.n ({N})", self.ns)
        require(self.laplace_actors >= 1, "laplace_actors", "an integer >= 1", self.laplace_actors)
        require(self.proxy.ensemble.members >= 2, "proxy.ensemble.members", "an integer >= 2 (the ensemble remedies)",
                self.proxy.ensemble.members)
        require(self.proxy.laplace.enabled, "proxy.laplace.enabled", "true (the Laplace remedy)", self.proxy.laplace.enabled)


def data_key(cfg: OveroptConfig) -> dict:
    """What the scored samples depend on: a rerun under another key draws and scores again."""
    from align.runtime.config import to_dict

    d = to_dict(cfg)
    return {k: d[k] for k in ("policy", "pairs", "proxy", "prompts", "sampling", "seed")} | {"embedder": cfg.remedies.embedder}


def draw_and_score(cfg: OveroptConfig, proxy_dir) -> dict[str, torch.Tensor]:
    """N samples per prompt in one generation pass, scored by three ScorerPools as batches arrive.
    Returns [P, N] tensors gold, logp, words, lap_mean, lap_var; members [k, P, N]; emb [P, N, d]."""
    from actors.generator import GeneratorPool
    from actors.scorer import ScorerPool
    from align.data.prompts import load_prompts
    from align.engine.models import resolve_model_path

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    N, s = cfg.sampling.n, cfg.sampling
    specs = {"gold": {"kind": "vader", "embedder": cfg.remedies.embedder, "device": "cpu"},
             "ensemble": {"kind": "ensemble", "path": str(proxy_dir / "ensemble"), "device": "cpu"},
             "laplace": {"kind": "laplace", "path": str(proxy_dir / "laplace"), "device": "cpu"}}
    pool = GeneratorPool(resolve_model_path(cfg.policy), cfg.pool.num_actors, cfg.pool.num_cpus_per_actor,
                         cfg.pool.num_gpus_per_actor, cache=cfg.pool.cache, engine=cfg.pool.engine,
                         engine_python=cfg.pool.engine_python)
    scorers = {k: ScorerPool(spec, cfg.laplace_actors if k == "laplace" else 1, cfg.scorer_cpus) for k, spec in specs.items()}
    calls = {k: [] for k in scorers}
    try:
        for result in pool.sample(prompts, N, s.max_new_tokens, cfg.pool.batch_size, cfg.seed, temperature=s.temperature,
                                  min_new_tokens=s.min_new_tokens, stop_at_eos=s.stop_at_eos):
            for k, scorer in scorers.items():
                calls[k].append(scorer.call("score_samples", result["samples"]))
        from tqdm.auto import tqdm

        scored = {k: [x for c in tqdm(cs, desc=f"scoring ({k})", unit="batch") for x in scorers[k].get(c)] for k, cs in calls.items()}
    finally:
        pool.shutdown()
        for scorer in scorers.values():
            scorer.shutdown()
    f64 = dict(dtype=torch.float64)
    gold, ens, lap = scored["gold"], scored["ensemble"], scored["laplace"]
    return {"gold": torch.tensor([x.rewards for x in gold], **f64),
            "logp": torch.tensor([x.logprobs for x in gold], **f64),
            "words": torch.tensor([[len(c.split()) for c in x.completions] for x in gold], **f64),
            "members": torch.tensor([x.reward_members for x in ens], **f64).permute(2, 0, 1),
            "lap_mean": torch.tensor([x.rewards for x in lap], **f64),
            "lap_var": torch.tensor([x.reward_var for x in lap], **f64),
            "emb": torch.stack([x.embeddings for x in gold]).float()}


def remedy_rankings(d: dict, p: RemedyParams) -> dict[str, tuple]:
    """name -> (ranking [P, N] or None, selection method, beta). The plain proxy is ensemble member 0,
    the model the Laplace posterior is fitted around (its GLM mean is member 0's reward)."""
    from align.math.scoring import ensemble_reward, penalized_reward

    members = d["members"]
    return {
        "gold (oracle)": (d["gold"], "argmax", 0.0),
        "proxy": (members[0], "argmax", 0.0),
        "ensemble mean": (ensemble_reward(members, "mean")[0], "argmax", 0.0),
        "ensemble worst": (ensemble_reward(members, "worst")[0], "argmax", 0.0),
        "ensemble uncertainty-weighted": (ensemble_reward(members, "uncertainty_weighted", p.uncertainty_coef)[0], "argmax", 0.0),
        "laplace mu - k sigma": (penalized_reward(d["lap_mean"], d["lap_var"], p.laplace_k), "argmax", 0.0),
        "rbon-kl": (members[0], "rbon_kl", p.rbon_kl_beta),
        "rbon-wd": (members[0], "rbon_wd", p.rbon_wd_beta),
    }


def blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """[P, N, ...] -> [P * N/n, n, ...]: the N samples of each prompt as N/n disjoint blocks of n."""
    P, N = x.shape[:2]
    return x.reshape(P * (N // n), n, *x.shape[2:])


def pick(values: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """values [R, n], chosen [R] -> [R]."""
    return values.gather(1, chosen[:, None])[:, 0]


def select_in_blocks(ranking, method, beta, d, n) -> torch.Tensor:
    """Chosen index within each block of n, [P * N/n]."""
    from align.math.scoring import cosine_cost
    from align.math.selection import select

    cost = cosine_cost(blocks(d["emb"], n)) if method == "rbon_wd" else None
    return select(blocks(ranking, n), method, beta, blocks(d["logp"], n), cost)


def overopt_curves(d: dict, ns: list[int], p: RemedyParams) -> list[dict]:
    """Gold and proxy reward of the selected sample per (remedy, n): mean over prompts and blocks, and
    the standard error over prompts."""
    from align.math.bon import bon_kl_closed_form

    P = d["gold"].shape[0]
    rows = []
    for name, (ranking, method, beta) in remedy_rankings(d, p).items():
        for n in ns:
            chosen = select_in_blocks(ranking, method, beta, d, n)
            gold = pick(blocks(d["gold"], n), chosen).view(P, -1).mean(1)  # per prompt
            proxy = pick(blocks(d["members"][0], n), chosen).view(P, -1).mean(1)
            rows.append({"remedy": name, "n": n, "kl_bon": bon_kl_closed_form(n), "gold": gold.mean().item(),
                         "gold_se": (gold.std() / math.sqrt(P)).item() if P > 1 else 0.0, "proxy": proxy.mean().item(),
                         "gold_per_prompt": gold.tolist()})  # for paired comparisons on the same prompts
    return rows


def two_reward_rows(d: dict, ns: list[int], t: TwoRewardParams) -> list[dict]:
    """Proxy sentiment + brevity combined by sum_raw and sum_of_lsc (each alone for reference): share
    of selected outputs good on both (gold > 0 and at most max_words words), mean and low quantile
    over prompts."""
    from align.math.scoring import combine_rewards, reference_reward

    P = d["gold"].shape[0]
    rewards = torch.stack([d["members"][0], t.max_words - d["words"]])  # (2, P, N)
    refs = torch.stack([reference_reward(r, t.reference_quantile) for r in rewards])  # (2, P)
    good = ((d["gold"] > 0) & (d["words"] <= t.max_words)).double()
    rankings = {"sentiment only": rewards[0], "brevity only": rewards[1],
                "sum_raw": combine_rewards(rewards, "sum_raw"), "sum_of_lsc": combine_rewards(rewards, "sum_of_lsc", refs)}
    rows = []
    for name, ranking in rankings.items():
        for n in ns:
            chosen = blocks(ranking, n).argmax(1)
            share = pick(blocks(good, n), chosen).view(P, -1).mean(1)  # per prompt
            rows.append({"combination": name, "n": n, "good_on_both": share.mean().item(), "per_prompt": share.tolist(),
                         "worst_prompts": torch.quantile(share, t.worst_prompt_quantile).item(),
                         "gold": pick(blocks(d["gold"], n), chosen).mean().item(),
                         "words": pick(blocks(d["words"], n), chosen).mean().item()})
    return rows


def plot(rows: list[dict], lsc_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name in dict.fromkeys(r["remedy"] for r in rows):
        rs = [r for r in rows if r["remedy"] == name]
        style = dict(marker="o", ms=3, ls="--" if name == "gold (oracle)" else "-", label=name)
        axes[0].errorbar([r["n"] for r in rs], [r["gold"] for r in rs], yerr=[r["gold_se"] for r in rs], capsize=2, **style)
        axes[1].plot([r["kl_bon"] for r in rs], [r["gold"] for r in rs], **style)
    ns = sorted({r["n"] for r in rows})
    axes[0].set(xscale="log", xlabel="n", ylabel="gold reward of the selected sample", title="Gold reward vs n")
    axes[1].set(xlabel="KL(BoN || pi_0) = log n - (n-1)/n (nats)", ylabel="gold reward", title="Gold reward vs BoN KL")
    for name in dict.fromkeys(r["combination"] for r in lsc_rows):
        rs = [r for r in lsc_rows if r["combination"] == name]
        axes[2].plot([r["n"] for r in rs], [r["good_on_both"] for r in rs], marker="o", ms=3, label=name)
    axes[2].set(xscale="log", xlabel="n", ylabel="share good on both", title="Two rewards: LSC sum vs raw sum")
    for ax in (axes[0], axes[2]):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: OveroptConfig) -> dict:
    import ray

    from actors.cluster import init_ray
    from align.runtime.config import to_dict
    from align.runtime.runstate import claim_output, write_atomic
    from jobs import make_pairs, train_rm
    from jobs.sections import check_model_paths
    from jobs.tables import format_table, write_results

    check_model_paths(cfg)  # a wrong reward model path stops here, before any work

    out = Path(cfg.output_dir)
    changed = {d.split(":", 1)[0] for d in claim_output(out, to_dict(cfg), cfg.replace)}
    # Replacing: the pairs job compares its own config; the proxy retrains when its data or knobs changed.
    retrain = any(k == "policy" or k.startswith(("pairs.", "proxy.")) for k in changed)
    started = init_ray()
    try:
        pairs_cfg = replace(cfg.pairs, output_dir=str(out / "pairs"), replace=cfg.replace,
                            bon=replace(cfg.pairs.bon, model=replace(cfg.pairs.bon.model, path=cfg.policy)))
        print("\n== 1/3 gold-labelled pairs and the proxy reward model", flush=True)
        make_pairs.run(pairs_cfg)
        proxy_cfg = replace(cfg.proxy, output_dir=str(out / "proxy"),
                            data=replace(cfg.proxy.data, source=str(out / "pairs" / "random"), split="train"),
                            eval=replace(cfg.proxy.eval, source=str(out / "pairs" / "random"), split="test"),
                            train=replace(cfg.proxy.train, run=replace(cfg.proxy.train.run, storage_path=str(out / "runs"),
                                                                     resume="never" if retrain else cfg.proxy.train.run.resume)))
        proxy = train_rm.run(proxy_cfg)
        key, cache = data_key(cfg), out / "scores.pt"
        saved = torch.load(cache, weights_only=True) if cache.exists() else None
        if saved is not None and json.loads(saved["key"]) == key:
            print(f"\n== 2/3 scored samples reused from {cache}", flush=True)
            d = {k: v for k, v in saved.items() if k != "key"}
        else:
            print(f"\n== 2/3 {cfg.sampling.n} samples per prompt, scored by gold, ensemble and Laplace", flush=True)
            d = draw_and_score(cfg, out / "proxy")
            tmp = cache.with_suffix(".tmp")
            torch.save({**d, "key": json.dumps(key)}, tmp)
            tmp.replace(cache)
    finally:
        if started:
            ray.shutdown()

    print("\n== 3/3 remedies at every n (nested blocks of the same samples)", flush=True)
    rows = overopt_curves(d, cfg.ns, cfg.remedies)
    lsc_rows = two_reward_rows(d, cfg.ns, cfg.two_reward)
    agreement = proxy.get("ensemble_heldout_agreement") or [proxy.get("heldout_agreement")]
    result = {"prompts": int(d["gold"].shape[0]), "samples_per_prompt": int(d["gold"].shape[1]),
              "proxy_heldout_agreement": agreement, "proxy_heldout_pairs": proxy.get("heldout_pairs"),
              "curves": rows, "two_reward": lsc_rows}
    text, md = format_table(rows, [("remedy", "remedy", "{}"), ("n", "n", "{}"), ("KL_bon", "kl_bon", "{:.3f}"),
                                   ("gold", "gold", "{:+.3f}"), ("+-se", "gold_se", "{:.3f}"), ("proxy", "proxy", "{:+.3f}")])
    text2, md2 = format_table(lsc_rows, [("combination", "combination", "{}"), ("n", "n", "{}"),
                                         ("good on both", "good_on_both", "{:.3f}"),
                                         (f"q{cfg.two_reward.worst_prompt_quantile:g} over prompts", "worst_prompts", "{:.3f}"),
                                         ("gold", "gold", "{:+.3f}"), ("words", "words", "{:.1f}")])
    head = (f"Overoptimization: {result['prompts']} prompts x {result['samples_per_prompt']} samples; proxy held-out "
            f"agreement {', '.join(f'{a:.3f}' for a in agreement if a is not None)} on {proxy.get('heldout_pairs')} pairs")
    out_dir = write_results(cfg, result, f"# {head}\n\n{md}\n\n## Two rewards (sentiment + brevity)\n\n{md2}\n")
    write_atomic(out_dir / "overopt.csv", "remedy,n,kl_bon,gold,gold_se,proxy\n" + "".join(
        f"{r['remedy']},{r['n']},{r['kl_bon']:.6f},{r['gold']:.6f},{r['gold_se']:.6f},{r['proxy']:.6f}\n" for r in rows))
    plot(rows, lsc_rows, out_dir / "overopt.png")
    print(f"\n  {head}\n\n{text}\n\n  Two rewards (proxy sentiment + brevity, max_words {cfg.two_reward.max_words})\n\n{text2}"
          f"\n\n  wrote {out_dir / 'results.md'} and {out_dir / 'overopt.png'}", flush=True)
    return result


def main(argv=None) -> dict:
    return run_job(OveroptConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
