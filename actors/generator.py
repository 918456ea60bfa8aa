"""Generators: a `Generator` owns one causal LM on one device and samples n completions per prompt
from one shared prefill; a `GeneratorPool` runs a group of them as Ray actors, replaces any that die
and reruns their lost batches.

Every sample keeps its token ids (prompt ids as fed, completion ids as drawn, end-of-sequence
included when drawn) and its log-prob under the sampling process; text is decoded for people and
text-based rewards. Reproducibility: every batch gets its own seed derived from (seed, batch index),
so samples do not depend on which actor ran a batch, on how many actors there are, or on whether a
batch was rerun after an actor died (for a fixed batch_size).
"""
from __future__ import annotations

import time

import torch

# Seeds and prompt errors are the engines' common ground (align.engine.samples); named here too, where
# the pool's callers have always found them.
from align.engine.samples import (PromptError, PromptSamples, PromptTooLongError, TextOps, batch_seed,  # noqa: F401
                                  prompt_seeds)


class StaleWeightsError(RuntimeError):
    """A generator asked to sample with weights it does not hold (e.g. restarted since the last push)."""


class Generator(TextOps):
    """Owns a causal LM and its tokenizer on one device; `sample` draws n completions per prompt (the
    text-side operations, stop sequences and token offsets, are align.engine.samples.TextOps)."""

    def __init__(self, model_path, device: str = "auto", dtype: str = "auto", num_threads: int | None = None,
                 cache: str = "auto", compile: bool = False, aligned_path=None):
        """model_path: an HF name, a directory, or an actors.cluster.ShippedDir (unpacked on this node).
        cache, compile: how decoding holds the shared prompt and whether its step is compiled
        (`align.engine.decoding.prefill`). aligned_path: an aligned model sharing the tokenizer, for DeRa
        (`sample(..., lam=...)`); model_path is then the reference pi_0."""
        from actors.cluster import local_dir
        from align.engine.chat import PromptEncoder, stop_ids_of
        from align.engine.models import load_causal_lm, tokenizer_fingerprint

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.tokenizer = load_causal_lm(local_dir(model_path), device=device, dtype=dtype)
        self.encoder = PromptEncoder(self.tokenizer, stop_ids_of(self.tokenizer, self.model.generation_config.eos_token_id))
        self.device = next(self.model.parameters()).device
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.cache, self.compile = cache, compile
        self.weights_version = 0  # set_weights' version; a restarted actor is back at 0 (the weights it was built with)
        self.aligned = None
        if aligned_path is not None:
            self.aligned, aligned_tok = load_causal_lm(local_dir(aligned_path), device=self.device, dtype=dtype)
            if tokenizer_fingerprint(aligned_tok) != self.fingerprint:
                raise ValueError("DeRa needs the aligned model to share the reference model's tokenizer")

    def sample(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int | list[int],
        temperature: float = 1.0,
        min_new_tokens: int = 0,
        stop_at_eos: bool = True,
        seed: int = 0,
        rejection: dict | None = None,
        lam: float | list[float] | None = None,
        seeds: list[int] | None = None,
        weights_version: int | None = None,
        top_p: float = 1.0,
        token_logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> dict:
        """n completions for each prompt (shared prefill). Returns {"samples": [PromptSamples], "seconds",
        "new_tokens"}; new_tokens counts every token drawn, those of rejected continuations included.

        temperature 0 is greedy decoding, top_p < 1 nucleus sampling; every log-prob is that of the
        distribution the token was drawn from (`align.math.draw.process_logits`: the nucleus
        renormalised, 0 for a greedy token). token_logprobs: also return "token_logprobs", per prompt
        and completion each drawn token's log-prob (they sum to the completion's `logprobs`);
        top_logprobs=k also "top", per token the k likeliest tokens of that distribution as
        [(id, log-prob)] (those of probability 0 left out).

        lam: DeRa (`align.math.dera`), one lambda or one per prompt: tokens come from lam * aligned + (1 - lam)
        * reference logits, both models decoding in the same loop, each with its own cache; each
        sample's `ref_logprob` is then its log-prob under the reference run as the same process.

        rejection: speculative rejection (`align.math.speculative`), a dict with `rejection_rate`,
        `decision_tokens` and `reward` (a reward spec: align.rewards.registry). The last of the n rows is
        an independent sample that is never rejected; each prompt ends with the survivors plus it.

        seeds, and max_new_tokens as a list: one per prompt, so prompts batched together from several
        requests draw what each would draw alone (`NSampler`); `seed` is then unused.

        weights_version: when given, the version of the weights the caller pushed last (set_weights);
        a generator holding other weights raises StaleWeightsError instead of sampling from them.
        """
        if weights_version is not None and weights_version != self.weights_version:
            raise StaleWeightsError(f"this generator holds weights version {self.weights_version}, the caller expects "
                                    f"{weights_version} (the actor was restarted since the last push?)")
        from align.engine.sampling import NSampler

        start = time.perf_counter()
        ids, mask = self.encoder.pad_left(self.checked(prompts), self.device)
        self.check_context(prompts, max_new_tokens, mask.sum(1).tolist())  # lengths from this encoding: no second pass
        if seeds is not None:
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds needs one seed per prompt ({len(prompts)}), got {len(seeds)}")
            gen = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        else:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        models, mix = self.model, None
        if lam is not None:
            from align.math.dera import dera_mix

            if self.aligned is None:
                raise ValueError("lam (DeRa) needs a Generator built with aligned_path")
            lams = [float(lam)] * len(prompts) if isinstance(lam, (int, float)) else [float(x) for x in lam]
            if len(lams) != len(prompts):
                raise ValueError(f"lam must be one float or one per prompt ({len(prompts)}), got {len(lams)}")
            models, mix = [self.model, self.aligned], dera_mix(torch.tensor(lams).repeat_interleave(n))
        eos = self.encoder.stop_ids or None if stop_at_eos else None  # every end-of-turn id
        with torch.no_grad():
            sampler = NSampler(models, ids, mask, n, max_new_tokens, temperature, min_new_tokens, eos_token_id=eos,
                               pad_token_id=self.tokenizer.pad_token_id, generator=gen, mix=mix, cache=self.cache,
                               compile=self.compile, top_p=top_p, top_logprobs=top_logprobs)
            if rejection:
                self._reject(sampler, prompts, ids, mask, rejection)
            out = sampler.run().samples()
            ref_logprobs = None
            if lam is not None:
                from align.engine.sampling import continuation_logprobs

                rows = torch.arange(len(prompts), device=self.device).repeat_interleave(out.n)
                ref_logprobs = continuation_logprobs(self.model, ids[rows], mask[rows], out.tokens, out.mask, temperature,
                                                     min_new_tokens if eos is not None else 0, eos, top_p).tolist()
        completion_ids = out.completion_ids()
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        logprobs, m = out.logprobs.tolist(), out.n
        drawn = sampler.drawn.view(len(prompts), n).sum(-1).tolist()  # per prompt, rows dropped on the way included
        samples = [
            PromptSamples(p, ids[i][mask[i].bool()].tolist(), texts[i * m : (i + 1) * m],
                          completion_ids[i * m : (i + 1) * m], logprobs[i * m : (i + 1) * m], self.fingerprint,
                          drawn_tokens=drawn[i], ref_logprobs=ref_logprobs[i * m : (i + 1) * m] if ref_logprobs else None)
            for i, p in enumerate(prompts)
        ]
        result = {"samples": samples, "seconds": time.perf_counter() - start, "new_tokens": int(sampler.drawn.sum())}
        if token_logprobs or top_logprobs:
            per_row = [lp[k].tolist() for lp, k in zip(out.token_logprobs, out.mask)]
            result["token_logprobs"] = [per_row[i * m : (i + 1) * m] for i in range(len(prompts))]
        if top_logprobs:
            top = [[[(t, v) for t, v in zip(step_ids, step_lps) if v != float("-inf")]
                    for step_ids, step_lps in zip(ids_[k].tolist(), lps[k].tolist())]
                   for ids_, lps, k in zip(out.top_ids, out.top_logprobs, out.mask)]
            result["top"] = [top[i * m : (i + 1) * m] for i in range(len(prompts))]
        return result

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[str], top_logprobs: int = 0, lam: float | list[float] | None = None) -> list[dict]:
        """Per prompt, the model's log-prob of each of its tokens given the ones before: {"ids",
        "token_logprobs" (None for the first token, which has no context), "top" (per token the
        top_logprobs likeliest tokens as [(id, log-prob)], None for the first; None when 0)}. The
        prompt was not sampled, so this is the model's own next-token distribution (temperature 1,
        no nucleus): pi_0's, or with `lam` DeRa's mix at that lambda (one, or one per prompt)."""
        ids, mask = self.encoder.pad_left(prompts, self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        if lam is not None:
            from align.math.dera import dera_logits

            if self.aligned is None:
                raise ValueError("lam (DeRa) needs a Generator built with aligned_path")
            aligned = self.aligned(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            lams = torch.tensor([float(lam)] * len(prompts) if isinstance(lam, (int, float)) else [float(x) for x in lam])
            P, L, V = logits.shape
            logits = dera_logits(logits.reshape(P * L, V), aligned.reshape(P * L, V), lams.repeat_interleave(L)).view(P, L, V)
        logp = torch.log_softmax(logits[:, :-1], -1)  # position t predicts token t + 1
        token_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        top = logp.topk(min(top_logprobs, logp.shape[-1]), -1) if top_logprobs else None
        out = []
        for i in range(len(prompts)):
            real = mask[i].bool()
            start = int((~real).sum())  # left padding
            row = {"ids": ids[i][real].tolist(), "token_logprobs": [None] + token_lp[i, start:].tolist(), "top": None}
            if top is not None:
                row["top"] = [None] + [list(zip(t, v)) for t, v in zip(top.indices[i, start:].tolist(), top.values[i, start:].tolist())]
            out.append(row)
        return out

    def context_length(self) -> int | None:
        """Positions the model can attend over (learned position tables end there), if it says."""
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

    def set_weights(self, state: dict, version: int | None = None) -> None:
        """Load new policy weights (a full state dict, e.g. from an on-policy trainer; in a Ray actor
        it arrives from the object store), cast to this model's dtype and device. `version` (the
        trainer's step) is what `sample(weights_version=...)` checks."""
        dtype = next(self.model.parameters()).dtype
        self.model.load_state_dict({k: v.to(self.device, dtype if v.is_floating_point() else v.dtype)
                                    for k, v in state.items()})
        if version is not None:
            self.weights_version = version

    def weights_digest(self) -> str:
        """A hash of the model's parameters and buffers (to check a weight sync landed exactly)."""
        from align.math.vbon import state_digest

        return state_digest(self.model.state_dict())

    def _reject(self, sampler, prompts: list[str], ids: torch.Tensor, mask: torch.Tensor, rejection: dict) -> None:
        """Run `sampler` to each decision point, score the partial completions with the configured
        reward, and keep the best of every prompt's candidates (align.math.speculative)."""
        from align.math.speculative import rows_to_keep, survivors

        scorer = self._partial_scorer(rejection["reward"])
        points = rejection["decision_tokens"]
        counts = survivors(sampler.n - 1, rejection["rejection_rate"], len(points))
        for t, keep in zip(points, counts):
            sampler.run(until=t)
            if sampler.done:
                break
            m = sampler.n
            partial = [row[k].tolist() for row, k in zip(sampler.tokens, sampler.mask)]
            prompt_ids = [ids[i][mask[i].bool()].tolist() for i in range(len(prompts))]
            rewards = scorer.score([p for p in prompts for _ in range(m)],
                                   self.tokenizer.batch_decode(partial, skip_special_tokens=True),
                                   [prompt_ids[j // m] + c for j, c in enumerate(partial)], self.fingerprint).mean
            sampler.keep(rows_to_keep(rewards.view(len(prompts), m), keep, exempt_last=True).to(self.device))

    def _partial_scorer(self, spec: dict):
        """The scorer used on partial completions (actors.scorer.make_scorer(spec)), built in this
        actor once per spec."""
        from actors.scorer import make_scorer

        key = repr(spec)  # a shipped directory's repr names its digest
        if getattr(self, "_scorer_key", None) != key:
            self._scorer, self._scorer_key = make_scorer(spec), key
        return self._scorer


def driver_fingerprint(model_path: str) -> str:
    """The tokenizer fingerprint of `model_path` as this process computes it: an engine in another
    Python environment (other transformers and tokenizers versions) stamps its samples with it, so
    records stay comparable across engines."""
    from align.engine.models import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(model_path))


class GeneratorPool:
    """A group of `Generator` Ray actors (one model copy each) sampling prompt batches in parallel.
    A generator that dies is replaced and its batch drawn again with the same seed."""

    def __init__(
        self,
        model_path: str,
        num_actors: int = 1,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float = 0,
        device: str = "auto",
        dtype: str = "auto",
        max_retries: int = 3,
        cache: str = "auto",
        compile: bool = False,
        aligned_path: str | None = None,
        restartable: bool = False,
        engine: str = "torch",
        engine_python: str | None = None,
    ):
        """aligned_path: an aligned model beside model_path (the reference), for DeRa sampling.
        restartable: Ray restarts a dead actor in place under the same handle (handles given to other
        processes stay valid), and never replays a call that was lost with it: an on-policy trainer
        pushes its weights again first (`sample(weights_version=...)` refuses stale ones).
        engine: torch (`Generator`) or vllm (`actors.vllm_generator.VllmGenerator`, run by the Python
        `engine_python` of vLLM's environment through Ray's runtime_env); align/engine/engines.py."""
        from actors.cluster import reserved_device, ship_dir
        from actors.resilient import ResilientActors

        threads = max(1, int(num_cpus_per_actor))
        aligned = ship_dir(aligned_path) if aligned_path else None
        # A local model directory travels through the object store: actors on any node can load it.
        device = reserved_device(device, num_gpus_per_actor)
        options = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor,
                   **({"max_restarts": -1, "max_task_retries": 0} if restartable else {})}
        if engine == "vllm":
            from actors.vllm_generator import VllmGenerator, vllm_actor_options

            if aligned is not None:
                raise ValueError("engine vllm: DeRa (aligned_path) needs the torch engine")
            options.update(vllm_actor_options(engine_python, threads, device))
            cls, args = VllmGenerator, (ship_dir(model_path), device, dtype, threads, driver_fingerprint(model_path))
        else:
            cls, args = Generator, (ship_dir(model_path), device, dtype, threads, cache, compile, aligned)
        self.engine = engine
        self.group = ResilientActors(cls, num_actors, args, options=options, max_retries=max_retries, name=cls.__name__)

    @property
    def actors(self) -> list:
        return self.group.actors

    def submit(self, prompts: list[str], n: int, max_new_tokens: int, batch_index: int, seed: int = 0, **sampling):
        """Start sampling one batch (seeded by (seed, batch_index)); `self.group.get(call)` returns it."""
        return self.group.call("sample", prompts, n, max_new_tokens, seed=batch_seed(seed, batch_index),
                               tags={"batch": batch_index}, **sampling)

    def sample(self, prompts: list[str], n: int, max_new_tokens: int, batch_size: int = 16, seed: int = 0,
               progress: bool = True, **sampling):
        """Yield each batch's result dict in prompt order; at most two batches per actor in flight."""
        from tqdm.auto import tqdm

        batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        window = 2 * len(self.actors)
        calls = [self.submit(b, n, max_new_tokens, i, seed, **sampling) for i, b in enumerate(batches[:window])]
        with tqdm(total=len(prompts), desc=f"sampling n={n}", unit="prompt", disable=not progress) as bar:
            for i in range(len(batches)):
                result = self.group.get(calls[i])
                if i + window < len(batches):
                    calls.append(self.submit(batches[i + window], n, max_new_tokens, i + window, seed, **sampling))
                bar.update(len(result["samples"]))
                yield result

    def shutdown(self) -> None:
        self.group.shutdown()
