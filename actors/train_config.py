"""The training knobs every trainer job shares: optimizer, DeepSpeed, the Ray Train worker group, the
run (name, storage, checkpoints, failures). Algorithm knobs live in each job's own config."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from actors.tracking import check_tracking
from align.runtime.config import ConfigError, OutputPath, require


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then linear decay to 0 at the last step
    grad_clip: float = 1.0  # max grad norm; 0 disables (DeepSpeed's own default is 1.0, set explicitly)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def __post_init__(self):
        require(self.lr > 0, "lr", "a number > 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        require(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "two numbers in [0, 1)", self.adam_betas)
        require(self.grad_clip >= 0, "grad_clip", ">= 0 (0 disables clipping)", self.grad_clip)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 (plain data parallel) .. 3 (parameters partitioned)
    bf16: bool | str = "auto"  # auto: bf16 on GPU, fp32 on CPU | true | false
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states (and the step) in CPU memory, freeing GPU memory
    offload_params: bool = False  # ZeRO-3: parameters in CPU memory between uses as well

    def __post_init__(self):
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "0, 1, 2 or 3", self.zero_stage)
        require(self.bf16 in ("auto", True, False), "bf16", "'auto', true or false", self.bf16)
        require(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
                "false with zero_stage 0 (DeepSpeed offloads ZeRO's partitioned optimizer states)", self.offload_optimizer)
        require(not self.offload_params or self.zero_stage == 3, "offload_params",
                "false unless zero_stage is 3 (only ZeRO-3 partitions parameters)", self.offload_params)


@dataclass
class WorkersConfig:
    num_workers: int = 2  # Ray Train workers (data-parallel ranks); 0: one rank in the driver (Ray Train's local mode)
    use_gpu: bool = False
    cpus_per_worker: float = 1
    collective_timeout_s: int = 300  # a failed rank fails the run after this, instead of hanging

    def __post_init__(self):
        require(self.num_workers >= 0, "num_workers", "an integer >= 0 (0: one rank in the driver process)", self.num_workers)
        require(self.cpus_per_worker > 0, "cpus_per_worker", "> 0", self.cpus_per_worker)
        require(self.collective_timeout_s >= 10, "collective_timeout_s", ">= 10", self.collective_timeout_s)

    @property
    def in_driver(self) -> bool:
        """Ray Train's local mode: the one rank runs in the job's own process."""
        return self.num_workers == 0

    @property
    def ranks(self) -> int:
        """Data-parallel ranks: the workers, or the driver alone in local mode."""
        return max(1, self.num_workers)


@dataclass
class RunConfig:
    name: str = "run"  # same name + storage_path again = resume from the newest complete checkpoint
    storage_path: OutputPath = "outputs/runs"  # a directory (relative: under the output root) or a storage URI
    resume: Literal["auto", "never", "must"] = "auto"  # auto: resume if the config matches, else error
    checkpoint_every: int = 50  # steps; the last step always checkpoints
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    log_every: int = 10
    tracking: str = "tensorboard"  # logged rows also to: tensorboard | mlflow | tensorboard+mlflow | none (actors/tracking.py)

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'", self.name)
        require(self.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1", self.checkpoint_every)
        require(self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1", self.keep_checkpoints)
        require(self.max_failures >= -1, "max_failures", ">= 0, or -1 for unlimited", self.max_failures)
        require(self.log_every >= 1, "log_every", "an integer >= 1", self.log_every)
        check_tracking(self.tracking)


@dataclass
class StepHookConfig:
    """A function the loop shell (actors/train_loop.py) calls before every step as
    fn(step, rank, world, output_dir, context, **args): a profiler, a debugger, or the tests' fault
    injection (tests/plugins/faults.py). It observes the run; it must not change what it computes."""

    target: str | None = None  # "package.module:function", importable on every worker; null: none
    args: dict = field(default_factory=dict)  # keyword arguments of the function

    def __post_init__(self):
        if self.target is not None:
            import importlib

            module, sep, name = self.target.partition(":")
            require(bool(sep and module and name), "target", "'package.module:function'", self.target)
            try:
                fn = getattr(importlib.import_module(module), name, None)
            except ImportError as e:
                raise ConfigError("target", f"an importable module ({e})", self.target) from None
            require(callable(fn), "target", f"a function defined in {module}", self.target)


@dataclass
class TrainConfig:
    # Knobs that observe a run or only change how a step is computed, never what (accumulation and
    # checkpointing give the same gradient up to rounding): left out of every key that decides whether
    # outputs may be reused (the trainers' run key, a pipeline stage's key), so a run that ran out of
    # memory resumes with more micro-batches.
    NOT_IN_RUN_KEY = ("step_hook", "micro_batches", "gradient_checkpointing")

    steps: int = 100  # optimizer steps
    batch_size: int = 16  # global batch (pairs), split evenly over the workers
    max_length: int = 64  # prompt + completion tokens
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    run: RunConfig = field(default_factory=RunConfig)
    disable_dropout: bool = True  # as TRL: dropout makes policy and reference disagree at theta = theta_ref
    prefix_sharing: bool = True  # policy objectives: one row per pair, the prompt computed once (align.data.pairs.collate_packed_pairs)
    save_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the final model's weights (from fp32 masters)
    step_hook: StepHookConfig = field(default_factory=StepHookConfig)  # called before every step (see StepHookConfig)
    eval_every: int = 0  # steps between validation passes over data.eval_split (0: none); logged as val/<metric>
    micro_batches: int = 1  # gradient accumulation: each rank's share of a batch in this many forward/backward passes, one optimizer step
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, about a third more compute

    def __post_init__(self):
        require(self.steps >= 1, "steps", "an integer >= 1", self.steps)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.batch_size % self.workers.ranks == 0, "batch_size",
                f"a multiple of workers.num_workers ({self.workers.num_workers})", self.batch_size)
        require(self.max_length >= 2, "max_length", "an integer >= 2", self.max_length)
        require(self.eval_every >= 0, "eval_every", "an integer >= 0 (0: no validation)", self.eval_every)
        per_rank = self.batch_size // self.workers.ranks
        require(self.micro_batches >= 1 and per_rank % self.micro_batches == 0, "micro_batches",
                f"an integer >= 1 dividing each worker's share of the batch (batch_size / workers.num_workers = {per_rank})",
                self.micro_batches)
        if self.optim.warmup_steps >= self.steps:
            import logging

            # Allowed (a short test run), but the schedule then never reaches optim.lr: say so.
            logging.getLogger("sweetspot.train").warning(
                "optim.warmup_steps (%d) >= steps (%d): the learning rate never leaves warmup and peaks at %.3g x optim.lr "
                "(%g) at the last step (actors.train_loop.linear_schedule)", self.optim.warmup_steps, self.steps,
                (self.steps - 1) / self.optim.warmup_steps, self.optim.lr)
