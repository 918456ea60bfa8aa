"""Variational best-of-n (Amini, Vieira, Cotterell 2407.06057; align/math/vbon.py): fine-tune pi_0 on its
own samples so that one sample behaves like best-of-n, minimising KL(pi_theta || pi_bon), i.e.
maximising E[log F_x(r)] - KL(pi_theta || pi_0) / (n - 1).

    python -m jobs.train_vbon --config configs/train_vbon.yaml
    python -m jobs.train_vbon --config configs/train_vbon.yaml vbon.mode=kl_rl vbon.beta=0.1   # the KL-regularised RL baseline
    ray job submit --working-dir . -- python -m jobs.train_vbon --config configs/train_vbon.yaml

1. F_x: M = vbon.reference_samples samples of pi_0 per training prompt, scored once (a generator and
   a scorer pool) and kept in reference_rewards.pt, reused while the config that made them holds.
2. The on-policy loop (actors/vbon_trainer.py): DeepSpeed workers under Ray Train, the same generator
   actors sampling from the current policy (weights pushed every vbon.sync_every steps), the scorer
   actors scoring; RLOO or PPO-clip with the KL to pi_0 in the reward. Checkpoints and resume as the
   other trainers.
3. Evaluation (jobs.evaluate): gold win rate of one sample over one pi_0 sample and KL(pi || pi_0) on
   the test prompts: the run's reward-KL point (eval_metrics.json).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from actors.train_config import TrainConfig
from align.runtime.config import InputRef, OutputPath, require, run_job
from align.objectives.vbon import VbonParams, VbonSampling
from jobs.sections import PoolConfig, PromptsConfig, RewardConfig

log = logging.getLogger("sweetspot.vbon")


@dataclass
class VbonEvalConfig:
    enabled: bool = True
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # the test prompts
    n: int = 4  # samples per prompt from the policy and from pi_0
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge


@dataclass
class VbonJobConfig:
    model: InputRef = "default"  # pi_0: the policy to start from and the KL anchor
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="train"))
    reward: RewardConfig = field(default_factory=RewardConfig)  # the reward whose best-of-n is mimicked
    vbon: VbonParams = field(default_factory=VbonParams)
    sampling: VbonSampling = field(default_factory=VbonSampling)
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=1, num_cpus_per_actor=0.5))
    train: TrainConfig = field(default_factory=TrainConfig)  # batch_size: prompts per step (each with k samples)
    evaluate: VbonEvalConfig = field(default_factory=VbonEvalConfig)
    seed: int = 0
    output_dir: OutputPath = "outputs/vbon"

    def __post_init__(self):
        require(self.train.micro_batches == 1, "train.micro_batches",
                "1 (each step draws and scores its batch on the generators at once; a larger train.batch_size over "
                "more workers instead)", self.train.micro_batches)
        from align.engine.engines import require_capability

        require_capability(self.pool.engine, "weight_updates")


def reference_rewards(cfg: VbonJobConfig, prompts: list[str], pool, scorers, out):
    """(N, M) rewards of M pi_0 samples per prompt, from reference_rewards.pt when it was made under
    the same model, prompts, reward, M, sampling and seed; drawn and scored otherwise."""
    import torch

    from actors.best_of_n import scored_batches
    from align.runtime.config import to_dict
    from align.runtime.runstate import digest

    key = digest({"model": cfg.model, "prompts": prompts, "reward": to_dict(cfg.reward), "m": cfg.vbon.reference_samples,
                  "sampling": to_dict(cfg.sampling), "seed": cfg.seed})
    path = out / "reference_rewards.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)  # a str key and a tensor: nothing to unpickle
        if saved.get("key") == key:
            log.info("F_x: reusing %s (%d prompts x %d pi_0 rewards)", path, *saved["rewards"].shape)
            return saved["rewards"]
        log.info("F_x: %s was made under another config; drawing again", path)
    bs = cfg.pool.batch_size
    batches = {b: prompts[i : i + bs] for b, i in enumerate(range(0, len(prompts), bs))}
    from tqdm.auto import tqdm

    rows: dict[int, list] = {}
    s = cfg.sampling
    with tqdm(total=len(prompts), desc=f"F_x: {cfg.vbon.reference_samples} pi_0 samples per prompt", unit="prompt") as bar:
        for b, scored, _ in scored_batches(pool, scorers, batches, cfg.vbon.reference_samples, s.max_new_tokens,
                                             seed=cfg.seed + 1, temperature=s.temperature,
                                             min_new_tokens=s.min_new_tokens, stop_at_eos=s.stop_at_eos):
            rows[b] = [x.rewards for x in scored]
            bar.update(len(scored))
    rewards = torch.tensor([r for b in sorted(rows) for r in rows[b]], dtype=torch.float64)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"key": key, "rewards": rewards}, tmp)
    tmp.replace(path)
    log.info("F_x: %d prompts x %d pi_0 rewards, mean %.3f", *rewards.shape, rewards.mean())
    return rewards


def run(cfg: VbonJobConfig) -> dict:
    import time
    from pathlib import Path

    import ray

    from actors.cluster import init_ray, ship_dir
    from actors.generator import GeneratorPool
    from actors.scorer import ScorerPool
    from actors.train_launcher import launch_training
    from actors.vbon_trainer import vbon_worker
    from align.runtime.config import to_dict
    from align.data.prompts import load_prompts
    from align.engine.models import resolve_model_path
    from align.runtime.runstate import digest, path_fingerprint
    from jobs.sections import check_model_field, check_model_paths
    from jobs.training import finish, start_run

    check_model_field(cfg.model)
    check_model_paths(cfg)  # wrong model paths stop here, before any work
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = cfg.train.run.storage_path
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    model_path = Path(resolve_model_path(cfg.model))
    params = {"n": cfg.vbon.n, "mode": cfg.vbon.mode, "beta": cfg.vbon.kl_weight, "algo": cfg.vbon.algo,
              "clip": cfg.vbon.clip, "k": cfg.vbon.k, "sync_every": cfg.vbon.sync_every,
              "reference_samples": cfg.vbon.reference_samples, "sampling": to_dict(cfg.sampling)}
    key = {"objective": "vbon", "params": params, "prompts": digest(prompts), "reward": to_dict(cfg.reward), "seed": cfg.seed,
           "model": {"path": str(model_path), "files": path_fingerprint(model_path) if model_path.is_dir() else None},
           "train": {k: v for k, v in to_dict(cfg.train).items() if k not in ("run", "workers", *TrainConfig.NOT_IN_RUN_KEY)}}
    started = init_ray()
    pool = scorers = None
    try:
        start_run(f"vBoN ({cfg.vbon.mode}, n={cfg.vbon.n}, beta={cfg.vbon.kl_weight:.4g}, {cfg.vbon.algo})", cfg, out,
                  storage, key)
        p = cfg.pool
        pool = GeneratorPool(str(model_path), p.num_actors, p.num_cpus_per_actor, p.num_gpus_per_actor, cache=p.cache,
                             compile=p.compile, restartable=True)  # the trainer's handles survive a restart
        scorers = ScorerPool(cfg.reward.spec(), cfg.reward.num_actors, cfg.reward.num_cpus, cfg.reward.num_gpus)
        ref = reference_rewards(cfg, prompts, pool, scorers, out)
        data_ref = ray.put({"prompts": prompts, "ref_rewards": ref})
        # Its own loop, not a pair objective: the typed sections cross to the workers; the model records saved_as.
        metrics = launch_training(None, ship_dir(model_path), data_ref, cfg.train, out, storage, loop=vbon_worker,
                                  extra={"vbon": cfg.vbon, "sampling": cfg.sampling,
                                         "saved_as": {"objective": "vbon", **params},
                                         "generators": pool.actors, "scorers": scorers.actors})
        # the generators hold the last weights pushed: they must be the trained model's, bit for bit
        from align.engine.models import load_causal_lm
        from align.math.vbon import state_digest

        trained, _ = load_causal_lm(str(out / "model"), device="cpu")
        metrics["sync_exact"] = float(all(d == state_digest(trained.state_dict())
                                          for d in ray.get([a.weights_digest.remote() for a in pool.actors])))
    finally:
        for group in (pool, scorers):
            if group is not None:
                group.shutdown()
        if started:
            ray.shutdown()
    result = finish(f"vBoN ({cfg.vbon.mode}, n={cfg.vbon.n})", metrics, out, time.perf_counter() - start)
    if cfg.evaluate.enabled:
        from jobs.sections import SamplingConfig
        from jobs.evaluate import EvalConfig
        from jobs.evaluate import run as evaluate

        s = cfg.sampling
        result["eval"] = evaluate(EvalConfig(
            policy=str(out / "model"), reference=cfg.model, reward=cfg.evaluate.reward, prompts=cfg.evaluate.prompts,
            sampling=SamplingConfig(n=cfg.evaluate.n, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                                    min_new_tokens=s.min_new_tokens, stop_at_eos=s.stop_at_eos),
            seed=cfg.seed, output_dir=str(out)))
    return result


def main(argv=None) -> dict:
    return run_job(VbonJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
