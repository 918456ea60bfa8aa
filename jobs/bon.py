"""Best-of-n sampling over a prompt set: a GeneratorPool draws n+1 completions per prompt, a
ScorerPool scores them, the best of the first n is BoN's answer and the (n+1)-th is an independent
pi_0 sample to compare against.

    python -m jobs.bon --config configs/bon.yaml                      # one machine
    python -m jobs.bon --config configs/bon.yaml sampling.n=16        # overrides: key.sub=value
    ray job submit --working-dir . -- python -m jobs.bon --config configs/bon.yaml   # a cluster

Writes <output_dir>/samples.jsonl (every sample with its token ids, text, log-prob under the sampling
process and reward, and the chosen index), metrics.json and config.yaml, each via a temporary file and
a rename, and prints a summary table. Scored batches stream to samples.partial.jsonl first: a rerun
of an interrupted run with the same config skips what is done (resume=auto|never|must).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from align.engine.chat import prompt_text
from align.runtime.config import ConfigError, OutputPath, require, run_job, to_dict
from align.engine.engines import require_capability
from jobs.sections import (JudgeConfig, ModelConfig, PenaltyConfig, PoolConfig, PromptsConfig, RbonConfig, RewardConfig,
                           SamplingConfig, SpeculativeConfig, check_model_paths)

log = logging.getLogger("sweetspot.bon")


@dataclass
class BonConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # a held-out judge: grades the samples, never selects
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    selection: Literal["argmax", "rbon_kl", "rbon_wd", "speculative_rejection"] = "argmax"  # how the answer is picked from the n samples
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)  # what the samples are ranked by
    rbon: RbonConfig = field(default_factory=RbonConfig)  # used when selection is rbon_kl or rbon_wd
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # used when selection is speculative_rejection
    seed: int = 0
    output_dir: OutputPath = "outputs/bon"
    num_examples: int = 3  # sample completions printed at the end
    ray_address: str | None = None  # null: connect to RAY_ADDRESS if set, else start a local Ray
    resume: Literal["auto", "never", "must"] = "auto"  # reuse samples of an interrupted run with the same config

    def __post_init__(self):
        for penalty in ("ensemble", "laplace"):
            require(self.penalty.kind != penalty or self.reward.kind == penalty, "penalty.kind",
                    f"'{penalty}' only with reward.kind {penalty!r} (got reward.kind {self.reward.kind!r})", self.penalty.kind)
        last = self.speculative.decision_tokens[-1]
        require(self.selection != "speculative_rejection" or last < self.sampling.max_new_tokens, "speculative.decision_tokens",
                f"decision points below sampling.max_new_tokens ({self.sampling.max_new_tokens})", self.speculative.decision_tokens)
        require(self.selection != "speculative_rejection" or self.sampling.n >= 2, "sampling.n",
                "an integer >= 2 with speculative_rejection (there must be something to reject)", self.sampling.n)
        if self.selection == "speculative_rejection":
            require_capability(self.pool.engine, "speculative_rejection")


# Knobs that change where or how fast samples are drawn, not which: a run may resume under other values.
# The judge is scored again at the end of every run, so it may change too.
NOT_IN_RESULT = ("output_dir", "num_examples", "judge.", "ray_address", "resume", "model.device", "reward.device",
                 "reward.num_cpus", "pool.num_actors", "pool.num_cpus_per_actor", "pool.num_gpus_per_actor",
                 "pool.cache", "pool.compile", "pool.engine_python")


def record(s, index: int, batch: int, cfg: BonConfig) -> dict:
    """One samples.jsonl line: the BoN candidates of a prompt (token ids, text, process log-probs,
    rewards; all n, or the survivors of speculative rejection), the chosen index, the tokens drawn for
    them, and the independent pi_0 sample drawn with them (always the last). With a penalty the line
    also has each candidate's variance (and members' rewards) and the `ranking` value it was chosen by."""
    n = len(s.completions) - 1
    rewards = torch.tensor([s.rewards[:n]], dtype=torch.float64)
    chosen, extra = choose(s, n, cfg)
    out = {"index": index, "batch": batch, "prompt": s.prompt, "prompt_ids": s.prompt_ids,
           "completions": s.completions[:n], "completion_ids": s.completion_ids[:n], "rewards": rewards[0].tolist(),
           "logprobs": s.logprobs[:n], "chosen": chosen, "drawn_tokens": s.drawn_tokens - len(s.completion_ids[n]), "pi0_completion": s.completions[n],
           "pi0_completion_ids": s.completion_ids[n], "pi0_reward": s.rewards[n], "pi0_logprob": s.logprobs[n],
           "temperature": cfg.sampling.temperature,
           "min_new_tokens": cfg.sampling.min_new_tokens if cfg.sampling.stop_at_eos else 0, "tokenizer": s.tokenizer}
    if any(s.reward_var):
        out["reward_var"] = s.reward_var[:n]
    if s.reward_members is not None:
        out["reward_members"] = s.reward_members[:n]
    return {**out, **extra}


def choose(s, n: int, cfg: BonConfig) -> tuple[int, dict]:
    """The chosen candidate of one prompt's n (align.math.selection) and what it was chosen by."""
    from align.math.scoring import cosine_cost
    from align.math.selection import prompt_ranking, select

    members = s.reward_members[:n] if s.reward_members is not None else None
    ranking = prompt_ranking(s.rewards[:n], s.reward_var[:n], members, cfg.penalty.kind, cfg.penalty.ensemble_mode, cfg.penalty.coef)
    extra = {} if cfg.penalty.kind == "none" else {"ranking": ranking[0].tolist()}
    method = cfg.selection if cfg.selection in ("rbon_kl", "rbon_wd") else "argmax"
    logps = torch.tensor([s.logprobs[:n]], dtype=torch.float64)
    cost = None
    if method == "rbon_wd":
        cost = cosine_cost(s.embeddings[:n].unsqueeze(0).double())  # (1, n, n)
        extra["mean_cost"] = cost[0].mean(-1).tolist()
    return int(select(ranking, method, cfg.rbon.beta, logps, cost)[0]), extra


def read_records(path: Path, batch_sizes: dict[int, int]) -> dict[int, dict]:
    """Records of complete batches in a (possibly interrupted) samples file: a torn last line and
    batches with missing prompts are dropped, so they are drawn again."""
    if not path.exists():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line a killed run was writing
            break
    per_batch: dict[int, list[dict]] = {}
    for r in rows:
        per_batch.setdefault(r["batch"], []).append(r)
    return {r["index"]: r for b, rs in per_batch.items() if len(rs) == batch_sizes.get(b) for r in rs}


def judge_records(records: list[dict], spec: dict, batch_prompts: int = 16) -> None:
    """Grade every candidate and the pi_0 sample of each record with the held-out judge, in place:
    `judge_rewards` (one per candidate) and `pi0_judge_reward`. The judge reads text (it may have
    another tokenizer), `batch_prompts` prompts' samples per call."""
    from align.rewards.registry import build_scorer

    scorer = build_scorer(spec)
    for start in range(0, len(records), batch_prompts):
        chunk = records[start : start + batch_prompts]
        prompts = [r["prompt"] for r in chunk for _ in range(len(r["completions"]) + 1)]
        completions = [c for r in chunk for c in r["completions"] + [r["pi0_completion"]]]
        groups = [g for g, r in enumerate(chunk) for _ in range(len(r["completions"]) + 1)]
        scores = scorer.score(prompts, completions, groups=groups).mean.tolist()
        i = 0
        for r in chunk:
            k = len(r["completions"])
            r["judge_rewards"], r["pi0_judge_reward"] = scores[i : i + k], scores[i + k]
            i += k + 1


def best_of_k_curve(records: list[dict], n: int) -> list[dict]:
    """The best-of-k curve for k = 1, 2, 4, ..., n, read off the n samples each prompt already has
    (align.math.bon.best_of_k_expectation): the mean reward BoN ranks by and its win rate against the
    pi_0 sample, and with a judge the judge's mean and win rate of the same choice. argmax selection only."""
    from align.math.bon import best_of_k_expectation

    ranking = torch.tensor([r.get("ranking", r["rewards"]) for r in records], dtype=torch.float64)
    grades = {"reward": torch.tensor([r["rewards"] for r in records], dtype=torch.float64)}
    base = {"reward": torch.tensor([[r["pi0_reward"]] for r in records], dtype=torch.float64)}
    if "judge_rewards" in records[0]:
        grades["judge"] = torch.tensor([r["judge_rewards"] for r in records], dtype=torch.float64)
        base["judge"] = torch.tensor([[r["pi0_judge_reward"]] for r in records], dtype=torch.float64)
    ks = sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})
    curve = []
    for k in ks:
        row = {"n": k}
        for name, g in grades.items():
            wins = (g > base[name]).double() + 0.5 * (g == base[name]).double()  # ties count 1/2, as win_rate
            row[f"mean_{name}"] = best_of_k_expectation(ranking, g, k).mean().item()
            row[f"win_rate_{name}"] = best_of_k_expectation(ranking, wins, k).mean().item()
        curve.append(row)
    return curve


def summarize(records: list[dict], n: int, seconds: float, new_tokens: int, vocabulary: set[str] | None,
              selection: str = "argmax") -> dict:
    """BoN vs pi_0 metrics from samples.jsonl records (scored candidates plus one pi_0 sample each)."""
    from align.math.bon import bon_win_rate_closed_form, tie_rate, win_rate

    bon_r = torch.tensor([r["rewards"][r["chosen"]] for r in records], dtype=torch.float64)
    base_r = torch.tensor([r["pi0_reward"] for r in records], dtype=torch.float64)
    metrics = {
        "prompts": len(records),
        "n": n,
        "selection": selection,
        "win_rate_bon_vs_pi0": float(win_rate(bon_r, base_r)),
        "win_rate_closed_form": bon_win_rate_closed_form(n) if selection == "argmax" else None,
        "tie_rate": float(tie_rate(bon_r, base_r)),
        "mean_reward_bon": bon_r.mean().item(),
        "mean_reward_pi0": base_r.mean().item(),
        "drawn_tokens_per_prompt": sum(r["drawn_tokens"] for r in records) / len(records),  # candidates only
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
        "sampling_seconds": seconds,
    }
    if "judge_rewards" in records[0]:
        bon_j = torch.tensor([r["judge_rewards"][r["chosen"]] for r in records], dtype=torch.float64)
        base_j = torch.tensor([r["pi0_judge_reward"] for r in records], dtype=torch.float64)
        metrics.update(win_rate_judge_bon_vs_pi0=float(win_rate(bon_j, base_j)), mean_judge_bon=bon_j.mean().item(),
                       mean_judge_pi0=base_j.mean().item())
    if selection.startswith("argmax") and all(len(r["rewards"]) == n for r in records):
        metrics["curve"] = best_of_k_curve(records, n)
    if vocabulary is not None:
        from align.task.corpus import fluency

        metrics["fluency_bon"] = fluency([r["completions"][r["chosen"]] for r in records], vocabulary)
        metrics["fluency_pi0"] = fluency([r["pi0_completion"] for r in records], vocabulary)
    return metrics


def print_report(metrics: dict, records: list[dict], n: int, k: int, stride: int = 1) -> None:
    speed = (f"{metrics['tokens_per_s']:.0f} new tokens/s ({metrics['new_tokens']} in {metrics['sampling_seconds']:.1f} s)"
             if metrics["tokens_per_s"] else "n/a (every prompt reused from the previous run)")
    rows = [
        ("prompts x samples", f"{metrics['prompts']} x {n + 1}"),
        (f"win rate BoN(n={n}) vs pi_0" + ("" if metrics.get("reward", "gold") == "gold" else f", {metrics['reward']}"), f"{metrics['win_rate_bon_vs_pi0']:.3f}" + (
            f"  (closed form n/(n+1) = {metrics['win_rate_closed_form']:.3f}, no ties)" if metrics["win_rate_closed_form"] else
            f"  ({metrics['selection']})")),
        ("tie rate", f"{metrics['tie_rate']:.3f}"),
        (f"mean {metrics.get('reward', 'gold')} reward: BoN", f"{metrics['mean_reward_bon']:+.3f}"),
        (f"mean {metrics.get('reward', 'gold')} reward: pi_0", f"{metrics['mean_reward_pi0']:+.3f}"),
        ("tokens drawn per prompt", f"{metrics['drawn_tokens_per_prompt']:.1f} (the n candidates)"),
    ]
    if "judge" in metrics:
        rows += [(f"win rate BoN vs pi_0, judge ({metrics['judge']})", f"{metrics['win_rate_judge_bon_vs_pi0']:.3f}"),
                 ("mean judge reward: BoN / pi_0", f"{metrics['mean_judge_bon']:+.3f} / {metrics['mean_judge_pi0']:+.3f}")]
    if "fluency_bon" in metrics:
        rows.append(("fluency BoN / pi_0", f"{metrics['fluency_bon']:.3f} / {metrics['fluency_pi0']:.3f}"))
    rows.append(("throughput", speed))
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"  {a:<{width}}  {b}" for a, b in rows))
    if metrics.get("curve"):
        from jobs.tables import format_table

        columns = [("k", "n", "{}"), ("mean reward", "mean_reward", "{:+.3f}"), ("win rate vs pi_0", "win_rate_reward", "{:.3f}")]
        if "judge" in metrics:
            columns += [("mean judge", "mean_judge", "{:+.3f}"), ("judge win rate", "win_rate_judge", "{:.3f}")]
        print(f"\n  best of k, read off the same {n} samples per prompt (unbiased; ranked by the {metrics.get('reward', 'gold')} reward):")
        print(format_table(metrics["curve"], columns)[0])
    for r in records[::stride][:k]:  # stride: one example per distinct prompt
        print(f"\n  prompt: {prompt_text(r['prompt'])!r}")
        print(f"    BoN  ({r['rewards'][r['chosen']]:+.3f}): {r['completions'][r['chosen']]!r}")
        print(f"    pi_0 ({r['pi0_reward']:+.3f}): {r['pi0_completion']!r}")


def scorer_spec(cfg: BonConfig) -> dict:
    """The job's scorer: the reward, plus sentence embeddings when RBoN-WD needs them."""
    spec = cfg.reward.spec()
    if cfg.selection == "rbon_wd":
        spec["embedder"] = cfg.rbon.embedder
    return spec


def rejection_spec(cfg: BonConfig, shipped_scorer: dict) -> dict | None:
    """What the generators need for speculative rejection (the scorer, shipped once), or None."""
    if cfg.selection != "speculative_rejection":
        return None
    return {"rejection_rate": cfg.speculative.rejection_rate, "decision_tokens": cfg.speculative.decision_tokens,
            "reward": shipped_scorer}


def check_resources(cfg: BonConfig) -> None:
    """Fail fast, naming the knob, when the pool and scorer cannot all be placed (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    for res, per_actor, scorer, knob in (("CPU", cfg.pool.num_cpus_per_actor, cfg.reward.num_cpus * cfg.reward.num_actors, "num_cpus"),
                                          ("GPU", cfg.pool.num_gpus_per_actor, cfg.reward.num_gpus * cfg.reward.num_actors, "num_gpus")):
        need = cfg.pool.num_actors * per_actor + scorer
        if need > have.get(res, 0):
            raise ConfigError("pool.num_actors", f"num_actors * pool.{knob}_per_actor + reward.num_actors * reward.{knob} <= the "
                              f"cluster's {have.get(res, 0):g} {res}s", f"{cfg.pool.num_actors} x {per_actor:g} + {scorer:g}")


def prepare_output(cfg: BonConfig, out: Path, batch_sizes: dict[int, int]) -> dict[int, dict]:
    """Check the output directory against this config (align.runtime.runstate), save the config, and return
    the records a previous run of the same config already finished."""
    from align.runtime.runstate import check_resume, drop_keys, write_atomic

    final, partial, saved_cfg = out / "samples.jsonl", out / "samples.partial.jsonl", out / "config.yaml"
    current = drop_keys(to_dict(cfg), NOT_IN_RESULT)
    saved = drop_keys(yaml.safe_load(saved_cfg.read_text()), NOT_IN_RESULT) if saved_cfg.exists() else None
    resume = check_resume(saved, current, cfg.resume, str(out), final.exists() or partial.exists())
    if not resume:
        for f in (final, partial, out / "metrics.json"):
            f.unlink(missing_ok=True)
    write_atomic(saved_cfg, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    done = read_records(final if final.exists() else partial, batch_sizes)
    write_atomic(partial, "".join(json.dumps(r) + "\n" for r in sorted(done.values(), key=lambda r: r["index"])))
    if done:
        log.info("resuming: %d of %d prompts already sampled in %s", len(done), sum(batch_sizes.values()), out)
    return done


def run(cfg: BonConfig) -> dict:
    """Run BoN over the prompt set; returns the metrics dict (also written to metrics.json).

    Scored batches are appended to <output_dir>/samples.partial.jsonl as they finish; a rerun of the
    same config skips the prompts already there. At the end samples.jsonl holds every prompt once, in
    order, and the partial file is gone.
    """
    import ray
    from tqdm.auto import tqdm

    from actors.best_of_n import scored_batches
    from actors.cluster import init_ray
    from actors.generator import GeneratorPool
    from actors.scorer import ScorerPool, ship_spec
    from align.data.prompts import load_prompts
    from align.engine.models import resolve_model_path
    from align.rewards.registry import reward_kind
    from align.runtime.runstate import write_atomic

    check_model_paths(cfg)  # a wrong reward model path stops here, before any work

    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    prompts = [p for p in prompts for _ in range(cfg.prompts.repeats)]
    if not prompts:
        raise ConfigError("prompts.source", "a non-empty prompt set", f"{cfg.prompts.source} (split {cfg.prompts.split!r}) has 0 prompts")
    bs = cfg.pool.batch_size
    batches = {b: prompts[i : i + bs] for b, i in enumerate(range(0, len(prompts), bs))}
    out = Path(cfg.output_dir)
    model_path = resolve_model_path(cfg.model.path)
    from align.engine.models import check_prompts_fit

    check_prompts_fit(model_path, prompts, cfg.sampling.max_new_tokens)
    vocabulary = None
    if cfg.model.path == "default":
        from align.task.default_task import ensure_default_task

        task = ensure_default_task()
        vocabulary = task.vocabulary()
        r = task.report
        print(f"  default task pi_0: held-out loss {r['heldout_loss_per_token']:.3f} nats/token, fluency "
              f"{r['fluency']:.3f} (random weights {r['random_init_fluency']:.3f}), {task.policy_dir}")

    n, seconds, new_tokens = cfg.sampling.n, 0.0, 0
    started_ray = init_ray(cfg.ray_address)
    pool = scorers = None
    try:
        check_resources(cfg)  # before anything is written
        done = prepare_output(cfg, out, {b: len(p) for b, p in batches.items()})
        todo = {b: p for b, p in batches.items() if b * bs not in done}
        if todo:
            log.info("starting %d generator actors on %s and %d %s scorer(s)", cfg.pool.num_actors, model_path,
                     cfg.reward.num_actors, cfg.reward.kind)
            pool = GeneratorPool(model_path, cfg.pool.num_actors, cfg.pool.num_cpus_per_actor, cfg.pool.num_gpus_per_actor,
                                 cfg.model.device, cfg.model.dtype, cache=cfg.pool.cache, compile=cfg.pool.compile,
                                 engine=cfg.pool.engine, engine_python=cfg.pool.engine_python)
            spec = ship_spec(scorer_spec(cfg))
            scorers = ScorerPool(spec, cfg.reward.num_actors, cfg.reward.num_cpus, cfg.reward.num_gpus)
            start = time.perf_counter()
            # n+1 draws: the first n for BoN, the last an independent pi_0 sample for the win rate.
            scored = scored_batches(pool, scorers, todo, n + 1, cfg.sampling.max_new_tokens, cfg.seed,
                                      temperature=cfg.sampling.temperature, min_new_tokens=cfg.sampling.min_new_tokens,
                                      stop_at_eos=cfg.sampling.stop_at_eos, rejection=rejection_spec(cfg, spec))
            with (out / "samples.partial.jsonl").open("a") as f, \
                    tqdm(total=len(prompts), initial=len(done), desc=f"best-of-{n}", unit="prompt") as bar:
                for b, samples, tokens in scored:
                    rows = [record(s, b * bs + j, b, cfg) for j, s in enumerate(samples)]
                    f.write("".join(json.dumps(r) + "\n" for r in rows))  # one write per batch, then to disk
                    f.flush()
                    os.fsync(f.fileno())
                    done.update((r["index"], r) for r in rows)
                    new_tokens += tokens
                    bar.update(len(rows))
            seconds = time.perf_counter() - start
    finally:
        for group in (pool, scorers):
            if group is not None:
                group.shutdown()
        if started_ray:
            ray.shutdown()

    records = [done[i] for i in range(len(prompts))]
    for r in records:  # a resumed run's records may carry another judge's grades
        r.pop("judge_rewards", None), r.pop("pi0_judge_reward", None)
    if cfg.judge.kind is not None:
        log.info("grading %d prompts' samples with the judge %s", len(records), cfg.judge.kind)
        judge_records(records, cfg.judge.spec())
    label = cfg.selection if cfg.penalty.kind == "none" else f"{cfg.selection}, penalty {cfg.penalty.kind}"
    metrics = summarize(records, n, seconds, new_tokens, vocabulary, label)
    # A learned reward model (a kind read from a path) is a proxy of what people want, never "gold".
    metrics["reward"] = f"proxy ({cfg.reward.kind})" if reward_kind(cfg.reward.kind).needs_path else "gold"
    if cfg.judge.kind is not None:
        metrics["judge"] = cfg.judge.kind
    write_atomic(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    (out / "samples.partial.jsonl").unlink(missing_ok=True)
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    print_report(metrics, records, n, cfg.num_examples, stride=cfg.prompts.repeats)
    print(f"\n  wrote {out.resolve() / 'samples.jsonl'}")
    return metrics


def main(argv=None) -> dict:
    return run_job(BonConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
