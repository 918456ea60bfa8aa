"""The training worker: one loop for every objective, run by each Ray Train worker around a DeepSpeed
engine (ZeRO 0-3; bf16 on GPU, fp32 on CPU over gloo).

Each step takes a deterministic global batch (a seeded permutation per epoch) and gives rank r the
r-th contiguous slice, so W workers on slices equal one worker on the whole batch (DeepSpeed averages
the gradients). Checkpoints are DeepSpeed checkpoints reported to Ray Train with the step count and,
for TR-DPO, the reference weights; a restarted or resumed run continues bit for bit. The TR-DPO
reference is a full (unpartitioned) copy on every rank: under ZeRO-3 the policy's parameters are
gathered around the pure update in align/math/losses.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from align.objectives.base import Objective

log = logging.getLogger("sweetspot.trainer")

REF_FILE = "reference.safetensors"  # TR-DPO's moving reference weights
REF_LOGPS_FILE = "reference_logps.safetensors"  # a frozen reference's (N, 2) log-probs, computed at step 0
EVAL_REF_LOGPS_FILE = "eval_reference_logps.safetensors"  # the same for the validation pairs


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> torch.Tensor:
    """Example indices of global batch `step`: consecutive slices of a fresh permutation per epoch."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def deepspeed_config(train: dict, micro_batch: int, use_bf16: bool) -> dict:
    """The DeepSpeed config for one rank: AdamW (torch implementation: no JIT build), explicit
    clipping, ZeRO stage from the job config. The schedule is `linear_schedule` (DeepSpeed's
    WarmupDecayLR needs >= 1 warmup step and starts at lr 0)."""
    optim = train["optim"]
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim["grad_clip"],
        "zero_optimization": {"stage": train["deepspeed"]["zero_stage"]},
        "bf16": {"enabled": use_bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": optim["lr"], "weight_decay": optim["weight_decay"],
                                                  "betas": list(optim["adam_betas"]), "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def linear_schedule(steps: int, warmup_steps: int):
    """lr factor at step s: s / warmup during warmup, then linear decay to 1/steps at the last step
    (as transformers' get_linear_schedule_with_warmup). Returns DeepSpeed's lr_scheduler callable."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(s: int) -> float:
        if s < warmup_steps:
            return s / warmup_steps
        return max(0.0, (steps - s) / max(1, steps - warmup_steps))

    return lambda optimizer: LambdaLR(optimizer, factor)


def gathered(params, zero_stage: int, modifier_rank: int | None = None):
    """Full parameters inside the block under ZeRO-3; a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def update_reference(model, ref_model, mode: str, alpha: float, zero_stage: int) -> None:
    """TR-DPO reference update; the ZeRO-3 gather is kept apart from the pure update."""
    from align.math.losses import hard_update_, soft_update_

    params = list(model.parameters())
    with gathered(params, zero_stage):
        if mode == "soft":
            soft_update_(ref_model.parameters(), params, alpha)
        else:
            hard_update_(ref_model.parameters(), params)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """A CPU float32 copy of every parameter and buffer (collective: call on all ranks).

    Parameters come from the optimizer's fp32 master weights where there are any (bf16/fp16 training,
    ZeRO 1-3; `deepspeed.utils.safe_get_full_fp32_param`, which gathers ZeRO-3 partitions), never
    from the low-precision module copy; otherwise from the module, gathered under ZeRO-3.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module
    names = {id(p): k for k, p in model.named_parameters()}
    masters = {}
    for p in model.parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            if full is not None:
                masters[names[id(p)]] = full.detach().float().cpu()
    with gathered(model.parameters(), zero_stage):
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for k, v in masters.items():
        state[k] = v.view_as(state[k]) if v.numel() == state[k].numel() else v
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def mean_over_ranks(metrics: dict, device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce, on the engine's device: NCCL takes no CPU
    tensors) so logs describe the global batch."""
    import torch.distributed as dist

    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vals)
        vals /= dist.get_world_size()
    return dict(zip(keys, vals.tolist()))


def rewrite_log(run_dir, edit) -> None:
    """Replace the run's train_log.jsonl (in its storage directory, where the driver reads it) by
    edit(rows), through a temporary file and a rename."""
    from actors.checkpoints import LOG_FILE

    text = run_dir.read_text(LOG_FILE) or ""
    rows = edit([json.loads(line) for line in text.splitlines()])
    run_dir.write_text(LOG_FILE, "".join(json.dumps(r) + "\n" for r in rows))


@torch.no_grad()
def reference_table(model, data, micro: int, pad_id: int, eos_id: int | None, rank: int, world: int, device,
                    collate) -> torch.Tensor:
    """(N, 2) log-probs of (chosen, rejected) for every pair under `model` at step 0, the frozen
    reference: each rank scores every world-th pair and an all-gather assembles the table, so the
    work is spread over the workers and no model runs on the driver. Every rank runs the same number
    of forwards (ZeRO-3 gathers parameters inside each one)."""
    import torch.distributed as dist

    from align.objectives.base import pair_logps

    n = len(data)
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    mine += [-1] * (per_rank - len(mine))  # padding: scored (index 0) and dropped
    was_training = model.training
    model.eval()
    values = []
    for i in range(0, per_rank, micro):
        chunk = mine[i : i + micro]
        batch = collate([data[max(j, 0)] for j in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        c, r, _ = pair_logps(model, batch, eos_id)
        values.append(torch.stack([c, r], 1).float())
    model.train(was_training)
    local = torch.cat(values)  # (per_rank, 2)
    index = torch.tensor(mine, device=device)
    if world > 1:
        gathered_v = [torch.empty_like(local) for _ in range(world)]
        gathered_i = [torch.empty_like(index) for _ in range(world)]
        dist.all_gather(gathered_v, local)
        dist.all_gather(gathered_i, index)
        local, index = torch.cat(gathered_v), torch.cat(gathered_i)
    table = torch.empty(n, 2)
    keep = index >= 0
    table[index[keep].cpu()] = local[keep].cpu()
    return table


def worker_setup(config: dict) -> tuple[int, int, bool, int]:
    """This worker's (rank, world size, bf16 on, ZeRO stage), with torch seeded from train.seed."""
    import ray.train

    ctx = ray.train.get_context()
    train = config["train"]
    use_gpu = train["workers"]["use_gpu"] and torch.cuda.is_available()
    bf16 = use_gpu if train["deepspeed"]["bf16"] == "auto" else bool(train["deepspeed"]["bf16"])
    torch.manual_seed(train["seed"])
    return ctx.get_world_rank(), ctx.get_world_size(), bf16, train["deepspeed"]["zero_stage"]


def train_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker`. config: {"objective" (an align.objectives.base.Objective),
    "saved_as", "model" (a path, hub name or actors.cluster.ShippedDir), "data" (ObjectRef of the
    tokenized pairs' arrow table), "output_dir", "storage_path", "train": TrainConfig as a dict,
    "lora": dict | None} (actors.train_launcher.launch_training)."""
    import datasets
    import deepspeed
    import ray
    import ray.train

    from actors.checkpoints import RunDir
    from actors.cluster import local_dir
    from align.engine.models import build_model_for, load_tokenizer
    from align.data.pairs import collate_packed_pairs, collate_pairs

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed renames, inside DeepSpeed
    rank, world, bf16, zero_stage = worker_setup(config)
    train = config["train"]
    objective: Objective = config["objective"]
    packed = train.get("prefix_sharing", True) and objective.model_kind == "causal_lm"
    collate = collate_packed_pairs if packed else collate_pairs
    model_path = local_dir(config["model"])
    tokenizer = load_tokenizer(model_path)
    eos = tokenizer.eos_token_id
    model = build_model_for(objective.model_kind, model_path, tokenizer, config.get("lora"))
    if train["disable_dropout"]:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    ref_model = None
    if objective.live_reference:
        ref_model = build_model_for(objective.model_kind, model_path, tokenizer, None).eval().requires_grad_(False)
    data = datasets.Dataset(datasets.table.InMemoryTable(ray.get(config["data"])))
    micro = train["batch_size"] // world
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, micro, bf16),
        lr_scheduler=linear_schedule(train["steps"], train["optim"]["warmup_steps"]),
    )
    if ref_model is not None:
        ref_model.to(device=engine.device, dtype=torch.bfloat16 if bf16 else torch.float32)

    eval_every = train.get("eval_every", 0)
    eval_data = None
    if config.get("eval_data") is not None and eval_every:
        eval_data = datasets.Dataset(datasets.table.InMemoryTable(ray.get(config["eval_data"])))

    run = train["run"]
    run_dir = RunDir(config["storage_path"], run["name"])
    ref_logps = eval_ref_logps = None

    def load_extra(d: str) -> None:
        nonlocal ref_logps, eval_ref_logps
        from safetensors.torch import load_file, load_model

        if ref_model is not None:
            load_model(ref_model, os.path.join(d, REF_FILE), device=str(engine.device))
        if os.path.exists(os.path.join(d, REF_LOGPS_FILE)):
            ref_logps = load_file(os.path.join(d, REF_LOGPS_FILE))["logps"]
        if os.path.exists(os.path.join(d, EVAL_REF_LOGPS_FILE)):
            eval_ref_logps = load_file(os.path.join(d, EVAL_REF_LOGPS_FILE))["logps"]

    step = resume_newest(engine, run_dir, rank, load_extra)
    table = lambda d: reference_table(engine.module, d, micro, tokenizer.pad_token_id, eos,  # noqa: E731
                                      rank, world, engine.device, collate)
    if objective.stored_reference and ref_logps is None:
        ref_logps = table(data)
    if objective.stored_reference and eval_data is not None and eval_ref_logps is None:
        eval_ref_logps = table(eval_data)  # at step 0 (pi_0), kept with every checkpoint like the training table

    tokens, t0 = 0, time.perf_counter()
    while step < train["steps"]:
        idx = batch_indices(step, train["batch_size"], len(data), train["seed"])[rank * micro : (rank + 1) * micro]
        batch = collate([data[int(i)] for i in idx], tokenizer.pad_token_id)
        if ref_logps is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_logps[idx, 0], ref_logps[idx, 1]
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        inject_failure(train, step, rank, world, config["output_dir"])
        engine.train()
        loss, metrics = objective.compute_loss(engine, ref_model, batch, eos)
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on in engine.step)
        engine.backward(loss)
        engine.step()
        step += 1
        tokens += int(batch["num_tokens"])  # prompt + completion of both sides, however they are laid out
        mode = objective.reference_update(step)
        if mode is not None:
            update_reference(engine.module, ref_model, mode, objective.ref_alpha, zero_stage)

        last = step == train["steps"]
        if step % run["log_every"] == 0 or step % run["checkpoint_every"] == 0 or last:
            seconds = time.perf_counter() - t0
            report = mean_over_ranks({"loss": loss.item(), **{k: float(v) for k, v in metrics.items()},
                                      "tokens_per_s": tokens / max(seconds, 1e-9)}, engine.device)
            report["tokens_per_s"] *= world  # throughput of the whole group
            report.update(step=step, lr=lr)
            if eval_data is not None and (step % eval_every == 0 or last):
                report.update(validation_metrics(engine, ref_model, objective, eval_data, eval_ref_logps, micro, rank,
                                                 world, tokenizer.pad_token_id, eos, collate))
            if rank == 0:
                rewrite_log(run_dir, lambda rows: rows + [report])  # the driver prints it from there
            if step % run["checkpoint_every"] == 0 or last:
                def save_extra(tmp: str) -> None:
                    from safetensors.torch import save_file, save_model

                    if ref_model is not None:
                        save_model(ref_model, os.path.join(tmp, REF_FILE))
                    if ref_logps is not None:
                        save_file({"logps": ref_logps.contiguous()}, os.path.join(tmp, REF_LOGPS_FILE))
                    if eval_ref_logps is not None:
                        save_file({"logps": eval_ref_logps.contiguous()}, os.path.join(tmp, EVAL_REF_LOGPS_FILE))

                save_checkpoint(engine, run_dir, step, report, rank, run["keep_checkpoints"], save_extra)
            # Metrics reach the driver through the run directory: no ray.train.report without a
            # checkpoint, as each call blocks on the controller's poll (about 1.7 s in Ray 2.60).
            tokens, t0 = 0, time.perf_counter()

    upload_final_model(engine, zero_stage, rank, objective.model_kind, model_path, config, tokenizer, run_dir)


@torch.no_grad()
def validation_metrics(engine, ref_model, objective: Objective, data, ref_table, micro: int, rank: int, world: int,
                       pad_id: int, eos_id: int | None, collate) -> dict[str, float]:
    """The objective's loss and metrics on held-out pairs, as "val/<name>", averaged over the pairs.
    Every rank scores the same number of full micro-batches (ZeRO-3 gathers parameters inside each
    forward), so the first len(data) // (micro * world) * (micro * world) pairs are used."""
    usable = len(data) // (micro * world) * (micro * world)
    sums: dict[str, float] = {}
    was_training = engine.module.training
    engine.eval()
    for start in range(rank * micro, usable, micro * world):
        idx = torch.arange(start, start + micro)
        batch = collate([data[int(i)] for i in idx], pad_id)
        if ref_table is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_table[idx, 0], ref_table[idx, 1]
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss, metrics = objective.compute_loss(engine, ref_model, batch, eos_id)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    engine.module.train(was_training)
    batches = usable // (micro * world)
    means = mean_over_ranks({k: v / batches for k, v in sums.items()}, engine.device)
    return {f"val/{k}": v for k, v in means.items()}


def inject_failure(train: dict, step: int, rank: int, world: int, output_dir: str, generator=None) -> None:
    """Testing only (train.fail_once_at_step): once per run, during that (1-based) step, rank
    train.fail_rank (-1: the last) raises an exception (fail_mode raise), kills its own process with
    SIGKILL (sigkill: no exception, no cleanup, as when a node dies), or kills the generator actor it
    samples from (kill_generator, vBoN: Ray restarts the actor, with the weights it was built with).
    A marker file in the output directory keeps the restarted run from failing again."""
    fail_at = train.get("fail_once_at_step")
    marker = Path(output_dir) / ".failed_once"
    if fail_at is None or step + 1 != fail_at or rank != train.get("fail_rank", -1) % world or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    mode = train.get("fail_mode", "raise")
    if mode == "kill_generator":
        import ray

        if generator is None:
            raise ValueError("train.fail_mode: kill_generator needs a loop with generator actors (vBoN)")
        log.warning("rank %d: killing its generator actor at step %d (train.fail_once_at_step)", rank, step + 1)
        ray.kill(generator, no_restart=False)
        return
    if mode == "sigkill":
        import signal

        log.warning("rank %d: SIGKILL to itself at step %d (train.fail_once_at_step)", rank, step + 1)
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step} (train.fail_once_at_step)")


def resume_newest(engine, run_dir, rank: int, load_extra=None) -> int:
    """Load the run's newest complete checkpoint into `engine` (and its extra files, through
    load_extra(directory)); returns its step, 0 when there is none. Rank 0 then drops the log rows of
    steps that will run again and checkpoints a dead rank left half-written."""
    step = 0
    newest, bad = run_dir.newest_valid()  # not ray.train.get_checkpoint(): see actors/checkpoints.py
    for path, problem in bad:
        log.warning("rank %d: checkpoint %s is corrupted (%s); falling back to %s", rank, path, problem,
                    newest[1] if newest else "a fresh start")
    if newest:
        step, path = newest
        with run_dir.local_copy(path) as d:
            _, client = engine.load_checkpoint(d, tag="ds")
            assert client["step"] == step, (client["step"], step)
            if load_extra is not None:
                load_extra(d)
        log.info("rank %d resumed from %s at step %d", rank, path, step)
    if rank == 0:
        rewrite_log(run_dir, lambda rows: [r for r in rows if r["step"] <= step])
        run_dir.remove_incomplete()
        for path, _ in bad:  # every rank skips it whether or not it is still there
            run_dir.fs.delete_dir(path)
    return step


def save_checkpoint(engine, run_dir, step: int, report: dict, rank: int, keep: int, save_extra=None) -> None:
    """Every rank saves its DeepSpeed shard (rank 0 also save_extra(directory)) and reports it to Ray
    Train; once every rank's files are stored, rank 0 marks the checkpoint complete and prunes old ones."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from actors.checkpoints import checkpoint_name

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"step": step})
        if rank == 0 and save_extra is not None:
            save_extra(tmp)
        ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=checkpoint_name(step))
    # report returns once this rank's files are stored; after the barrier, every rank's are.
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        run_dir.mark_complete(step)
        run_dir.prune(keep)


def upload_final_model(engine, zero_stage: int, rank: int, kind: str, model_path: str, config: dict, tokenizer,
                       run_dir) -> dict[str, torch.Tensor]:
    """Gather the trained weights (all ranks), save them in HF format and upload them to the run's
    storage (rank 0), where the driver copies them to output_dir/model. Returns the state dict."""
    from actors.checkpoints import MODEL_DIR

    state = full_state_dict(engine, zero_stage)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_final_model(kind, model_path, config, tokenizer, state, config["train"].get("save_dtype", "float32"), tmp)
            run_dir.upload_dir(tmp, MODEL_DIR)  # storage every node reaches; the driver copies it to output_dir
    return state


LORA_DIR = "lora"  # inside the saved model: the unmerged adapter (LoRA weights and the head)


def save_final_model(kind: str, model_path: str, config: dict, tokenizer, state: dict, dtype: str, out: str) -> None:
    """Save the trained weights in HF format (safetensors, LoRA merged, in `dtype`) into `out`, so the
    generator pool and scorers load the result by path like any model, and sweetspot.json: what
    trained it, config["saved_as"] ({"objective": name, **params})."""
    from align.engine.models import build_model_for

    model = build_model_for(kind, model_path, tokenizer, config.get("lora"))
    model.load_state_dict(state)
    if config.get("lora"):
        model.save_pretrained(str(Path(out) / LORA_DIR))  # the adapter itself, for a Laplace posterior over it
        model = model.merge_and_unload()
    model = model.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (Path(out) / "sweetspot.json").write_text(json.dumps(config["saved_as"]))
