"""Generation benchmark: tokens/s and peak memory of drawing n samples per prompt, every method timed
in the same run on the same random-weight GPT-2s (nothing is downloaded).

    python -m jobs.bench.generate --config configs/bench/generate.yaml              # the default grid
    python -m jobs.bench.generate --config configs/bench/generate.yaml quick=true   # smoke run, seconds
    python -m jobs.bench.generate --config configs/bench/generate.yaml compile=true device=cuda dtype=bfloat16

Methods (all draw T tokens per row from softmax(logits), no top-k, no early stop):
- shared_prefix: `align.engine.sampling.sample_n`, one prefill per prompt, the prompt's keys and values kept
  once and shared by its n continuations (`align.engine.shared_prefix`), continuation cache preallocated;
- expanded: the same loop with the prefilled cache copied n times (one prefill, n*(L+T) cache rows);
- repeated: every prompt repeated n times (n prefills), the naive loop;
- hf: HF `generate(do_sample=True, num_return_sequences=n, top_k=0, eos_token_id=None)`;
- compiled (with compile=true): shared_prefix with the decode step under torch.compile; the table
  reports its compilation time (first call minus the median);
- vllm (where vLLM's environment exists, `make vllm-env`): `vllm.LLM.generate` on the same weights
  (saved, then loaded by vLLM), prefix caching on, eager on a CPU, in its own process
  (jobs.bench.vllm_worker) with the same thread count, taking its turn with the others.

The ceiling (ceiling=true): the machine's fp32 (or dtype) matmul rate, measured here on the same
threads, divided by each model's FLOPs per new token (2 x weights used per token, LM head included,
plus attention over the mean context): the tokens/s a decode loop that only multiplied matrices
would reach. The table gives each method's fraction of it.

Each cell is warmed up once per method, then timed `repeats` times with the methods taking turns (a
change in machine load hits all alike); medians are reported. Peak memory (memory=true) is measured
for each model's largest cell, one fresh process per method (`jobs.bench.common.peak_memory_mb`).
Writes <output_dir>/results.json, results.md and config.yaml, and prints the tables.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Literal

import torch

from align.runtime.config import OutputPath, require, run_job, to_dict
from jobs.bench.common import format_table, machine, machine_line, peak_memory_mb, resolve_device, time_call, write_results

log = logging.getLogger("sweetspot.bench_generate")

METHODS = ("shared_prefix", "expanded", "repeated", "hf")
MEMORY_METHODS = ("shared_prefix", "expanded", "hf")


@dataclass
class ModelShape:
    """A random-weight GPT-2; `name` labels its rows. `ns` / `prompt_lens` override the global lists."""

    name: str = "gpt2-4x256"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 50257
    ns: list[int] | None = None
    prompt_lens: list[int] | None = None

    def __post_init__(self):
        require(self.n_layer >= 1, "n_layer", "an integer >= 1", self.n_layer)
        require(self.n_head >= 1 and self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head ({self.n_head})", self.n_embd)
        require(self.vocab_size >= 2, "vocab_size", "an integer >= 2", self.vocab_size)
        require(self.ns is None or (len(self.ns) >= 1 and all(n >= 1 for n in self.ns)), "ns", "null or a non-empty list of integers >= 1", self.ns)
        require(self.prompt_lens is None or (len(self.prompt_lens) >= 1 and all(L >= 1 for L in self.prompt_lens)), "prompt_lens", "null or a non-empty list of integers >= 1", self.prompt_lens)


def _default_models() -> list[ModelShape]:
    return [ModelShape("gpt2-4x256", 4, 256, 4, 50257), ModelShape("gpt2-12x768", 12, 768, 12, 50257, ns=[4, 16])]


# `quick: true` swaps the grid for this one: a smoke run that finishes in seconds on a CPU.
QUICK = dict(models=[ModelShape("gpt2-2x64", 2, 64, 2, 256)], prompt_lens=[16], ns=[2, 4], max_new_tokens=4)


@dataclass
class BenchGenerateConfig:
    models: list[ModelShape] = field(default_factory=_default_models)
    prompt_lens: list[int] = field(default_factory=lambda: [32, 256])
    ns: list[int] = field(default_factory=lambda: [4, 16, 64])
    num_prompts: int = 2  # P: prompts per call; each call draws P * n continuations
    max_new_tokens: int = 32  # T: every row gets exactly T tokens (no early stop)
    repeats: int = 2  # timed calls per method and cell; the median is reported
    warmup_new_tokens: int = 4  # the untimed warm-up call per method and cell draws this many tokens
    memory: bool = True  # peak memory of each model's largest cell, one fresh process per method
    compile: bool = False  # also time shared_prefix with a torch.compile'd decode step
    quick: bool = False  # replace models, prompt_lens, ns and max_new_tokens with the tiny QUICK grid
    num_threads: int = 2  # torch.set_num_threads; 0 leaves torch's default
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32
    seed: int = 0
    vllm: Literal["auto", "always", "never"] = "auto"  # the vLLM column: auto when vllm_python exists
    vllm_python: str = ".venv-vllm/bin/python"  # the Python of vLLM's environment (make vllm-env)
    ceiling: bool = True  # measure the matmul rate and report each method's fraction of the model's ceiling
    output_dir: OutputPath = "outputs/bench_generate"

    def __post_init__(self):
        from pathlib import Path

        from align.runtime.config import ConfigError

        if self.vllm == "always" and not Path(self.vllm_python).is_file():
            raise ConfigError("vllm_python", "the Python of an environment with vLLM (run `make vllm-env`) when vllm is "
                              "always", self.vllm_python)
        require(len(self.models) >= 1, "models", "a non-empty list of model shapes", self.models)
        require(len(self.prompt_lens) >= 1 and all(L >= 1 for L in self.prompt_lens), "prompt_lens", "a non-empty list of integers >= 1", self.prompt_lens)
        require(len(self.ns) >= 1 and all(n >= 1 for n in self.ns), "ns", "a non-empty list of integers >= 1", self.ns)
        require(self.num_prompts >= 1, "num_prompts", "an integer >= 1", self.num_prompts)
        require(self.max_new_tokens >= 2, "max_new_tokens", "an integer >= 2", self.max_new_tokens)
        require(self.repeats >= 1, "repeats", "an integer >= 1", self.repeats)
        require(1 <= self.warmup_new_tokens <= self.max_new_tokens, "warmup_new_tokens", f"1 <= warmup_new_tokens <= max_new_tokens ({self.max_new_tokens})", self.warmup_new_tokens)
        require(self.num_threads >= 0, "num_threads", "an integer >= 0", self.num_threads)
        require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device", "auto | cpu | cuda | cuda:N", self.device)


def resolve(cfg: BenchGenerateConfig) -> BenchGenerateConfig:
    """The config actually run: the QUICK grid when cfg.quick, warm-up tokens clipped to it."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, **QUICK, warmup_new_tokens=min(cfg.warmup_new_tokens, QUICK["max_new_tokens"]))


def cells(cfg: BenchGenerateConfig) -> list[tuple[ModelShape, int, int]]:
    return [(shape, L, n) for shape in cfg.models for L in (shape.prompt_lens or cfg.prompt_lens) for n in (shape.ns or cfg.ns)]


def build_model(shape: ModelShape, n_positions: int, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # No bos/eos: GPT-2's default 50256 is outside small vocabularies, and nothing here stops at EOS.
    config = GPT2Config(vocab_size=shape.vocab_size, n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                        n_positions=n_positions, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def prompts(shape: ModelShape, prompt_len: int, cfg: BenchGenerateConfig, device: torch.device):
    g = torch.Generator().manual_seed(cfg.seed + prompt_len)
    # Ids from 1: HF generate drops an all-ones mask at prefill, and GPT-2 then warns about pad id 0.
    input_ids = torch.randint(1, shape.vocab_size, (cfg.num_prompts, prompt_len), generator=g).to(device)  # (P, L)
    return input_ids, torch.ones_like(input_ids)


def sampler(method: str, model, input_ids, attention_mask, n: int, seed: int):
    """f(T) -> the (P*n, T) new tokens drawn by `method`."""
    from align.engine.sampling import sample_n, sample_n_repeated

    def gen():
        return torch.Generator(device=input_ids.device).manual_seed(seed)

    if method == "hf":
        def hf(T):
            torch.manual_seed(seed)
            out = model.generate(input_ids, attention_mask=attention_mask, do_sample=True, num_return_sequences=n,
                                 max_new_tokens=T, min_new_tokens=T, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)
            return out[:, input_ids.shape[1]:]
        return hf
    if method == "repeated":
        return lambda T: sample_n_repeated(model, input_ids, attention_mask, n, max_new_tokens=T, generator=gen(), cache="expanded").tokens
    cache = "expanded" if method == "expanded" else "shared_prefix"
    return lambda T: sample_n(model, input_ids, attention_mask, n, T, generator=gen(), cache=cache, compile=method == "compiled").tokens


class VllmProcess:
    """vLLM in its own environment's Python (jobs.bench.vllm_worker), holding one saved model;
    `sampler(input_ids, n, seed)` is a method like the others: f(T) -> a (P*n, T)-shaped tensor."""

    def __init__(self, python: str, model, cfg: BenchGenerateConfig, workdir: str):
        model_dir = os.path.join(workdir, "model")
        model.save_pretrained(model_dir)  # the same weights, read back by vLLM
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        threads = cfg.num_threads or os.cpu_count()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "HF_HUB_OFFLINE": "1"}
        self.log_path, self.failed = os.path.join(workdir, "vllm.log"), None
        self.proc = subprocess.Popen([os.path.abspath(python), "-m", "jobs.bench.vllm_worker", model_dir, str(threads), dtype],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"),
                                     text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        self.ready = self.answer()
        log.info("vLLM %s loaded the model in %.1f s", self.ready["vllm"], self.ready["load_seconds"])

    def answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            tail = open(self.log_path).read()[-3000:]
            raise RuntimeError(f"the vLLM worker stopped answering; its log ends:\n{tail}")
        return json.loads(line)

    def sampler(self, input_ids: torch.Tensor, n: int, seed: int):
        prompts = input_ids.tolist()

        def f(T):
            self.proc.stdin.write(json.dumps({"prompts": prompts, "n": n, "max_new_tokens": T, "seed": seed}) + "\n")
            self.proc.stdin.flush()
            out = self.answer()
            if out["lengths"] != [T]:
                raise RuntimeError(f"vllm drew rows of lengths {out['lengths']}, expected {T}")
            return torch.empty(out["rows"], T)  # the shape, for the same check as the other methods
        return f

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it died already
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def matmul_gflops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """The best GFLOP/s of a size^3 matmul here (the threads torch was given), over about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    for _ in range(3):  # warm-up
        a @ b
    while time.perf_counter() < end:
        s, _ = time_call(lambda: a @ b, device)
        best = max(best, 2 * size**3 / max(s, 1e-9) / 1e9)
    return best


def flops_per_token(shape: ModelShape, context: float) -> float:
    """2 x the weights one new token multiplies (12 d^2 per layer: attention and MLP; d x V: the LM
    head) plus attention's scores and mix over `context` positions (4 d per layer per position)."""
    d, layers = shape.n_embd, shape.n_layer
    return 2 * (12 * d * d * layers + d * shape.vocab_size) + 4 * d * layers * context


def bench_cell(model, shape: ModelShape, prompt_len: int, n: int, cfg: BenchGenerateConfig, device: torch.device,
               vllm: VllmProcess | None = None) -> dict:
    """One grid cell: warm up and time every method; returns a table row."""
    P, T = cfg.num_prompts, cfg.max_new_tokens
    input_ids, attention_mask = prompts(shape, prompt_len, cfg, device)
    row = {"model": shape.name, "prompt_len": prompt_len, "n": n, "prompts": P, "new_tokens": P * n * T}
    methods = METHODS + (("compiled",) if cfg.compile else ())
    fs = {m: sampler(m, model, input_ids, attention_mask, n, cfg.seed) for m in methods}
    if vllm is not None and vllm.failed is None:
        fs["vllm"] = vllm.sampler(input_ids, n, cfg.seed)
    first = {}
    with torch.no_grad():
        for m, f in list(fs.items()):  # the compiled step is warmed up at full length: its shapes depend on T
            try:
                first[m], _ = time_call(f, device, T if m == "compiled" else cfg.warmup_new_tokens)
            except RuntimeError as e:
                if m != "vllm":
                    raise
                # vLLM cannot run this model (its CPU attention takes some head sizes only): the rest
                # of the table goes on without its column, and says why.
                vllm.failed = str(e).strip().splitlines()[-1]
                log.warning("%s: no vLLM column: %s", shape.name, vllm.failed)
                del fs[m]
        seconds = {m: [] for m in fs}
        for _ in range(cfg.repeats):
            for m, f in fs.items():
                s, tokens = time_call(f, device, T)
                if tokens.shape != (P * n, T):  # a method that stopped early or drew fewer rows is not comparable
                    raise RuntimeError(f"{m} returned tokens of shape {tuple(tokens.shape)}, expected {(P * n, T)}")
                seconds[m].append(s)
    for m, times in seconds.items():
        median = statistics.median(times)
        row[f"{m}_seconds"], row[f"{m}_seconds_all"] = median, times
        row[f"{m}_tokens_per_s"] = P * n * T / max(median, 1e-9)
        log.info("%s L=%d n=%d %-13s %.3f s (%s)", shape.name, prompt_len, n, m, median, ", ".join(f"{s:.3f}" for s in times))
    for m in ("hf", "expanded", "repeated") + (("vllm",) if "vllm" in fs else ()):
        row[f"shared_over_{m}"] = row["shared_prefix_tokens_per_s"] / row[f"{m}_tokens_per_s"]
    if cfg.compile:
        row["compiled_over_shared"] = row["compiled_tokens_per_s"] / row["shared_prefix_tokens_per_s"]
        row["compile_seconds"] = first["compiled"] - row["compiled_seconds"]
    return row


def _memory_child(cfg_dict: dict, shape_dict: dict, prompt_len: int, n: int, method: str) -> float | None:
    """Runs in a fresh process: build the model and prompts, then the peak memory of one call."""
    cfg = BenchGenerateConfig(**{**cfg_dict, "models": [ModelShape(**shape_dict)]})
    shape = cfg.models[0]
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = build_model(shape, prompt_len + cfg.max_new_tokens, device, dtype, cfg.seed)
    input_ids, attention_mask = prompts(shape, prompt_len, cfg, device)
    f = sampler(method, model, input_ids, attention_mask, n, cfg.seed)
    with torch.no_grad():
        return peak_memory_mb(lambda: f(cfg.max_new_tokens), device)


def bench_memory(cfg: BenchGenerateConfig) -> list[dict]:
    """Peak MiB of each memory method at each model's largest (prompt_len, n) cell."""
    rows = []
    cfg_dict = {k: v for k, v in to_dict(cfg).items() if k != "models"}
    for shape in cfg.models:
        L, n = max(shape.prompt_lens or cfg.prompt_lens), max(shape.ns or cfg.ns)
        row = {"model": shape.name, "prompt_len": L, "n": n}
        for m in MEMORY_METHODS:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                row[f"{m}_peak_mb"] = pool.submit(_memory_child, cfg_dict, dataclasses.asdict(shape), L, n, m).result()
            log.info("%s L=%d n=%d %-13s peak %s MiB", shape.name, L, n, m, row[f"{m}_peak_mb"])
        if row["shared_prefix_peak_mb"] is not None and row["expanded_peak_mb"]:
            row["shared_over_expanded_memory"] = row["shared_prefix_peak_mb"] / row["expanded_peak_mb"]
        rows.append(row)
    return rows


SPEED_COLUMNS = [("model", "model", "{}"), ("prompt", "prompt_len", "{}"), ("n", "n", "{}"),
                 ("shared_prefix tok/s", "shared_prefix_tokens_per_s", "{:.0f}"), ("expanded tok/s", "expanded_tokens_per_s", "{:.0f}"),
                 ("repeated tok/s", "repeated_tokens_per_s", "{:.0f}"), ("HF tok/s", "hf_tokens_per_s", "{:.0f}"),
                 ("shared/HF", "shared_over_hf", "{:.2f}x"), ("shared/expanded", "shared_over_expanded", "{:.2f}x"),
                 ("shared/repeated", "shared_over_repeated", "{:.2f}x")]
VLLM_COLUMNS = [("vLLM tok/s", "vllm_tokens_per_s", "{:.0f}"), ("shared/vLLM", "shared_over_vllm", "{:.2f}x")]
CEILING_COLUMNS = [("ceiling tok/s", "ceiling_tokens_per_s", "{:.0f}"), ("shared % ceiling", "shared_prefix_of_ceiling", "{:.0%}"),
                   ("vLLM % ceiling", "vllm_of_ceiling", "{:.0%}")]
COMPILE_COLUMNS = [("compiled tok/s", "compiled_tokens_per_s", "{:.0f}"), ("compiled/shared", "compiled_over_shared", "{:.2f}x"),
                   ("compile s", "compile_seconds", "{:.1f}")]
MEMORY_COLUMNS = [("model", "model", "{}"), ("prompt", "prompt_len", "{}"), ("n", "n", "{}"),
                  ("shared_prefix MiB", "shared_prefix_peak_mb", "{:.0f}"), ("expanded MiB", "expanded_peak_mb", "{:.0f}"),
                  ("HF MiB", "hf_peak_mb", "{:.0f}"), ("shared/expanded", "shared_over_expanded_memory", "{:.2f}")]


def run(cfg: BenchGenerateConfig) -> dict:
    """Time every cell for every method (and the peak memory of the largest cells); returns
    {"rows", "memory", "env", "wall_seconds"}, also written to results.json and results.md."""
    cfg = resolve(cfg)
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    from pathlib import Path

    use_vllm = cfg.vllm == "always" or (cfg.vllm == "auto" and Path(cfg.vllm_python).is_file())
    if cfg.vllm == "auto" and not use_vllm:
        print(f"  no vLLM column: {cfg.vllm_python} does not exist (make vllm-env builds it)", flush=True)
    gflops = matmul_gflops(device, dtype) if cfg.ceiling else None
    rows = []
    for i, shape in enumerate(cfg.models):
        model = build_model(shape, max(shape.prompt_lens or cfg.prompt_lens) + cfg.max_new_tokens, device, dtype, cfg.seed)
        with tempfile.TemporaryDirectory() as workdir:
            vllm = VllmProcess(cfg.vllm_python, model, cfg, workdir) if use_vllm else None
            try:
                rows += [bench_cell(model, shape, L, n, cfg, device, vllm) for s, L, n in cells(cfg) if s is shape]
            finally:
                if vllm is not None:
                    vllm.close()
        del model
    if gflops:
        for row in rows:
            shape = next(s for s in cfg.models if s.name == row["model"])
            row["ceiling_tokens_per_s"] = gflops * 1e9 / flops_per_token(shape, row["prompt_len"] + cfg.max_new_tokens / 2)
            for m in ("shared_prefix", "vllm"):
                if f"{m}_tokens_per_s" in row:
                    row[f"{m}_of_ceiling"] = row[f"{m}_tokens_per_s"] / row["ceiling_tokens_per_s"]
    memory = bench_memory(cfg) if cfg.memory else []
    env = {**machine(device), "dtype": str(dtype).removeprefix("torch."), "matmul_gflops": gflops,
           "vllm": use_vllm}
    result = {"rows": rows, "memory": memory, "env": env, "wall_seconds": time.perf_counter() - start}

    columns = SPEED_COLUMNS + (VLLM_COLUMNS if use_vllm else []) + (COMPILE_COLUMNS if cfg.compile else [])
    if gflops:
        columns += [c for c in CEILING_COLUMNS if use_vllm or c[1] != "vllm_of_ceiling"]
    speed_text, speed_md = format_table(rows, columns)
    header = (f"Tokens/s drawing n samples for each of {cfg.num_prompts} prompts, {cfg.max_new_tokens} new tokens, "
              f"random-weight GPT-2, median of {cfg.repeats}; {machine_line(env)}, {env['dtype']}"
              + (f"; matmul {gflops:.0f} GFLOP/s ({cfg.num_threads or 'all'} threads)" if gflops else "") + ".")
    text, md = f"  {header}\n\n{speed_text}", f"{header}\n\n{speed_md}\n"
    if memory:
        mem_text, mem_md = format_table(memory, MEMORY_COLUMNS)
        mem_header = "Peak memory of one n-sample call (MiB above the loaded model), one fresh process per method."
        text, md = f"{text}\n\n  {mem_header}\n\n{mem_text}", f"{md}\n{mem_header}\n\n{mem_md}\n"
    out = write_results(cfg, result, md)
    print(f"\n{text}\n\n  wall time {result['wall_seconds']:.1f} s; wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return result


def main(argv=None) -> dict:
    return run_job(BenchGenerateConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
