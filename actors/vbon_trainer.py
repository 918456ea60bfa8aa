"""The on-policy loop of variational BoN (align/math/vbon.py), run by each Ray Train worker around a
DeepSpeed engine, with generator and scorer actors outside the worker group (the OpenRLHF layout):

    every step   rank r takes its slice of the step's prompts, has a generator actor sample k
                 completions each (per-prompt seeds: W ranks draw what one would), has a scorer
                 actor score them, turns rewards into log F_x(r) against the prompt's pi_0 reference
                 rewards (or keeps the raw reward: the KL-regularised RL baseline), and takes an RLOO
                 or PPO-clip step with the KL to pi_0 (a frozen copy on every rank) in the reward
    every K      the policy's full weights (gathered under ZeRO-3) go to every generator actor:
    steps        one ray.put by rank 0, one get per actor; its seconds are logged (sync_s)

Checkpoints and resume are the offline trainer's (actors/trainer.py); after a resume the first
thing the workers do is push the resumed weights to the generators.
"""
from __future__ import annotations

import logging
import time

import torch

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

    from actors.trainer import full_state_dict

    start = time.perf_counter()
    state = full_state_dict(engine, zero_stage)
    if rank == 0:
        ref = ray.put(state)  # one copy in the object store, fetched by each actor
        ray.get([g.set_weights.remote(ref, version) for g in generators])
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def vbon_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` for vBoN. config: the offline trainer's keys (objective None,
    saved_as, model, output_dir, storage_path, train, lora None), "objective_params", "data": an
    ObjectRef of {"prompts": [...], "ref_rewards": (N, M) tensor}, "generators" and "scorers": lists
    of actor handles (actors.generator.Generator, actors.scorer.ScorerActor)."""
    import deepspeed
    import ray

    from actors.checkpoints import RunDir
    from actors.cluster import local_dir
    from actors.trainer import (batch_indices, deepspeed_config, inject_failure, linear_schedule, mean_over_ranks,
                                resume_newest, rewrite_log, save_checkpoint, upload_final_model, worker_setup)
    from align.math.losses import model_sequence_logps
    from align.engine.models import build_model_for, load_tokenizer
    from align.math.vbon import completion_batch, log_cdf, policy_gradient_loss

    rank, world, bf16, zero_stage = worker_setup(config)
    train, p = config["train"], config["objective_params"]
    generators, scorers = config["generators"], config["scorers"]
    model_path = local_dir(config["model"])
    tokenizer = load_tokenizer(model_path)
    model = build_model_for("causal_lm", model_path, tokenizer)
    ref_model = build_model_for("causal_lm", model_path, tokenizer).eval().requires_grad_(False)
    for m in [*model.modules(), *ref_model.modules()]:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the sampler runs without dropout: log-probs must describe the same process
    data = ray.get(config["data"])
    prompts, ref_rewards = data["prompts"], data["ref_rewards"]
    micro = train["batch_size"] // world  # prompts per rank per step
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[q for q in model.parameters() if q.requires_grad],
        config=deepspeed_config(train, micro * p["k"], bf16),
        lr_scheduler=linear_schedule(train["steps"], train["optim"]["warmup_steps"]),
    )
    ref_model.to(device=engine.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    run = train["run"]
    run_dir = RunDir(config["storage_path"], run["name"])
    step = resume_newest(engine, run_dir, rank)
    push_weights(engine, zero_stage, rank, generators, step)  # pi_0, or the resumed policy
    pushed = step
    s = p["sampling"]
    eos = tokenizer.eos_token_id if s["stop_at_eos"] else None
    min_new = s["min_new_tokens"] if eos is not None else 0
    window = {"samples": 0, "syncs": 0, "sync_seconds": 0.0}  # since the last logged row
    t0 = time.perf_counter()
    while step < train["steps"]:
        idx = batch_indices(step, train["batch_size"], len(prompts), train["seed"])[rank * micro : (rank + 1) * micro]
        mine = [prompts[int(i)] for i in idx]
        gen, scorer = generators[rank % len(generators)], scorers[rank % len(scorers)]
        inject_failure(train, step, rank, world, config["output_dir"], generator=gen)
        # A generator restarted since the last push holds pi_0's weights and refuses (StaleWeightsError);
        # so does a lost call: the group then restarts from the last checkpoint and pushes it again.
        drawn = ray.get(gen.sample.remote(mine, p["k"], s["max_new_tokens"], temperature=s["temperature"],
                                          min_new_tokens=s["min_new_tokens"], stop_at_eos=s["stop_at_eos"],
                                          seeds=step_seeds(train["seed"], step, idx), weights_version=pushed))["samples"]
        scored = ray.get(scorer.score_samples.remote(drawn))
        rewards = torch.tensor([x.rewards for x in scored], dtype=torch.float64)  # (micro, k)
        log_f = log_cdf(rewards, ref_rewards[idx])
        task = (log_f if p["mode"] == "vbon" else rewards).reshape(-1)
        batch = completion_batch([x.prompt_ids for x in scored for _ in x.completion_ids],
                                 [c for x in scored for c in x.completion_ids], tokenizer.pad_token_id, min_new)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        process = dict(temperature=s["temperature"], eos_token_id=eos, eos_blocked=batch["eos_blocked"])
        engine.train()
        logp, lengths = model_sequence_logps(engine, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **process)
        with torch.no_grad():
            ref_logp, _ = model_sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], **process)
        old = torch.tensor([lp for x in scored for lp in x.logprobs], device=engine.device)
        loss, metrics = policy_gradient_loss(logp, ref_logp.to(logp.dtype), task.to(engine.device), p["beta"], p["k"],
                                             old_logp=old if p["algo"] == "ppo_clip" else None, clip=p["clip"])
        lr = engine.get_lr()[0]
        engine.backward(loss)
        engine.step()
        step += 1
        if step % p["sync_every"] == 0 or step == train["steps"]:
            window["sync_seconds"] += push_weights(engine, zero_stage, rank, generators, step)
            pushed = step
            window["syncs"] += 1
        window["samples"] += len(old)

        last = step == train["steps"]
        if step % run["log_every"] == 0 or step % run["checkpoint_every"] == 0 or last:
            seconds = time.perf_counter() - t0
            report = mean_over_ranks({"loss": loss.item(), "reward": float(rewards.mean()), "log_f": float(log_f.mean()),
                                      "kl": float(metrics["kl"]), "entropy": float(-old.double().mean()),
                                      "clipped": float(metrics["clipped"]), "tokens": float(lengths.float().mean()),
                                      "sync_s": window["sync_seconds"] / max(window["syncs"], 1),
                                      "sync_share": window["sync_seconds"] / max(seconds, 1e-9),
                                      "samples_per_s": window["samples"] / max(seconds, 1e-9)}, engine.device)
            report["samples_per_s"] *= world  # sync_s: seconds per weight push; sync_share: of the wall time
            report.update(step=step, lr=lr)
            if rank == 0:
                rewrite_log(run_dir, lambda rows: rows + [report])
            if step % run["checkpoint_every"] == 0 or last:
                save_checkpoint(engine, run_dir, step, report, rank, run["keep_checkpoints"])
            window, t0 = {"samples": 0, "syncs": 0, "sync_seconds": 0.0}, time.perf_counter()

    upload_final_model(engine, zero_stage, rank, "causal_lm", model_path, config, tokenizer, run_dir)
