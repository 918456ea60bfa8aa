"""The generator pool's vLLM engine (pool.engine: vllm): a Ray actor that owns a `vllm.LLM` and returns
the same sample records as the torch `Generator` (align.engine.samples.PromptSamples): the prompt's ids
as the policy's tokenizer (and chat template) makes them, the completion ids as drawn (the stop id
included when one ended the turn), and each completion's log-prob under the process that drew it
(vLLM's processed log-probs: after temperature, top-p and the min-tokens mask, as align.math.draw).

The actor runs in vLLM's own Python environment (`make vllm-env`: vLLM pins an older transformers than
the project), started by Ray with runtime_env py_executable; only this module, align.engine and
actors.cluster are imported there. What vLLM cannot do (DeRa, speculative rejection, weight pushes) is
refused at config load (align/engine/engines.py) and again here by name.

Seeds: every prompt gets its own seed (align.engine.samples.prompt_seeds of the batch seed, or the caller's),
so a batch's samples do not depend on which actor ran it or whether it was rerun; they are vLLM's
draws, not the torch engine's (the two engines' random streams differ).
"""
from __future__ import annotations

import os
import time

from align.engine.samples import TextOps


def vllm_actor_options(engine_python: str | None, threads: int, device: str) -> dict:
    """Ray actor options that run a VllmGenerator in vLLM's environment."""
    from align.engine.engines import DEFAULT_VLLM_PYTHON

    # absolute, not resolved: a venv's bin/python is a link to the base interpreter, and only the link
    # path makes Python find the venv's packages
    python = os.path.abspath(engine_python or DEFAULT_VLLM_PYTHON)
    env = {
        # The engine core in the actor's own process: vLLM's default spawns it as a subprocess, which
        # would re-import a Ray worker's __main__.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    if device == "cpu":
        # GiB of KV cache on a CPU node (vLLM's default, 4, is more than a small test machine wants),
        # and the OpenMP threads left where Ray's CPU reservation puts them.
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {"runtime_env": {"py_executable": python, "env_vars": env}}


class VllmGenerator(TextOps):
    """Owns a vLLM engine for one causal LM; `sample` and `prompt_logprobs` have the torch Generator's
    signatures and results (the text-side operations are align.engine.samples.TextOps)."""

    def __init__(self, model_path, device: str = "auto", dtype: str = "auto", num_threads: int | None = None,
                 fingerprint: str = "", gpu_memory_utilization: float = 0.85):
        import torch
        from vllm import LLM

        from actors.cluster import local_dir
        from align.engine.models import context_length, load_encoder, tokenizer_fingerprint

        if num_threads:
            torch.set_num_threads(num_threads)
        path = str(local_dir(model_path))
        self.encoder = load_encoder(path)
        self.tokenizer = self.encoder.tokenizer
        self.fingerprint = fingerprint or tokenizer_fingerprint(self.tokenizer)
        self.context = context_length(path)
        cuda = device != "cpu" and torch.cuda.is_available()
        self.llm = LLM(model=path, dtype=dtype if dtype != "auto" else ("bfloat16" if cuda else "float32"),
                       enforce_eager=not cuda, skip_tokenizer_init=True, max_model_len=self.context, seed=0,
                       logprobs_mode="processed_logprobs",
                       # A prefill split over steps has its sampled token discarded and its per-request
                       # generator rewound, which a CPU generator cannot do (vLLM 0.32): whole prefills only.
                       enable_chunked_prefill=False,
                       **({"gpu_memory_utilization": gpu_memory_utilization} if cuda else {}))

    def sample(self, prompts: list, n: int, max_new_tokens: int | list[int], temperature: float = 1.0,
               min_new_tokens: int = 0, stop_at_eos: bool = True, seed: int = 0, rejection: dict | None = None,
               lam=None, seeds: list[int] | None = None, weights_version: int | None = None, top_p: float = 1.0,
               token_logprobs: bool = False, top_logprobs: int = 0) -> dict:
        """n completions per prompt: {"samples": [PromptSamples], "seconds", "new_tokens"} (and
        "token_logprobs" / "top" when asked), as actors.generator.Generator.sample."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from align.engine.engines import WHY
        from align.engine.samples import PromptSamples, prompt_seeds

        for name, value, capability in (("rejection", rejection, "speculative_rejection"), ("lam", lam, "dera"),
                                        ("weights_version", weights_version, "weight_updates")):
            if value is not None:
                raise ValueError(f"{name}: {WHY[capability]}, which the vllm engine cannot (pool.engine: torch)")
        start = time.perf_counter()
        ids = self.encoder.batch_ids(self.checked(prompts))
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        self.check_context(prompts, budgets, lengths=[len(p) for p in ids])
        seeds = seeds if seeds is not None else prompt_seeds(seed, len(prompts))
        stops = list(self.encoder.stop_ids) if stop_at_eos else []
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=m, min_tokens=min(min_new_tokens, m),
                                 stop_token_ids=stops, ignore_eos=not stop_at_eos, logprobs=top_logprobs,
                                 seed=s % (2**63), detokenize=False)
                  for m, s in zip(budgets, seeds)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        samples, per_token, tops, total = [], [], [], 0
        for prompt, prompt_ids, out in zip(prompts, ids, outputs):
            rows = sorted(out.outputs, key=lambda c: c.index)
            completion_ids = [list(c.token_ids) for c in rows]
            lps = [self._token_logprobs(c, temperature) for c in rows]
            texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            drawn = sum(len(c) for c in completion_ids)
            total += drawn
            samples.append(PromptSamples(prompt, list(prompt_ids), texts, completion_ids, [float(sum(x)) for x in lps],
                                         self.fingerprint, drawn_tokens=drawn))
            per_token.append(lps)
            if top_logprobs:
                tops.append([[sorted(((t, float(lp.logprob)) for t, lp in step.items()), key=lambda x: -x[1])[:top_logprobs]
                              for step in (c.logprobs or [])] for c in rows])
        result = {"samples": samples, "seconds": time.perf_counter() - start, "new_tokens": total}
        if token_logprobs or top_logprobs:
            result["token_logprobs"] = per_token
        if top_logprobs:
            result["top"] = tops
        return result

    def context_length(self) -> int | None:
        return self.context

    def prompt_logprobs(self, prompts: list, top_logprobs: int = 0, lam=None) -> list[dict]:
        """Per prompt, the model's log-prob of each of its tokens given the ones before, as
        actors.generator.Generator.prompt_logprobs: {"ids", "token_logprobs" (None first), "top" (per
        token the top_logprobs likeliest [(id, log-prob)], None first; None when 0)}, from vLLM's
        prompt log-probs at temperature 1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from align.engine.engines import WHY

        if lam is not None:
            raise ValueError(f"lam: {WHY['dera']}, which the vllm engine cannot (engine: torch)")
        ids = self.encoder.batch_ids(self.checked(prompts))
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_logprobs, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        out = []
        for prompt_ids, o in zip(ids, outputs):
            steps = o.prompt_logprobs or [None] * len(prompt_ids)
            row = {"ids": list(prompt_ids), "token_logprobs": [None] + [float(step[t].logprob) for step, t
                                                                       in zip(steps[1:], prompt_ids[1:])], "top": None}
            if top_logprobs:
                # vLLM's dict holds the prompt's own token beside the top k: keep the top k by rank.
                row["top"] = [None] + [sorted(((t, float(lp.logprob)) for t, lp in step.items() if lp.rank <= top_logprobs),
                                              key=lambda x: -x[1]) for step in steps[1:]]
            out.append(row)
        return out

    @staticmethod
    def _token_logprobs(completion, temperature: float) -> list[float]:
        """Each drawn token's log-prob under the sampling process (0 for a greedy token, as the torch engine)."""
        if temperature == 0:
            return [0.0] * len(completion.token_ids)
        return [float(step[t].logprob) for step, t in zip(completion.logprobs, completion.token_ids)]


class VllmEngineClient(TextOps):
    """A VllmGenerator actor seen through the torch Generator's interface, for a process outside vLLM's
    environment (a Serve generator replica, serve/app.py): `sample` and `prompt_logprobs` run in the
    actor; the text-side operations (TextOps) run here on the same tokenizer. The actor reserves the
    GPU (or the CPUs) and Ray restarts it in place if it dies; a call it was running fails (the
    replica answers 503), later calls reach the restarted engine."""

    def __init__(self, model_path: str, device: str = "auto", num_threads: int | None = None,
                 engine_python: str | None = None, dtype: str = "auto"):
        import ray

        from actors.cluster import ship_dir
        from align.engine.models import context_length, load_encoder, resolve_model_path, tokenizer_fingerprint

        path = resolve_model_path(model_path)
        self.encoder = load_encoder(path)
        self.tokenizer = self.encoder.tokenizer
        self.context = context_length(path)
        threads = num_threads or 1
        if device == "auto":  # a GPU when the cluster has one free for the engine
            device = "cuda" if ray.available_resources().get("GPU", 0) >= 1 else "cpu"
        options = {"num_cpus": threads if device == "cpu" else 1, "num_gpus": 1 if device == "cuda" else 0,
                   "max_restarts": -1, "max_task_retries": 0, **vllm_actor_options(engine_python, threads, device)}
        self.actor = ray.remote(VllmGenerator).options(**options).remote(
            ship_dir(path), device, dtype, threads, tokenizer_fingerprint(self.tokenizer))
        ray.get(self.actor.context_length.remote())  # ready (or its start-up error, here)

    def context_length(self) -> int | None:
        return self.context

    def sample(self, *args, **kwargs) -> dict:
        import ray

        return ray.get(self.actor.sample.remote(*args, **kwargs))

    def prompt_logprobs(self, *args, **kwargs) -> list[dict]:
        import ray

        return ray.get(self.actor.prompt_logprobs.remote(*args, **kwargs))
