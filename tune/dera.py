"""Choose the DeRa strength lambda on validation prompts with a Ray Tune sweep, without retraining
(Liu et al. 2402.02992): each trial samples n completions per prompt from lam * aligned + (1 - lam)
* reference logits and reports gold (and proxy) reward, win rate over pi_0 and KL(pi_lam || pi_0).

    python -m tune.dera --config configs/tune_dera.yaml aligned=outputs/bonbon/model
    python -m tune.dera --config configs/tune_dera.yaml searcher=optuna 'search={lam: {uniform: [0, 2]}}' num_samples=8

Each trial draws its pi_0 baseline in the same decode pass, with the same per-prompt seeds as its
DeRa rows (common random numbers: at lambda 0 the two are the same samples, win rate 1/2, KL 0).
The objective is gold, proxy, win_rate, or reward_at_kl (the gold reward of trials within
`kl_budget` nats of pi_0; a trial over it is pushed below all of those, 1000 per nat over).
An interrupted sweep resumes with `Tuner.restore` and reruns only unfinished trials; a sweep made
under another config is not reused (resume=never starts over). Writes results.csv/md/json (sorted
by the objective), pareto.png (reward against KL, the Pareto front marked) and the Tune experiment
under tune/.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from align.runtime.config import ConfigError, InputRef, OutputPath, require, run_job
from jobs.sections import PromptsConfig, RewardConfig, SamplingConfig

log = logging.getLogger("sweetspot.tune.dera")

OBJECTIVES = ("gold", "proxy", "win_rate", "reward_at_kl")
KNOBS = {"lam": (0.0, None)}  # what this sweep varies, and its allowed range
EXPERIMENT = "dera"


@dataclass
class TuneDeraConfig:
    reference: InputRef = "default"  # pi_0
    aligned: InputRef = "outputs/bonbon/model"  # the aligned model (same tokenizer)
    search: dict = field(default_factory=lambda: {"lam": {"grid": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]}})
    searcher: str = "basic"  # basic (every grid value; random draws of the other spaces) | optuna (TPE; no grid)
    num_samples: int = 1  # basic: passes over the grid (or random draws); optuna: trials
    objective: str = "gold"  # gold | proxy | win_rate | reward_at_kl
    kl_budget: float | None = None  # reward_at_kl: KL(pi_lam || pi_0) allowed, in nats
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="validation"))
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))
    batch_size: int = 16  # prompts per sampler call inside a trial
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge
    proxy: RewardConfig | None = None  # a proxy reward reported beside the gold one
    device: str = "auto"
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent_trials: int = 2
    seed: int = 0
    tracking: str = "tensorboard"  # mlflow | tensorboard+mlflow: also an MLflow run per trial (actors/tracking.py); Tune writes TensorBoard events in any case
    resume: str = "auto"  # auto | never | must (align.runtime.runstate)
    ray_address: str | None = None
    output_dir: OutputPath = "outputs/tune_dera"

    def __post_init__(self):
        from actors.tracking import check_tracking

        check_tracking(self.tracking)
        require(self.searcher in ("basic", "optuna"), "searcher", "basic | optuna", self.searcher)
        require(self.objective in OBJECTIVES, "objective", " | ".join(OBJECTIVES), self.objective)
        require(self.objective != "proxy" or self.proxy is not None, "proxy", "a reward config when objective is proxy", None)
        require(self.objective != "reward_at_kl" or (self.kl_budget is not None and self.kl_budget >= 0), "kl_budget",
                "a number >= 0 when objective is reward_at_kl", self.kl_budget)
        require(self.num_samples >= 1, "num_samples", "an integer >= 1", self.num_samples)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.max_concurrent_trials >= 1, "max_concurrent_trials", "an integer >= 1", self.max_concurrent_trials)
        require(self.cpus_per_trial > 0, "cpus_per_trial", "a number > 0", self.cpus_per_trial)
        from tune.space import parse_space

        parse_space(self.search, KNOBS)  # named errors before any work
        grid = [k for k, s in self.search.items() if isinstance(s, dict) and "grid" in s]
        require(self.searcher != "optuna" or not grid, f"search.{grid[0] if grid else 'lam'}",
                "uniform, loguniform or choice with searcher optuna (it proposes the values; grid is for basic)",
                self.search.get(grid[0]) if grid else None)


def objective_value(m: dict, objective: str, kl_budget: float | None) -> float:
    if objective == "win_rate":
        return m["win_rate_vs_pi0"]
    if objective == "reward_at_kl":
        return m["gold"] - 1000.0 * max(0.0, m["kl"] - kl_budget)
    return m[objective]


def trial(config: dict, setup: dict) -> None:
    """One Tune trial: sample the validation prompts at config["lam"] and at 0 in one pass, score,
    report the metrics (jobs.dera.per_lambda) and the objective."""
    import torch
    from ray import tune

    from actors.generator import Generator, prompt_seeds
    from actors.scorer import make_scorer
    from jobs.dera import per_lambda

    if setup["threads"]:
        torch.set_num_threads(setup["threads"])
    lam, s, prompts = float(config["lam"]), setup["sampling"], setup["prompts"]
    gen = Generator(setup["reference"], device=setup["device"], aligned_path=setup["aligned"])
    scorers = {name: make_scorer(spec) for name, spec in setup["rewards"].items()}
    seeds, bs, rows = prompt_seeds(setup["seed"], len(prompts)), setup["batch_size"], []
    copies = 1 if lam == 0.0 else 2  # the DeRa rows, then pi_0's with the same seeds
    for start in range(0, len(prompts), bs):
        chunk = prompts[start : start + bs]
        lams = [lam] * len(chunk) + [0.0] * len(chunk) * (copies - 1)
        samples = gen.sample(chunk * copies, s["n"], s["max_new_tokens"], temperature=s["temperature"],
                             min_new_tokens=s["min_new_tokens"], stop_at_eos=s["stop_at_eos"], lam=lams,
                             seeds=seeds[start : start + bs] * copies)["samples"]
        scores = {name: [list(x.rewards) for x in sc.score_samples(samples)] for name, sc in scorers.items()}
        for j, smp in enumerate(samples):
            rows.append({"lambda": lams[j], "prompt_index": start + j % len(chunk), "logprobs": smp.logprobs,
                         "ref_logprobs": smp.ref_logprobs, **{name: r[j] for name, r in scores.items()}})
    m = per_lambda(rows, [lam], s["n"])[0]
    m["objective"] = objective_value(m, setup["objective"], setup["kl_budget"])
    tune.report(m)


def sweep_key(cfg: TuneDeraConfig) -> dict:
    """What the sweep's trials depend on (not where they run, how many at once, resume, or tracking)."""
    from align.runtime.config import to_dict
    from align.runtime.runstate import drop_keys

    return drop_keys(to_dict(cfg), ["resume", "ray_address", "output_dir", "max_concurrent_trials", "tracking"])


def run(cfg: TuneDeraConfig) -> dict:
    from ray import tune

    from align.data.prompts import load_prompts
    from align.engine.models import model_path_problem, resolve_model_path
    from tune import sweep
    from tune.results import write_sweep
    from tune.space import grid_size, parse_space

    for name in ("reference", "aligned"):
        problem = model_path_problem(getattr(cfg, name))
        if problem:
            raise ConfigError(name, f"'default', an HF model name or a directory with config.json ({problem})")
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    out = Path(cfg.output_dir)
    resume = sweep.prepare(out, sweep_key(cfg), cfg.resume, EXPERIMENT)

    rewards = {"gold": cfg.reward.spec()} | ({"proxy": cfg.proxy.spec()} if cfg.proxy else {})
    setup = {"reference": str(resolve_model_path(cfg.reference)), "aligned": str(resolve_model_path(cfg.aligned)),
             "device": cfg.device, "threads": max(1, int(cfg.cpus_per_trial)), "prompts": prompts,
             "sampling": vars(cfg.sampling), "batch_size": cfg.batch_size, "rewards": rewards, "seed": cfg.seed,
             "objective": cfg.objective, "kl_budget": cfg.kl_budget}
    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup),
                                    {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})
    done, failed = sweep.fit(
        trainable, out, EXPERIMENT, resume, parse_space(cfg.search, KNOBS),
        tune.TuneConfig(metric="objective", mode="max", num_samples=cfg.num_samples,
                        search_alg=sweep.searcher(cfg.searcher, cfg.seed), max_concurrent_trials=cfg.max_concurrent_trials),
        f"sweeping {cfg.search} over {len(prompts)} validation prompts: {cfg.num_samples * grid_size(cfg.search)} "
        f"trial(s), searcher {cfg.searcher}", log, cfg.ray_address, tracking=cfg.tracking)
    rows = [{"lam": r.config["lam"], **{k: v for k, v in r.metrics.items() if k in METRICS}} for r in done
            if "objective" in r.metrics]
    if not rows:
        raise RuntimeError(f"every trial failed ({len(failed)}); see the errors above and {out / 'tune' / EXPERIMENT}")
    columns = [("lambda", "lam", "{:.3g}"), ("objective", "objective", "{:+.3f}"), ("gold", "gold", "{:+.3f}"),
               ("+-se", "gold_se", "{:.3f}"), ("win rate vs pi_0", "win_rate_vs_pi0", "{:.3f}"),
               ("KL (nats)", "kl", "{:.2f}"), ("+-se", "kl_se", "{:.2f}")]
    if cfg.proxy is not None:
        columns.insert(4, ("proxy", "proxy", "{:+.3f}"))
    title = (f"DeRa lambda sweep: {cfg.aligned} over {cfg.reference}, {len(prompts)} validation prompts x "
             f"{cfg.sampling.n} samples, objective {cfg.objective}")
    text = write_sweep(out, rows, columns, "objective", "gold", lambda r: f"{r['lam']:.3g}", title)
    best = max(rows, key=lambda r: r["objective"])
    print(f"\n  {title}\n\n{text}\n\n  best lambda {best['lam']:.3g}; wrote {out / 'results.md'}, results.csv and pareto.png",
          flush=True)
    return {"trials": rows, "best": best, "failed": len(failed)}


METRICS = ("objective", "gold", "gold_se", "proxy", "win_rate_vs_pi0", "win_rate_ci95", "kl", "kl_se")


def main(argv=None) -> dict:
    return run_job(TuneDeraConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
