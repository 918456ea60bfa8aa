"""Generation engines behind the generator pool, and what each can do. `torch` is the project's own
sampler (align.engine.sampling: one shared prefill, n rows decoding in one loop); `vllm` runs vLLM
(paged attention, continuous batching, CUDA graphs on a GPU) in its own Python environment
(`make vllm-env`). Both return the same sample record (align.engine.samples.PromptSamples).

A job (or the Serve app, serve/app.py `engine`) that needs what an engine cannot do asks
`require_capability` at config load, so the error names the field before any actor starts.
"""
from __future__ import annotations

ENGINES: dict[str, frozenset[str]] = {
    "torch": frozenset({"dera", "speculative_rejection", "weight_updates", "prompt_logprobs"}),
    "vllm": frozenset({"prompt_logprobs"}),  # (vLLM's prompt_logprobs: OpenAI's echo with logprobs)
}

# Why an engine without a capability cannot offer it, for the error message.
WHY = {
    "dera": "DeRa mixes two models' logits at every step of one decode loop",
    "speculative_rejection": "speculative rejection scores and prunes partial sequences in the middle of decoding",
    "weight_updates": "vBoN pushes new policy weights into the generators at every step",
    "prompt_logprobs": "the prompt's own log-probs need a forward pass over the prompt",
}

DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"  # what `make vllm-env` builds


def require_capability(engine: str, capability: str, field: str = "pool.engine") -> None:
    """A ConfigError naming `field` when `engine` cannot do `capability`."""
    from align.runtime.config import ConfigError

    if capability not in ENGINES[engine]:
        able = [name for name, caps in ENGINES.items() if capability in caps]
        raise ConfigError(field, f"{' | '.join(able)}: {WHY[capability]}, which the {engine} engine cannot", engine)
