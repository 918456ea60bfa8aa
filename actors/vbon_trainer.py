"""The on-policy loop of variational BoN (align/math/vbon.py), run by each Ray Train worker around a
DeepSpeed engine, with generator and scorer actors outside the worker group (the OpenRLHF layout):

    every step   rank r takes its slice of the step's prompts, has a generator actor sample k
                 completions each (per-prompt seeds: W ranks draw what one would), has a scorer
                 actor score them, turns rewards into log F_x(r) against the prompt's pi_0 reference
                 rewards (or keeps the raw reward: the KL-regularised RL baseline), and takes an RLOO
                 or PPO-clip step with the KL to pi_0 (a frozen copy on every rank) in the reward
    every K      the policy's full weights (gathered under ZeRO-3) go to every generator actor:
    steps        one ray.put by rank 0, one get per actor; its seconds are logged (sync_s)

It runs in the loop shell (actors/train_loop.py) as a StepAlgorithm, so checkpoints, resume and the
log are the offline trainer's; after a resume the first thing the workers do is push the resumed
weights to the generators.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from align.engine.chat import generation_eos, stop_ids_of

if TYPE_CHECKING:
    from actors.train_config import TrainConfig
    from align.objectives.vbon import VbonParams, VbonSampling

log = logging.getLogger("sweetspot.vbon")


def step_seeds(seed: int, step: int, indices) -> list[int]:
    """One sampling seed per (step, prompt): the same whichever rank or how many ranks draw it."""
    from actors.generator import batch_seed

    return [batch_seed(batch_seed(seed, step), int(i)) for i in indices]


def push_weights(engine, zero_stage: int, rank: int, generators: list, version: int) -> float:
    """Send the policy's full weights, as `version` (the step), to every generator actor (a collective:
    call on all ranks); returns the seconds it took, gather included."""
    import ray
    import torch.distributed as dist

    from actors.train_loop import full_state_dict

    start = time.perf_counter()
    state = full_state_dict(engine, zero_stage)
    if rank == 0:
        ref = ray.put(state)  # one copy in the object store, fetched by each actor
        ray.get([g.set_weights.remote(ref, version) for g in generators])
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


class OnPolicySteps:
    """vBoN / KL-regularised RL as a StepAlgorithm (actors.train_loop): each step this rank samples k
    completions per prompt of its slice from its generator actor, has them scored, and returns the
    RLOO or PPO-clip loss with the KL to pi_0 in the reward; every sync_every steps the weights go
    to the generators."""

    def __init__(self, engine, ref_model, tokenizer, prompts: list, ref_rewards: torch.Tensor, params: VbonParams,
                 sampling: VbonSampling, train: TrainConfig,
                 generators: list, scorers: list, rank: int, world: int, zero_stage: int):
        self.engine, self.ref_model, self.tokenizer, self.prompts, self.ref_rewards = engine, ref_model, tokenizer, prompts, ref_rewards
        self.p, self.s, self.train, self.rank, self.world, self.zero_stage = params, sampling, train, rank, world, zero_stage
        self.generators, self.micro = generators, train.batch_size // world  # prompts per rank per step
        self.generator, self.scorer = generators[rank % len(generators)], scorers[rank % len(scorers)]
        self.hook_context = {"generator": self.generator}
        # every end-of-turn id, as the generators stop on them (align.engine.chat)
        self.eos = (stop_ids_of(tokenizer, generation_eos(tokenizer.name_or_path)) or None) if sampling.stop_at_eos else None
        self.min_new = sampling.min_new_tokens if self.eos is not None else 0
        self.pushed = 0
        self.counts = {"samples": 0, "syncs": 0, "sync_seconds": 0.0}  # since the last logged row

    def load_extra(self, directory: str) -> None:
        pass  # the policy and optimizer are all the state (the reference is pi_0, rebuilt)

    def save_extra(self, directory: str) -> None:
        pass

    def start(self, step: int) -> None:
        push_weights(self.engine, self.zero_stage, self.rank, self.generators, step)  # pi_0, or the resumed policy
        self.pushed = step

    def loss(self, step: int, part: int = 0):  # one part: jobs.train_vbon refuses train.micro_batches > 1
        import ray

        from actors.train_loop import batch_indices
        from align.math.losses import model_sequence_logps
        from align.math.vbon import completion_batch, log_cdf, policy_gradient_loss

        p, s, micro, rank = self.p, self.s, self.micro, self.rank
        idx = batch_indices(step, self.train.batch_size, len(self.prompts), self.train.seed)[rank * micro : (rank + 1) * micro]
        mine = [self.prompts[int(i)] for i in idx]
        # A generator restarted since the last push holds pi_0's weights and refuses (StaleWeightsError);
        # so does a lost call: the group then restarts from the last checkpoint and pushes it again.
        drawn = ray.get(self.generator.sample.remote(
            mine, p.k, s.max_new_tokens, temperature=s.temperature, min_new_tokens=s.min_new_tokens,
            stop_at_eos=s.stop_at_eos, seeds=step_seeds(self.train.seed, step, idx), weights_version=self.pushed))["samples"]
        scored = ray.get(self.scorer.score_samples.remote(drawn))
        rewards = torch.tensor([x.rewards for x in scored], dtype=torch.float64)  # (micro, k)
        log_f = log_cdf(rewards, self.ref_rewards[idx])
        task = (log_f if p.mode == "vbon" else rewards).reshape(-1)
        batch = completion_batch([x.prompt_ids for x in scored for _ in x.completion_ids],
                                 [c for x in scored for c in x.completion_ids], self.tokenizer.pad_token_id, self.min_new)
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        process = dict(temperature=s.temperature, eos_token_id=self.eos, eos_blocked=batch["eos_blocked"])
        logp, lengths = model_sequence_logps(self.engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **process)
        with torch.no_grad():
            ref_logp, _ = model_sequence_logps(self.ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **process)
        old = torch.tensor([lp for x in scored for lp in x.logprobs], device=self.engine.device)
        loss, metrics = policy_gradient_loss(logp, ref_logp.to(logp.dtype), task.to(self.engine.device), p.kl_weight, p.k,
                                             old_logp=old if p.algo == "ppo_clip" else None, clip=p.clip)
        self.counts["samples"] += len(old)
        return loss, {"reward": float(rewards.mean()), "log_f": float(log_f.mean()), "kl": float(metrics["kl"]),
                      "entropy": float(-old.double().mean()), "clipped": float(metrics["clipped"]),
                      "tokens": float(lengths.float().mean())}

    def after_step(self, step: int) -> None:
        if step % self.p.sync_every == 0 or step == self.train.steps:
            self.counts["sync_seconds"] += push_weights(self.engine, self.zero_stage, self.rank, self.generators, step)
            self.pushed = step
            self.counts["syncs"] += 1

    def window(self, seconds: float) -> dict:
        c, self.counts = self.counts, {"samples": 0, "syncs": 0, "sync_seconds": 0.0}
        return {"sync_s": c["sync_seconds"] / max(c["syncs"], 1), "sync_share": c["sync_seconds"] / max(seconds, 1e-9),
                "samples_per_s": c["samples"] / max(seconds, 1e-9)}

    def finish_report(self, report: dict, step: int, last: bool) -> dict:
        report["samples_per_s"] *= self.world  # sync_s: seconds per weight push; sync_share: of the wall time
        return report


def vbon_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` for vBoN. config: the offline trainer's keys (objective None,
    saved_as, model, output_dir, storage_path, train, lora None), "vbon" and "sampling" (the job's
    typed sections, align.objectives.vbon), "data": an
    ObjectRef of {"prompts": [...], "ref_rewards": (N, M) tensor}, "generators" and "scorers": lists
    of actor handles (actors.generator.Generator, actors.scorer.ScorerActor)."""
    import ray

    from actors.cluster import local_dir
    from actors.train_loop import make_engine, run_steps, upload_final_model, worker_setup
    from align.engine.models import build_model_for, load_tokenizer

    rank, world, bf16, zero_stage = worker_setup(config)
    train, p = config["train"], config["vbon"]
    model_path = local_dir(config["model"])
    tokenizer = load_tokenizer(model_path)
    model = build_model_for("causal_lm", model_path, tokenizer)
    ref_model = build_model_for("causal_lm", model_path, tokenizer).eval().requires_grad_(False)
    for m in [*model.modules(), *ref_model.modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the sampler runs without dropout: log-probs must describe the same process
    data = ray.get(config["data"])
    engine = make_engine(model, train, train.batch_size // world * p.k, bf16)
    ref_model.to(device=engine.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    steps = OnPolicySteps(engine, ref_model, tokenizer, data["prompts"], data["ref_rewards"], p, config["sampling"], train,
                          config["generators"], config["scorers"], rank, world, zero_stage)
    run_dir = run_steps(engine, steps, config, rank, world)
    upload_final_model(engine, zero_stage, rank, "causal_lm", model_path, config, tokenizer, run_dir)
