"""Config sections shared by several jobs: the model, the reward, sampling, prompts, the generator
pool, the BoN selection variants, and the pair data of the trainers. Each is a typed dataclass
validated in __post_init__ (align.runtime.config); a job's own config composes them. Not an entry point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from align.engine.engines import ENGINES
from align.runtime.config import ConfigError, InputRef, require


def check_model_field(name_or_path: str, field: str = "model") -> None:
    """Stop before any work when a model field names no model: a local path that does not exist or has
    no config.json (align.engine.models.model_path_problem); a hub name is left to the loader."""
    from align.engine.models import model_path_problem

    problem = model_path_problem(name_or_path)
    require(problem is None, field, "'default', 'smollm2', an HF model name or a directory with config.json",
            f"{name_or_path} ({problem})" if problem else name_or_path)


@dataclass
class ModelConfig:
    path: InputRef = "default"  # "default" (embedded task), an HF model name, or a local directory
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self):
        from align.engine.models import model_path_problem

        problem = model_path_problem(self.path)
        require(problem is None, "path", "'default', an HF model name or a directory with config.json", self.path)


@dataclass
class RewardConfig:
    """The reward: a registered kind (align.rewards.registry) with its own params, and how many scorer
    actors run it."""

    kind: str = "vader"  # vader | brevity | classifier | ensemble | laplace | combined, or "module:kind" registered in your module
    path: InputRef | None = None  # classifier: an HF name or directory; ensemble / laplace: the directory jobs.train_rm wrote
    params: dict = field(default_factory=dict)  # the kind's own knobs: brevity {max_words}; laplace {chunk_size}; combined {components, combine, reference_quantile}
    device: str = "auto"
    num_actors: int = 1  # scorer actors (a ScorerPool); scoring scales separately from generation
    num_cpus: float = 0  # logical CPUs reserved per scorer actor (0: shares the generators' cores)
    num_gpus: float = 0  # GPUs reserved per scorer actor; with 0 device auto is the CPU (Ray gave it no GPU)

    def __post_init__(self):
        require(self.num_actors >= 1, "num_actors", "an integer >= 1", self.num_actors)
        require(self.num_cpus >= 0, "num_cpus", ">= 0", self.num_cpus)
        require(self.num_gpus >= 0, "num_gpus", ">= 0 (a fraction shares a GPU between scorer actors)", self.num_gpus)
        self.params = checked_params(self.kind, self.path, self.params, "reward")

    def spec(self) -> dict:
        """The flat spec actors.scorer.make_scorer takes, model directories resolved ("default", "minilm")."""
        return flat_spec(self.kind, self.path, self.device, self.params)


def model_path_error(kind: str | None, path, field: str) -> None:
    """ConfigError naming `field` when a reward kind that loads a model by name or directory (classifier)
    is given a local path that does not exist or holds no model; kinds with their own directory check
    (ensemble, laplace) have it at load already, and a hub name is left to the loader."""
    from align.engine.models import model_path_problem
    from align.rewards.registry import reward_kind

    if kind is None or not isinstance(path, str) or not reward_kind(kind).needs_path or reward_kind(kind).path_problem:
        return
    problem = model_path_problem(path)
    require(problem is None, field, "an HF model name or a directory with config.json", f"{path} ({problem})")


def check_model_paths(cfg, prefix: str = "") -> None:
    """Before any work: every reward, judge and selector section of a job config, however nested, that
    reads a model names one (model_path_error). Not at config load: a config may name a model a
    pipeline stage before it makes."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if isinstance(value, (RewardConfig, JudgeConfig)):
            model_path_error(value.kind, value.path, f"{name}.path")
        elif dataclasses.is_dataclass(value):
            check_model_paths(value, f"{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_model_paths(item, f"{name}[{i}].")


def checked_params(kind: str, path, params: dict, section: str) -> dict:
    """A reward section's params checked against its kind (align.rewards.registry.check_spec), typed and
    with the kind's defaults filled in; errors name the field."""
    from align.rewards.registry import check_spec

    require(not {"kind", "path", "device", "embedder"} & set(params), "params",
            f"the kind's own knobs (kind, path and device are fields of {section} itself)", params)
    spec = check_spec({**params, "kind": kind, "path": path}, field="", params_field="params")
    return {k: v for k, v in spec.items() if k not in ("kind", "path")}


def flat_spec(kind: str, path, device: str, params: dict) -> dict:
    """The flat spec a scorer is built from, model directories resolved ("default", "minilm", "smollm2")."""
    from align.engine.models import resolve_model_path
    from align.rewards.registry import map_paths

    return map_paths({"kind": kind, "path": path, "device": device, **params}, resolve_model_path)


@dataclass
class JudgeConfig:
    """A held-out judge: a reward that grades the samples but never selects them (Gao et al. 2210.10760
    grade a proxy's best-of-n with the gold reward it imitates). Scored in the driver after sampling."""

    kind: str | None = None  # null: none | any reward kind (arithmetic, vader, classifier, ...), as reward.kind
    path: InputRef | None = None  # a model-based judge: an HF name or directory
    params: dict = field(default_factory=dict)  # the kind's own knobs, as reward.params
    device: str = "auto"

    def __post_init__(self):
        require(self.kind is not None or (self.path is None and not self.params), "kind",
                "a reward kind when path or params are set", self.kind)
        if self.kind is not None:
            self.params = checked_params(self.kind, self.path, self.params, "judge")

    def spec(self) -> dict | None:
        """The flat spec align.rewards.registry.build_scorer takes, or None without a judge."""
        return None if self.kind is None else flat_spec(self.kind, self.path, self.device, self.params)


@dataclass
class PenaltyConfig:
    """Ranking by the reward model's uncertainty instead of its mean."""

    kind: Literal["none", "ensemble", "laplace"] = "none"  # ensemble needs reward.kind ensemble; laplace needs reward.kind laplace
    ensemble_mode: Literal["mean", "worst", "uncertainty_weighted"] = "mean"  # kind ensemble
    coef: float = 0.0  # uncertainty_weighted: mean - coef * variance; laplace: mu - coef * sigma

    def __post_init__(self):
        require(self.coef >= 0, "coef", "a number >= 0", self.coef)


@dataclass
class RbonConfig:
    """Regularized BoN (Jinnai et al. 2404.01054), used when selection is rbon_kl or rbon_wd."""

    beta: float = 0.1  # weight of the proximity term; 0 is plain argmax
    embedder: str = "minilm"  # rbon_wd: sentence encoder for the cost 1 - cosine similarity

    def __post_init__(self):
        require(self.beta >= 0, "beta", "a number >= 0", self.beta)


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
    source: InputRef = "default"  # "default" | a .jsonl/.json/.csv/.txt file | a saved datasets dir | an HF dataset
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
    cache: Literal["auto", "shared_prefix", "expanded"] = "auto"  # how decoding holds the shared prompt
    compile: bool = False  # torch.compile the decode step (pays a compilation in every actor)
    engine: Literal["torch", "vllm"] = "torch"  # torch: the project's sampler | vllm: vLLM actors (align/engine/engines.py)
    engine_python: str = ".venv-vllm/bin/python"  # engine vllm: the Python of vLLM's environment (make vllm-env), on every node

    def __post_init__(self):
        require(self.engine in ENGINES, "engine", " | ".join(ENGINES), self.engine)
        if self.engine == "vllm" and not Path(self.engine_python).is_file():
            raise ConfigError("engine_python", "the Python of an environment with vLLM (run `make vllm-env`, or give "
                              "its path)", self.engine_python)
        require(self.num_actors >= 1, "num_actors", "an integer >= 1", self.num_actors)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.num_cpus_per_actor > 0 or self.num_gpus_per_actor > 0, "num_cpus_per_actor", "> 0 (or num_gpus_per_actor > 0)", self.num_cpus_per_actor)


@dataclass
class SpeculativeConfig:
    """Speculative rejection (align.math.speculative): sampling.n continuations start, the partial ones are
    scored with the configured reward at each decision point and the lowest rejection_rate dropped."""

    rejection_rate: float = 0.5  # fraction of the running candidates dropped at each decision point
    decision_tokens: list[int] = field(default_factory=lambda: [8])  # completion lengths of the decision points

    def __post_init__(self):
        require(0 <= self.rejection_rate < 1, "rejection_rate", "a number in [0, 1)", self.rejection_rate)
        ok = len(self.decision_tokens) >= 1 and all(t >= 1 for t in self.decision_tokens)
        ok = ok and all(a < b for a, b in zip(self.decision_tokens, self.decision_tokens[1:]))
        require(ok, "decision_tokens", "a non-empty, strictly increasing list of integers >= 1", self.decision_tokens)


@dataclass
class PairDataConfig:
    source: InputRef = "outputs/pairs/bonbon"  # saved datasets dir (jobs.make_pairs) or .jsonl with prompt/chosen/rejected
    split: str = "train"  # used when the source holds several splits
    limit: int | None = None  # first `limit` pairs
    eval_split: str | None = None  # held-out pairs scored every train.eval_every steps (val/loss, val/... metrics)
    eval_limit: int | None = None  # first `eval_limit` of them

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", "null or an integer >= 1", self.limit)
        require(self.eval_limit is None or self.eval_limit >= 1, "eval_limit", "null or an integer >= 1", self.eval_limit)


@dataclass
class LoraParams:
    """LoRA adapters (peft) instead of full fine-tuning: only the adapters train (and a reward model's
    score head); the saved model has them merged, so it loads by path like any model."""

    enabled: bool = False
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])  # GPT-2 attention; q_proj,v_proj for Llama

    def __post_init__(self):
        require(self.r >= 1, "r", "an integer >= 1", self.r)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)", self.lora_dropout)
        require(len(self.target_modules) > 0, "target_modules", "a non-empty list of module names", self.target_modules)

    def kwargs(self) -> dict | None:
        """peft LoraConfig's keyword arguments, or None when LoRA is off."""
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules)} if self.enabled else None
