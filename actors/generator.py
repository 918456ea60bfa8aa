"""Generators: a `Generator` owns one causal LM on one device and samples n completions per prompt
from one shared prefill; a `GeneratorPool` launches a group of them as Ray actors and spreads prompt
batches over them, returning results in prompt order.

Reproducibility: every batch gets its own seed derived from (seed, batch index), so the samples do not
depend on which actor ran which batch or on how many actors there are (for a fixed batch_size).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch


def batch_seed(seed: int, batch_index: int) -> int:
    """An independent 63-bit seed per (run seed, batch index)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class PromptSamples:
    """The n completions drawn for one prompt."""

    prompt: str
    completions: list[str]
    num_tokens: list[int]
    logprobs: list[float]  # log pi(y|x) of each completion under the generator's model
    rewards: list[float] = field(default_factory=list)


class Generator:
    """Owns a causal LM and its tokenizer on one device; `sample` draws n completions per prompt."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto", num_threads: int | None = None):
        from align.models import load_causal_lm

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.tokenizer = load_causal_lm(model_path, device=device, dtype=dtype)
        self.device = next(self.model.parameters()).device

    def sample(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        min_new_tokens: int = 0,
        stop_at_eos: bool = True,
        seed: int = 0,
    ) -> dict:
        """n completions for each prompt (shared prefill). Returns {"samples": [PromptSamples], "seconds", "new_tokens"}."""
        from align.models import encode_prompts
        from align.sampling import sample_n

        start = time.perf_counter()
        ids, mask = encode_prompts(self.tokenizer, prompts, self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out = sample_n(
            self.model,
            ids,
            mask,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            min_new_tokens=min_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id if stop_at_eos else None,
            pad_token_id=self.tokenizer.pad_token_id,
            generator=gen,
        )
        texts = self.tokenizer.batch_decode(out.completion_ids(), skip_special_tokens=True)
        lengths = out.lengths.tolist()
        logprobs = out.logprobs.tolist()
        samples = [
            PromptSamples(p, texts[i * n : (i + 1) * n], lengths[i * n : (i + 1) * n], logprobs[i * n : (i + 1) * n])
            for i, p in enumerate(prompts)
        ]
        return {"samples": samples, "seconds": time.perf_counter() - start, "new_tokens": int(sum(lengths))}


class GeneratorPool:
    """A group of `Generator` Ray actors (one model copy each) sampling prompt batches in parallel."""

    def __init__(
        self,
        model_path: str,
        num_actors: int = 1,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float = 0,
        device: str = "auto",
        dtype: str = "auto",
    ):
        import ray

        threads = max(1, int(num_cpus_per_actor))
        remote_cls = ray.remote(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)(Generator)
        self.actors = [remote_cls.remote(model_path, device, dtype, threads) for _ in range(num_actors)]

    def sample(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool = True,
        **sampling,
    ):
        """Yield each batch's result dict in prompt order as soon as it and its predecessors are done."""
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        pool = ActorPool(self.actors)
        results = pool.map(
            lambda actor, item: actor.sample.remote(item[1], n, max_new_tokens, seed=batch_seed(seed, item[0]), **sampling),
            list(enumerate(batches)),
        )
        with tqdm(total=len(prompts), desc=f"sampling n={n}", unit="prompt", disable=not progress) as bar:
            for result in results:
                bar.update(len(result["samples"]))
                yield result

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
