"""Best-of-n sampling over a prompt set: a GeneratorPool draws n+1 completions per prompt, a
RewardScorer scores them, the best of the first n is BoN's answer and the (n+1)-th is an independent
pi_0 sample to compare against.

    python -m jobs.bon --config configs/bon.yaml                      # one machine
    python -m jobs.bon --config configs/bon.yaml sampling.n=16        # overrides: key.sub=value
    ray job submit --working-dir . -- python -m jobs.bon --config configs/bon.yaml   # a cluster

Writes <output_dir>/samples.jsonl (every sample, its reward, the chosen index), metrics.json and
config.yaml, each via a temporary file and a rename, and prints a summary table.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align.config import ConfigError, parse_args, require, to_dict

log = logging.getLogger("sweetspot.bon")


@dataclass
class ModelConfig:
    path: str = "default"  # "default" (embedded task), an HF model name, or a local directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self):
        from align.models import model_path_problem

        problem = model_path_problem(self.path)
        require(problem is None, "path", "'default', an HF model name or a directory with config.json", self.path)


@dataclass
class RewardConfig:
    kind: Literal["vader", "classifier"] = "vader"
    path: str | None = None  # the classifier's HF name or directory (kind: classifier)
    device: str = "auto"
    num_cpus: float = 0  # logical CPUs reserved for the scorer actor (0: shares the generators' cores)

    def __post_init__(self):
        require(self.kind != "classifier" or bool(self.path), "path", "a reward-model path when kind is 'classifier'", self.path)
        require(self.num_cpus >= 0, "num_cpus", ">= 0", self.num_cpus)


@dataclass
class SamplingConfig:
    n: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 24
    min_new_tokens: int = 16
    stop_at_eos: bool = True

    def __post_init__(self):
        require(self.n >= 1, "n", "an integer >= 1", self.n)
        require(self.temperature > 0, "temperature", "a number > 0", self.temperature)
        require(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", self.max_new_tokens)
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", f"0 <= min_new_tokens <= max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)


@dataclass
class PromptsConfig:
    source: str = "default"  # "default" | a .jsonl/.json/.csv/.txt file | a saved datasets dir | an HF dataset
    split: str = "test"
    column: str = "prompt"
    limit: int | None = None  # use the first `limit` prompts
    repeats: int = 1  # each prompt this many times, with independent samples (more BoN groups per prompt)

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", "null or an integer >= 1", self.limit)
        require(self.repeats >= 1, "repeats", "an integer >= 1", self.repeats)


@dataclass
class PoolConfig:
    num_actors: int = 2
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    batch_size: int = 16  # prompts per actor call (each yields batch_size * (n + 1) rows)

    def __post_init__(self):
        require(self.num_actors >= 1, "num_actors", "an integer >= 1", self.num_actors)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.num_cpus_per_actor > 0 or self.num_gpus_per_actor > 0, "num_cpus_per_actor", "> 0 (or num_gpus_per_actor > 0)", self.num_cpus_per_actor)


@dataclass
class BonConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    seed: int = 0
    output_dir: str = "outputs/bon"
    num_examples: int = 3  # sample completions printed at the end
    ray_address: str | None = None  # null: connect to RAY_ADDRESS if set, else start a local Ray


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a killed job never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def summarize(samples, n: int, seconds: float, new_tokens: int, vocabulary: set[str] | None) -> dict:
    """BoN vs pi_0 metrics from PromptSamples with n+1 scored completions each (the last is pi_0's)."""
    from align.bon import bon_select, bon_win_rate_closed_form, tie_rate, win_rate

    rewards = torch.tensor([s.rewards for s in samples], dtype=torch.float64)  # (P, n+1)
    chosen = bon_select(rewards[:, :n])
    bon_r = rewards[:, :n].gather(1, chosen[:, None]).squeeze(1)
    base_r = rewards[:, n]
    metrics = {
        "prompts": len(samples),
        "n": n,
        "win_rate_bon_vs_pi0": float(win_rate(bon_r, base_r)),
        "win_rate_closed_form": bon_win_rate_closed_form(n),
        "tie_rate": float(tie_rate(bon_r, base_r)),
        "mean_reward_bon": bon_r.mean().item(),
        "mean_reward_pi0": base_r.mean().item(),
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / max(seconds, 1e-9),
        "sampling_seconds": seconds,
    }
    if vocabulary is not None:
        from align.corpus import fluency

        metrics["fluency_bon"] = fluency([s.completions[c] for s, c in zip(samples, chosen.tolist())], vocabulary)
        metrics["fluency_pi0"] = fluency([s.completions[n] for s in samples], vocabulary)
    return metrics, chosen.tolist()


def print_report(metrics: dict, samples, chosen: list[int], n: int, k: int, stride: int = 1) -> None:
    rows = [
        ("prompts x samples", f"{metrics['prompts']} x {n + 1}"),
        (f"win rate BoN(n={n}) vs pi_0", f"{metrics['win_rate_bon_vs_pi0']:.3f}  (closed form n/(n+1) = {metrics['win_rate_closed_form']:.3f}, no ties)"),
        ("tie rate", f"{metrics['tie_rate']:.3f}"),
        ("mean gold reward: BoN", f"{metrics['mean_reward_bon']:+.3f}"),
        ("mean gold reward: pi_0", f"{metrics['mean_reward_pi0']:+.3f}"),
    ]
    if "fluency_bon" in metrics:
        rows.append(("fluency BoN / pi_0", f"{metrics['fluency_bon']:.3f} / {metrics['fluency_pi0']:.3f}"))
    rows.append(("throughput", f"{metrics['tokens_per_s']:.0f} new tokens/s ({metrics['new_tokens']} in {metrics['sampling_seconds']:.1f} s)"))
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"  {a:<{width}}  {b}" for a, b in rows))
    for s, c in list(zip(samples, chosen))[::stride][:k]:  # stride: one example per distinct prompt
        print(f"\n  prompt: {s.prompt!r}")
        print(f"    BoN  ({s.rewards[c]:+.3f}): {s.completions[c]!r}")
        print(f"    pi_0 ({s.rewards[n]:+.3f}): {s.completions[n]!r}")


def check_resources(cfg: BonConfig) -> None:
    """Fail fast, naming the knob, when the pool and scorer cannot all be placed (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    for res, per_actor, scorer, knob in (("CPU", cfg.pool.num_cpus_per_actor, cfg.reward.num_cpus, "pool.num_cpus_per_actor"),
                                          ("GPU", cfg.pool.num_gpus_per_actor, 0, "pool.num_gpus_per_actor")):
        need = cfg.pool.num_actors * per_actor + scorer
        if need > have.get(res, 0):
            raise ConfigError("pool.num_actors", f"num_actors * {knob} + reward.num_cpus <= the cluster's {have.get(res, 0):g} {res}s",
                              f"{cfg.pool.num_actors} x {per_actor:g} + {scorer:g}")


def run(cfg: BonConfig) -> dict:
    """Run BoN over the prompt set; returns the metrics dict (also written to metrics.json)."""
    import ray
    import yaml

    from actors.generator import GeneratorPool
    from actors.scorer import RewardScorer
    from align.data import load_prompts
    from align.models import resolve_model_path

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    prompts = [p for p in prompts for _ in range(cfg.prompts.repeats)]
    if not prompts:
        raise ConfigError("prompts.source", "a non-empty prompt set", f"{cfg.prompts.source} (split {cfg.prompts.split!r}) has 0 prompts")
    model_path = resolve_model_path(cfg.model.path)
    vocabulary = None
    if cfg.model.path == "default":
        from align.default_task import ensure_default_task

        task = ensure_default_task()
        vocabulary = task.vocabulary()
        r = task.report
        print(f"  default task pi_0: held-out loss {r['heldout_loss_per_token']:.3f} nats/token, fluency "
              f"{r['fluency']:.3f} (random weights {r['random_init_fluency']:.3f}), {task.policy_dir}")

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    n = cfg.sampling.n
    try:
        check_resources(cfg)
        log.info("starting %d generator actors on %s and one %s scorer", cfg.pool.num_actors, model_path, cfg.reward.kind)
        pool = GeneratorPool(model_path, cfg.pool.num_actors, cfg.pool.num_cpus_per_actor, cfg.pool.num_gpus_per_actor, cfg.model.device, cfg.model.dtype)
        scorer = ray.remote(num_cpus=cfg.reward.num_cpus)(RewardScorer).remote(cfg.reward.kind, cfg.reward.path, cfg.reward.device)
        start, new_tokens, scored = time.perf_counter(), 0, []
        # n+1 draws: the first n for BoN, the last an independent pi_0 sample for the win rate.
        for result in pool.sample(
            prompts, n + 1, cfg.sampling.max_new_tokens, batch_size=cfg.pool.batch_size, seed=cfg.seed,
            temperature=cfg.sampling.temperature, min_new_tokens=cfg.sampling.min_new_tokens, stop_at_eos=cfg.sampling.stop_at_eos,
        ):
            new_tokens += result["new_tokens"]
            scored.append(scorer.score_samples.remote(result["samples"]))  # scoring overlaps sampling
        seconds = time.perf_counter() - start
        samples = [s for batch in ray.get(scored) for s in batch]
        pool.shutdown()
    finally:
        if started_ray:
            ray.shutdown()

    metrics, chosen = summarize(samples, n, seconds, new_tokens, vocabulary)
    out = Path(cfg.output_dir)
    lines = [
        json.dumps({"prompt": s.prompt, "completions": s.completions[:n], "rewards": s.rewards[:n], "logprobs": s.logprobs[:n],
                    "num_tokens": s.num_tokens[:n], "chosen": c, "pi0_completion": s.completions[n], "pi0_reward": s.rewards[n]})
        for s, c in zip(samples, chosen)
    ]
    write_atomic(out / "samples.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print_report(metrics, samples, chosen, n, cfg.num_examples, stride=cfg.prompts.repeats)
    print(f"\n  wrote {out / 'samples.jsonl'}")
    return metrics


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = parse_args(BonConfig, argv, description=__doc__)
    return run(cfg)


if __name__ == "__main__":
    main()
