"""Gold reward against generated tokens: plain best-of-n at several n and speculative rejection at
several settings, each one run of jobs.bon on the same prompts, seeds and sampling settings.

    python -m jobs.bench.speculative --config configs/bench/speculative.yaml
    python -m jobs.bench.speculative --config configs/bench/speculative.yaml quick=true   # smoke run

Tokens are those drawn for a prompt's candidates, rows rejected on the way included (the independent
pi_0 sample every jobs.bon run draws is not counted). The reward that ranks candidates (and scores
partial completions) is bon.reward; on the default task it is VADER, the gold reward itself. Each run
keeps its own output directory under output_dir (keyed by its setting), so a rerun of the same config
reuses finished runs (jobs.bon's resume).

What limits rejection is how well a partial score predicts the final one. A second table measures it
on the reference run's candidates: at each decision point t, the partial completions (their first t
tokens) are scored with the same reward and compared with the full completions' rewards, as Spearman
rank correlation per prompt and as how often keeping the top `keep_fraction` of partial scores keeps
the candidate best-of-n would choose (rejection at random keeps it keep_fraction of the time).
Writes results.json, results.md, reward_vs_tokens.png.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.runtime.config import OutputPath, require, run_job
from jobs.bon import BonConfig
from jobs.sections import SpeculativeConfig

log = logging.getLogger("sweetspot.bench_speculative")


@dataclass
class SpeculativeSetting:
    n: int = 64  # continuations started per prompt
    rejection_rate: float = 0.75
    decision_tokens: list[int] = field(default_factory=lambda: [4])

    def __post_init__(self):
        require(self.n >= 2, "n", "an integer >= 2", self.n)
        SpeculativeConfig(self.rejection_rate, self.decision_tokens)  # the same checks as jobs.bon's

    @property
    def label(self) -> str:
        return f"SR n={self.n} rate={self.rejection_rate:g} at {','.join(map(str, self.decision_tokens))}"


def _default_settings() -> list[SpeculativeSetting]:
    return [SpeculativeSetting(64, 0.75, [4]), SpeculativeSetting(64, 0.75, [4, 8]), SpeculativeSetting(64, 0.5, [2, 4, 8]),
            SpeculativeSetting(128, 0.875, [2, 6])]


QUICK = dict(ns=[2, 4], settings=[SpeculativeSetting(4, 0.5, [2])])


@dataclass
class BenchSpeculativeConfig:
    bon: BonConfig = field(default_factory=BonConfig)  # prompts, sampling (n is set per run), reward, pool
    ns: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # plain best-of-n runs
    reference_n: int = 64  # the plain run whose reward and tokens the speculative runs are compared with
    settings: list[SpeculativeSetting] = field(default_factory=_default_settings)
    quick: bool = False  # ns [2, 4], one speculative setting, and the prompt limit below
    quick_prompts: int = 8
    keep_fraction: float = 0.25  # the cut the partial-score table tests: the top fraction kept at each point
    output_dir: OutputPath = "outputs/bench_speculative"

    def __post_init__(self):
        require(len(self.ns) >= 1 and all(n >= 1 for n in self.ns), "ns", "a non-empty list of integers >= 1", self.ns)
        require(self.quick or self.reference_n in self.ns, "reference_n", f"one of ns {self.ns}", self.reference_n)
        require(0 < self.keep_fraction < 1, "keep_fraction", "a number in (0, 1)", self.keep_fraction)
        for s in self.settings:
            require(s.decision_tokens[-1] < self.bon.sampling.max_new_tokens, "settings.decision_tokens",
                    f"decision points below bon.sampling.max_new_tokens ({self.bon.sampling.max_new_tokens})", s.decision_tokens)


def runs(cfg: BenchSpeculativeConfig, out: Path) -> list[tuple[str, BonConfig]]:
    """(label, the jobs.bon config) of every run, plain best-of-n first."""
    base = cfg.bon
    if cfg.quick:
        base = dataclasses.replace(base, prompts=dataclasses.replace(base.prompts, limit=cfg.quick_prompts, repeats=1))
    plans = []
    for n in cfg.ns:
        plans.append((f"BoN n={n}", dataclasses.replace(base, sampling=dataclasses.replace(base.sampling, n=n),
                                                        selection="argmax", output_dir=str(out / f"bon_n{n}"), num_examples=0)))
    for s in cfg.settings:
        name = f"sr_n{s.n}_r{s.rejection_rate:g}_d{'-'.join(map(str, s.decision_tokens))}"
        plans.append((s.label, dataclasses.replace(base, sampling=dataclasses.replace(base.sampling, n=s.n),
                                                   selection="speculative_rejection", num_examples=0, output_dir=str(out / name),
                                                   speculative=SpeculativeConfig(s.rejection_rate, s.decision_tokens))))
    return plans


def summarize_run(label: str, bon_cfg: BonConfig, metrics: dict) -> dict:
    """A table row from one jobs.bon run: mean reward of the chosen candidates with its standard error."""
    records = [json.loads(line) for line in (Path(bon_cfg.output_dir) / "samples.jsonl").read_text().splitlines()]
    chosen = [r["rewards"][r["chosen"]] for r in records]
    mean = sum(chosen) / len(chosen)
    sd = math.sqrt(sum((x - mean) ** 2 for x in chosen) / max(len(chosen) - 1, 1))
    return {"label": label, "selection": bon_cfg.selection, "n": bon_cfg.sampling.n, "prompts": len(records),
            "mean_reward": mean, "stderr": sd / math.sqrt(len(chosen)), "win_rate": metrics["win_rate_bon_vs_pi0"],
            "tokens_per_prompt": metrics["drawn_tokens_per_prompt"]}


def partial_score_quality(bon_cfg: BonConfig, points: list[int], keep_fraction: float) -> list[dict]:
    """Per decision point t: how well the reward of a candidate's first t tokens predicts its final
    reward, over the candidates of the jobs.bon run in bon_cfg.output_dir (see the module docstring)."""
    import torch

    from actors.scorer import make_scorer
    from align.engine.models import load_tokenizer, resolve_model_path
    from align.math.speculative import best_survives, rank_correlation

    records = [json.loads(line) for line in (Path(bon_cfg.output_dir) / "samples.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(resolve_model_path(bon_cfg.model.path)))
    scorer = make_scorer(bon_cfg.reward.spec())
    final = torch.tensor([r["rewards"] for r in records], dtype=torch.float64)  # (P, m)
    P, m = final.shape
    keep = max(1, round(keep_fraction * m))
    prompts = [r["prompt"] for r in records for _ in range(m)]
    rows = []
    for t in points:
        texts = tokenizer.batch_decode([ids[:t] for r in records for ids in r["completion_ids"]], skip_special_tokens=True)
        partial = scorer.score(prompts, texts).mean.to(torch.float64).view(P, m)
        rho = rank_correlation(partial, final)
        rho = rho[~rho.isnan()]  # a prompt whose partial (or final) rewards are all equal ranks nothing
        kept = best_survives(partial, final, keep).to(torch.float64)
        se = lambda v: (v.std() / len(v) ** 0.5).item() if len(v) > 1 else None  # noqa: E731
        rows.append({"tokens": t, "spearman": rho.mean().item() if len(rho) else None, "spearman_se": se(rho),
                     "ranked_prompts": len(rho), "best_kept": kept.mean().item(), "best_kept_se": se(kept),
                     "chance": keep / m, "prompts": P, "candidates": m, "keep": keep})
    return rows


QUALITY_COLUMNS = [("decision point (tokens)", "tokens", "{}"), ("Spearman(partial, final)", "spearman", "{:.3f}"),
                   ("+-", "spearman_se", "{:.3f}"),
                   ("prompts ranked", "ranked_prompts", "{}"), ("best kept", "best_kept", "{:.3f}"), ("+- ", "best_kept_se", "{:.3f}"),
                   ("at random", "chance", "{:.3f}")]


COLUMNS = [("run", "label", "{}"), ("tokens/prompt", "tokens_per_prompt", "{:.0f}"), ("tokens vs ref", "token_ratio", "{:.3f}"),
           ("gold reward", "mean_reward", "{:+.3f}"), ("+-", "stderr", "{:.3f}"), ("reward - ref", "reward_gap", "{:+.3f}"),
           ("win rate vs pi_0", "win_rate", "{:.3f}")]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    plain = [r for r in rows if r["selection"] == "argmax"]
    spec = [r for r in rows if r["selection"] != "argmax"]
    ax.errorbar([r["tokens_per_prompt"] for r in plain], [r["mean_reward"] for r in plain], yerr=[r["stderr"] for r in plain],
                marker="o", capsize=3, label="best-of-n")
    for r in plain:
        ax.annotate(f"n={r['n']}", (r["tokens_per_prompt"], r["mean_reward"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.errorbar([r["tokens_per_prompt"] for r in spec], [r["mean_reward"] for r in spec], yerr=[r["stderr"] for r in spec],
                marker="s", linestyle="none", capsize=3, label="speculative rejection")
    for r in spec:
        ax.annotate(r["label"].removeprefix("SR "), (r["tokens_per_prompt"], r["mean_reward"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens drawn per prompt (candidates)")
    ax.set_ylabel("gold reward of the chosen completion")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: BenchSpeculativeConfig) -> dict:
    from actors.cluster import init_ray
    from jobs.bench.common import publish
    from jobs.bon import run as run_bon

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    plans = runs(cfg, out)
    started = init_ray(cfg.bon.ray_address)
    try:
        rows = []
        for i, (label, bon_cfg) in enumerate(plans):
            log.info("run %d of %d: %s", i + 1, len(plans), label)
            rows.append(summarize_run(label, bon_cfg, run_bon(bon_cfg)))
    finally:
        if started:
            import ray

            ray.shutdown()
    ref_n = max(cfg.ns) if cfg.quick else cfg.reference_n
    ref = next(r for r in rows if r["selection"] == "argmax" and r["n"] == ref_n)
    for r in rows:
        r["token_ratio"] = r["tokens_per_prompt"] / ref["tokens_per_prompt"]
        r["reward_gap"] = r["mean_reward"] - ref["mean_reward"]
    header = (f"Gold reward of the chosen completion against tokens drawn per prompt, {ref['prompts']} prompts, "
              f"reference BoN n={ref_n}; max_new_tokens {cfg.bon.sampling.max_new_tokens}, reward {cfg.bon.reward.kind}.")
    from jobs.bench.common import format_table

    ref_cfg = next(c for label, c in plans if c.selection == "argmax" and c.sampling.n == ref_n)
    points = sorted({t for s in (QUICK["settings"] if cfg.quick else cfg.settings) for t in s.decision_tokens}
                    | {t for t in (2, 4, 8, 12, 16) if t < cfg.bon.sampling.max_new_tokens})
    quality = partial_score_quality(ref_cfg, points, cfg.keep_fraction)
    q = quality[0]
    text, md = format_table(quality, QUALITY_COLUMNS)
    quality_header = (f"How well a partial completion's reward predicts its final reward, over the {q['candidates']} "
                      f"candidates of each of the {q['prompts']} prompts of BoN n={ref_n}; best kept: the top "
                      f"{q['keep']} of {q['candidates']} by partial reward include a best final candidate.")
    result = {"rows": rows, "reference_n": ref_n, "partial_score_quality": quality,
              "wall_seconds": time.perf_counter() - start}
    plot(rows, out / "reward_vs_tokens.png")
    publish(cfg, result, header, rows, COLUMNS,
            extra_md=f"\n![reward vs tokens](reward_vs_tokens.png)\n\n{quality_header}\n\n{md}\n")
    print(f"\n  {quality_header}\n\n{text}\n  plot: {out / 'reward_vs_tokens.png'}", flush=True)
    return result


def main(argv=None) -> dict:
    return run_job(BenchSpeculativeConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
