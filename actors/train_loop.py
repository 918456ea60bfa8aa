"""The training-loop shell every trainer runs inside a Ray Train worker, around a DeepSpeed engine:
resume from the newest complete checkpoint, the optimizer steps, the log and checkpoint cadence,
metrics averaged over ranks, and an optional step hook. What a step computes is the algorithm's: the
offline pair objectives (actors/trainer.py) and the on-policy vBoN loop (actors/vbon_trainer.py) are
each a `StepAlgorithm`, so checkpointing, resume and logging live here once.

The step hook (train.step_hook: "module:function" and its args) is called before every step as
fn(step, rank, world, output_dir, context, **args), step 1-based, context the algorithm's
`hook_context` (vBoN: its generator actor). Profilers or debuggers plug in there; so does the tests'
fault injection (tests/plugins/faults.py), which the production loop does not carry.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch

if TYPE_CHECKING:
    from actors.train_config import StepHookConfig, TrainConfig

log = logging.getLogger("sweetspot.trainer")

LORA_DIR = "lora"  # inside the saved model: the unmerged adapter (LoRA weights and the head)


class StepAlgorithm(Protocol):
    hook_context: dict  # what a step hook may use

    def load_extra(self, directory: str) -> None:
        """Read this algorithm's files from a checkpoint being resumed (all ranks)."""

    def save_extra(self, directory: str) -> None:
        """Write this algorithm's files into a checkpoint (rank 0)."""

    def start(self, step: int) -> None:
        """After resume (step 0 on a fresh run), before the first step: e.g. reference tables, weight pushes."""

    def loss(self, step: int, part: int = 0) -> tuple[torch.Tensor, dict]:
        """This rank's loss for 0-based step `step` (its micro-batch `part` of train.micro_batches), and its
        metrics (scalars, averaged over micro-batches and ranks when logged)."""

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (1-based): e.g. a TR-DPO reference update, a weight push."""

    def window(self, seconds: float) -> dict:
        """Metrics of the steps since the last logged row, which took `seconds` on this rank (averaged
        over ranks); the window starts again after."""

    def finish_report(self, report: dict, step: int, last: bool) -> dict:
        """The logged row after the mean over ranks: group throughput, validation metrics."""


def make_engine(model, train: TrainConfig, micro_batch: int, bf16: bool):
    """The DeepSpeed engine of `model` for one rank (deepspeed_config, linear_schedule); micro_batch:
    examples per forward/backward pass (train.micro_batches of them make one optimizer step)."""
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles its shared-memory all-reduce kernel when it joins the process group (a
    # C++ build: about 30 s of 2 cores on each fresh node, and again whenever the build cache is
    # cold). Only inference_all_reduce (tensor-parallel inference) uses it, never training, whose
    # collectives go through torch.distributed; marked incompatible, it is not built.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if train.gradient_checkpointing:
        # Non-reentrant: no inputs that require grad needed (LoRA's frozen embeddings), and exact.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(train, micro_batch, bf16),
        lr_scheduler=linear_schedule(train.steps, train.optim.warmup_steps),
    )
    return engine


def step_hook(spec: StepHookConfig) -> Callable | None:
    """The callable of train.step_hook (target "module:function", args), or None."""
    if spec.target is None:
        return None
    module, _, name = spec.target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    args = dict(spec.args)
    return lambda step, rank, world, output_dir, context: fn(step, rank, world, output_dir, context, **args)


def run_steps(engine, algorithm: StepAlgorithm, config: dict, rank: int, world: int):
    """Resume, then run optimizer steps until train.steps, logging every run.log_every steps and
    checkpointing every run.checkpoint_every and at the last; returns the run's RunDir."""
    from actors.checkpoints import RunDir

    train: TrainConfig = config["train"]
    run = train.run
    run_dir = RunDir(config["storage_path"], run.name)
    hook = step_hook(train.step_hook)
    step = resume_newest(engine, run_dir, rank, algorithm.load_extra)
    algorithm.start(step)
    t0 = time.perf_counter()
    while step < train.steps:
        if hook is not None:
            hook(step + 1, rank, world, config["output_dir"], algorithm.hook_context)
        engine.train()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on at the optimizer step)
        losses, parts = [], []
        for part in range(train.micro_batches):
            # DeepSpeed scales each backward by 1 / micro_batches and steps the optimizer after the last:
            # the gradient of the mean loss over the whole batch, for losses that average their examples.
            loss, metrics = algorithm.loss(step, part)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            parts.append(metrics)
        metrics = {k: sum(float(m[k]) for m in parts) / len(parts) for k in parts[0]}
        step += 1
        algorithm.after_step(step)

        last = step == train.steps
        checkpoint = step % run.checkpoint_every == 0 or last
        if step % run.log_every == 0 or checkpoint:
            window = algorithm.window(time.perf_counter() - t0)
            report = mean_over_ranks({"loss": sum(losses) / len(losses), **metrics, **window},
                                     engine.device)
            report = algorithm.finish_report(report, step, last)
            report.update(step=step, lr=lr)
            if rank == 0:
                rewrite_log(run_dir, lambda rows: rows + [report])  # the driver prints it from there
            if checkpoint:
                save_checkpoint(engine, run_dir, step, report, rank, run.keep_checkpoints, algorithm.save_extra,
                                in_driver=train.workers.in_driver)
            # Metrics reach the driver through the run directory: no ray.train.report without a
            # checkpoint, as each call blocks on the controller's poll (about 1.7 s in Ray 2.60).
            t0 = time.perf_counter()
    return run_dir


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> torch.Tensor:
    """Example indices of global batch `step`: consecutive slices of a fresh permutation per epoch."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_examples)
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return torch.tensor(out)


def zero_config(ds) -> dict:
    """DeepSpeed's zero_optimization section: the stage and, when asked, CPU offload of the optimizer
    states (ZeRO >= 1) and of the parameters (ZeRO-3)."""
    zero = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


def deepspeed_config(train: TrainConfig, micro_batch: int, use_bf16: bool) -> dict:
    """The DeepSpeed config for one rank: AdamW (torch implementation: no JIT build), explicit
    clipping, ZeRO stage from the job config. The schedule is `linear_schedule` (DeepSpeed's
    WarmupDecayLR needs >= 1 warmup step and starts at lr 0)."""
    optim = train.optim
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.micro_batches,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero_config(train.deepspeed),
        "bf16": {"enabled": use_bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "weight_decay": optim.weight_decay,
                                                  "betas": list(optim.adam_betas), "torch_adam": True}},
        # Offloaded optimizer states step with torch's AdamW here too: DeepSpeedCPUAdam is a C++ op built
        # on first use, which the CPU machines and CI cannot rely on.
        "zero_force_ds_cpu_optimizer": False,
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


def worker_setup(config: dict) -> tuple[int, int, bool, int]:
    """This worker's (rank, world size, bf16 on, ZeRO stage), with torch seeded from train.seed."""
    import ray.train

    train: TrainConfig = config["train"]
    # Local mode (num_workers 0): this process is the one rank; ray.train's context is not asked, as
    # Ray refuses it inside a Tune trial, where a sweep's trials train this way.
    if train.workers.in_driver:
        rank, world = 0, 1
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = train.workers.use_gpu and torch.cuda.is_available()
    bf16 = use_gpu if train.deepspeed.bf16 == "auto" else bool(train.deepspeed.bf16)
    torch.manual_seed(train.seed)
    return rank, world, bf16, train.deepspeed.zero_stage


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
            frozen = frozen_names(engine)
            # A checkpoint without the frozen weights (LoRA: save_checkpoint) loads the trained ones only;
            # anything else missing is still an error.
            _, client = engine.load_checkpoint(d, tag="ds", custom_load_fn=(lambda src, dst: load_trained(src, dst, frozen))
                                               if exclude_frozen(engine, frozen) else None)
            assert client["step"] == step, (client["step"], step)
            if load_extra is not None:
                load_extra(d)
        log.info("rank %d resumed from %s at step %d", rank, path, step)
    if rank == 0:
        rewrite_log(run_dir, lambda rows: [r for r in rows if r["step"] <= step])
        from actors.checkpoints import START_FILE

        # One line per start of the worker group, so the driver can say that it (re)started and where.
        starts = run_dir.read_text(START_FILE) or ""
        run_dir.write_text(START_FILE, starts + json.dumps({"step": step, "checkpoint": newest[1] if newest else None,
                                                            "started_at": time.time()}) + "\n")
        run_dir.remove_incomplete()
        for path, _ in bad:  # every rank skips it whether or not it is still there
            run_dir.fs.delete_dir(path)
    return step


def frozen_names(engine) -> set[str]:
    """The names of the parameters the optimizer does not train (LoRA's base weights)."""
    return {name for name, p in engine.module.named_parameters() if not p.requires_grad}


def exclude_frozen(engine, frozen: set[str]) -> bool:
    """Whether checkpoints leave out the frozen weights: they never change, so every start reads them
    from the base model again; a LoRA checkpoint then holds the adapters and their optimizer state
    only (MBs instead of the model's GBs). Not under ZeRO-3, which keeps its own fragments of them."""
    return bool(frozen) and engine.zero_optimization_stage() < 3


def load_trained(src: dict, module, frozen: set[str]) -> None:
    """Load a checkpoint's module state that leaves out the frozen weights (the module keeps its own)."""
    result = module.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                           f"{sorted(result.unexpected_keys)[:5]}")


def save_checkpoint(engine, run_dir, step: int, report: dict, rank: int, keep: int, save_extra=None,
                    in_driver: bool = False) -> None:
    """Every rank saves its DeepSpeed shard (rank 0 also save_extra(directory)) and reports it to Ray
    Train; once every rank's files are stored, rank 0 marks the checkpoint complete and prunes old ones.
    in_driver: Ray Train's local mode (workers.num_workers 0), whose report keeps no files: the one
    rank stores them itself, where Ray Train would have."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    from actors.checkpoints import checkpoint_name

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"step": step},
                               exclude_frozen_parameters=exclude_frozen(engine, frozen_names(engine)))
        if rank == 0 and save_extra is not None:
            save_extra(tmp)
        if in_driver:  # (no report either: the driver reads the metrics from the run's log)
            run_dir.upload_dir(tmp, checkpoint_name(step))
        else:
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
            save_final_model(kind, model_path, config, tokenizer, state, config["train"].save_dtype, tmp)
            run_dir.upload_dir(tmp, MODEL_DIR)  # storage every node reaches; the driver copies it to output_dir
    return state


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
