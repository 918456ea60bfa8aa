"""Tokens/s of the shared-prefill sampler against two baselines, timed in the same run on the same
random-weight models: `align.sampling.sample_n` (one prefill per prompt, cache expanded to n rows),
`sample_n_repeated` (the same loop with every prompt repeated n times: n prefills) and HF
`generate(do_sample=True, num_return_sequences=n)`.

    python -m jobs.bench_sampler --config configs/bench_sampler.yaml              # the default grid
    python -m jobs.bench_sampler --config configs/bench_sampler.yaml quick=true   # smoke run, seconds
    python -m jobs.bench_sampler --config configs/bench_sampler.yaml 'ns=[64]' device=cuda

The three draw from the same distribution: plain softmax at temperature 1, exactly max_new_tokens
tokens per row. HF applies top_k=50 unless top_k=0 and stops at EOS unless eos_token_id=None, so both
are passed (and min_new_tokens=max_new_tokens) to match. Models are GPT-2s
built from GPT2Config with random weights, so nothing is downloaded; prompts are random ids of equal
length (no padding). Each cell is warmed up once per method (a short call), then timed `repeats`
times with time.perf_counter, the methods taking turns; the median is reported.

Writes <output_dir>/results.json, results.md and config.yaml, and prints the table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from align.config import require, run_job, to_dict
from align.runstate import write_atomic

log = logging.getLogger("sweetspot.bench_sampler")

METHODS = ("shared", "repeated", "hf")


@dataclass
class ModelShape:
    """A random-weight GPT-2; `name` labels its rows in the table."""

    name: str = "gpt2-4x256"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 50257

    def __post_init__(self):
        require(self.n_layer >= 1, "n_layer", "an integer >= 1", self.n_layer)
        require(self.n_head >= 1 and self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head ({self.n_head})", self.n_embd)
        require(self.vocab_size >= 2, "vocab_size", "an integer >= 2", self.vocab_size)


def _default_models() -> list[ModelShape]:
    return [ModelShape("gpt2-4x256", 4, 256, 4, 50257), ModelShape("gpt2-5x128", 5, 128, 4, 1024)]


# `quick: true` swaps the grid for this one: a smoke run that finishes in seconds on a CPU.
QUICK = dict(models=[ModelShape("gpt2-2x64", 2, 64, 2, 256)], prompt_lens=[16], ns=[2, 4], max_new_tokens=4)


@dataclass
class BenchSamplerConfig:
    models: list[ModelShape] = field(default_factory=_default_models)
    prompt_lens: list[int] = field(default_factory=lambda: [32, 256])
    ns: list[int] = field(default_factory=lambda: [4, 16, 64])
    num_prompts: int = 2  # P: prompts per call; each call draws P * n continuations
    max_new_tokens: int = 32  # T: every row gets exactly T tokens (no early stop)
    repeats: int = 2  # timed calls per method and cell; the median is reported
    warmup_new_tokens: int = 4  # the untimed warm-up call per method and cell draws this many tokens
    quick: bool = False  # replace models, prompt_lens, ns and max_new_tokens with the tiny QUICK grid
    num_threads: int = 2  # torch.set_num_threads; 0 leaves torch's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 (the models are tiny)
    seed: int = 0
    output_dir: str = "outputs/bench_sampler"

    def __post_init__(self):
        require(len(self.models) >= 1, "models", "a non-empty list of model shapes", self.models)
        require(len(self.prompt_lens) >= 1 and all(L >= 1 for L in self.prompt_lens), "prompt_lens", "a non-empty list of integers >= 1", self.prompt_lens)
        require(len(self.ns) >= 1 and all(n >= 1 for n in self.ns), "ns", "a non-empty list of integers >= 1", self.ns)
        require(self.num_prompts >= 1, "num_prompts", "an integer >= 1", self.num_prompts)
        require(self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1", self.max_new_tokens)
        require(self.repeats >= 1, "repeats", "an integer >= 1", self.repeats)
        require(1 <= self.warmup_new_tokens <= self.max_new_tokens, "warmup_new_tokens", f"1 <= warmup_new_tokens <= max_new_tokens ({self.max_new_tokens})", self.warmup_new_tokens)
        require(self.num_threads >= 0, "num_threads", "an integer >= 0", self.num_threads)
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "auto | cpu | cuda | cuda:N", self.device)


def resolve(cfg: BenchSamplerConfig) -> BenchSamplerConfig:
    """The config actually run: the QUICK grid when cfg.quick, warm-up tokens clipped to it."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, **QUICK, warmup_new_tokens=min(cfg.warmup_new_tokens, QUICK["max_new_tokens"]))


def build_model(shape: ModelShape, n_positions: int, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # No bos/eos: GPT-2's default 50256 is outside small vocabularies, and nothing here stops at EOS.
    config = GPT2Config(vocab_size=shape.vocab_size, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                        n_positions=n_positions, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def samplers(model, input_ids, attention_mask, n: int, seed: int) -> dict[str, Callable[[int], torch.Tensor]]:
    """method -> f(T) returning the (P*n, T) new tokens; all three draw T tokens from softmax(logits)."""
    from align.sampling import sample_n, sample_n_repeated

    def gen():
        return torch.Generator(device=input_ids.device).manual_seed(seed)

    def hf(T):
        torch.manual_seed(seed)
        out = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, num_return_sequences=n,
                             max_new_tokens=T, min_new_tokens=T, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
        return out[:, input_ids.shape[1]:]

    return {
        "shared": lambda T: sample_n(model, input_ids, attention_mask, n, T, generator=gen()).tokens,
        "repeated": lambda T: sample_n_repeated(model, input_ids, attention_mask, n, max_new_tokens=T, generator=gen()).tokens,
        "hf": hf,
    }


def time_call(f: Callable[[int], torch.Tensor], T: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for f(T) (the device synchronised on both sides) and its output."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = f(T)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_cell(model, shape: ModelShape, prompt_len: int, n: int, cfg: BenchSamplerConfig, device: torch.device) -> dict:
    """One grid cell: warm up and time every method; returns a table row."""
    P, T = cfg.num_prompts, cfg.max_new_tokens
    g = torch.Generator().manual_seed(cfg.seed + prompt_len)
    # Ids from 1: HF generate drops an all-ones mask at prefill, and GPT-2 then warns about pad id 0.
    input_ids = torch.randint(1, shape.vocab_size, (P, prompt_len), generator=g).to(device)  # (P, L)
    attention_mask = torch.ones_like(input_ids)
    row = {"model": shape.name, "prompt_len": prompt_len, "n": n, "prompts": P, "new_tokens": P * n * T}
    fs = samplers(model, input_ids, attention_mask, n, cfg.seed)
    for f in fs.values():
        time_call(f, cfg.warmup_new_tokens, device)
    seconds = {method: [] for method in fs}
    # Round-robin over methods within each repeat, so a change in machine load hits all of them alike.
    for _ in range(cfg.repeats):
        for method, f in fs.items():
            s, tokens = time_call(f, T, device)
            if tokens.shape != (P * n, T):  # a baseline that stopped early or drew fewer rows is not comparable
                raise RuntimeError(f"{method} returned tokens of shape {tuple(tokens.shape)}, expected {(P * n, T)}")
            seconds[method].append(s)
    for method, times in seconds.items():
        median = statistics.median(times)
        row[f"{method}_seconds"] = median
        row[f"{method}_seconds_all"] = times
        row[f"{method}_tokens_per_s"] = P * n * T / max(median, 1e-9)
        log.info("%s L=%d n=%d %-8s %.3f s (%s)", shape.name, prompt_len, n, method, median, ", ".join(f"{s:.3f}" for s in times))
    row["shared_over_hf"] = row["shared_tokens_per_s"] / row["hf_tokens_per_s"]
    row["shared_over_repeated"] = row["shared_tokens_per_s"] / row["repeated_tokens_per_s"]
    return row


COLUMNS = [("model", "model", "{}"), ("prompt", "prompt_len", "{}"), ("n", "n", "{}"),
           ("shared tok/s", "shared_tokens_per_s", "{:.0f}"), ("repeated tok/s", "repeated_tokens_per_s", "{:.0f}"),
           ("HF tok/s", "hf_tokens_per_s", "{:.0f}"), ("shared/HF", "shared_over_hf", "{:.2f}x"),
           ("shared/repeated", "shared_over_repeated", "{:.2f}x")]


def format_table(rows: list[dict]) -> tuple[str, str]:
    """(aligned text for the terminal, markdown) of the result rows."""
    cells = [[fmt.format(r[key]) for _, key, fmt in COLUMNS] for r in rows]
    heads = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    text = "\n".join("  " + "  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [heads, *cells])
    md = "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + ["| " + " | ".join(c) + " |" for c in cells])
    return text, md


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: BenchSamplerConfig) -> dict:
    """Time every (model, prompt_len, n) cell for the three methods; returns {"rows": [...], ...}
    (also written to results.json and, as a table, results.md)."""
    import yaml

    cfg = resolve(cfg)
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    rows = []
    for i, shape in enumerate(cfg.models):
        model = build_model(shape, max(cfg.prompt_lens) + cfg.max_new_tokens, device, dtype, cfg.seed + i)
        for prompt_len in cfg.prompt_lens:
            for n in cfg.ns:
                rows.append(bench_cell(model, shape, prompt_len, n, cfg, device))
        del model
    wall = time.perf_counter() - start

    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}
    result = {"rows": rows, "env": env, "wall_seconds": wall}
    text, md = format_table(rows)
    header = (f"Tokens/s drawing n samples for each of {cfg.num_prompts} prompts, {cfg.max_new_tokens} new tokens, "
              f"random-weight GPT-2, median of {cfg.repeats}; {env['device']} ({env['device_name']}), "
              f"{env['torch_threads']} threads, {env['dtype']}, torch {env['torch']}.")
    out = Path(cfg.output_dir)
    write_atomic(out / "results.json", json.dumps(result, indent=2))
    write_atomic(out / "results.md", f"{header}\n\n{md}\n")
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"\n  {header}\n\n{text}\n\n  wall time {wall:.1f} s; wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return result


def main(argv=None) -> dict:
    return run_job(BenchSamplerConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
