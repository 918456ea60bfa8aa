"""The Sweetspot Serve application: best-of-n and DeRa over HTTP, with the code the batch jobs run.

    GeneratorDeployment   a Generator (pi_0, and an aligned model for DeRa); concurrent requests
                          are batched into one sampler call (serve/batching.py: continuous batching,
                          the requests that arrive during a call go together in the next), run in a thread
    ScorerDeployment      a scorer from actors.scorer.make_scorer; batched the same way (or, with
                          colocate_scorer, none: the generator replica scores its own samples)
    Api                   the FastAPI ingress: GET / (the playground), GET /healthz, GET /v1/info,
                          POST /v1/bon, POST /v1/dera, and OpenAI's surface: GET /v1/models,
                          GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions

The ingress holds DeploymentHandles to the other two, so generation and scoring scale separately
(replicas and autoscaling per deployment in configs/serve.yaml). Requests are validated by pydantic
and by the configured limits: bad input is a 4xx naming the field, never a 5xx. A deployment whose
queue is full (max_queued_requests), or a replica that dies while holding the request, makes the
request a 503 with a Retry-After header; Serve replaces the dead replica.

Bounded waits (configs/serve.yaml `admission`, serve/admission.py): a valid sampling request
(/v1/bon, /v1/dera, /v1/completions) is admitted by its ingress replica only while the time it is
expected to wait, (requests in flight + 1) / the measured completion rate, is at most
admission.max_wait_s, and never more than admission.max_in_flight at once; otherwise it is a 503 at once, with Retry-After the expected wait and a body
naming the reason ("overloaded: expected wait X s > admission.max_wait_s Y s"). Serve's own
max_queued_requests stay behind it as the backstop. GET /v1/stats shows the admission state.

One request cannot fail the requests batched with it. Its problems are found before it joins a
batch: strict request models (no number from a bool or a string, finite numbers in the ranges below,
bounded lists), valid Unicode text, the limits, the model's context (GeneratorDeployment.sample), and
serve.batching.check_call on the generator itself. A batched call that still fails is run again one
request at a time (serve.batching), so only the request that causes the error gets it.

    temperature    0, or 0.01 .. 2    (0 is greedy decoding, with n = 1 and best_of = 1; 2 is OpenAI's
                                       ceiling; the 0.01 floor keeps logits / T finite)
    top_p          (0, 1]             (/v1/completions: nucleus sampling; 1 samples the whole distribution)
    logprobs       0 .. 5             (/v1/completions: OpenAI's legacy maximum of alternatives per token)
    seed           0 .. 2**63 - 1     (a non-negative int64: numpy's SeedSequence refuses negatives)
    lambda         0 .. 100           (DeRa; dera_lambda too: the float32 mix stays finite)
    beta, coef     0 .. 10000         (RBoN-KL's weight on log pi_0; the penalty's weight)
    stop           at most 4 strings of at most 64 characters (OpenAI allows 4)
    body           at most limits.max_body_bytes, UTF-8 JSON, all of it within limits.body_timeout_s

/v1/completions, as OpenAI's legacy completions and what the official client sends:

    best_of, n     best_of samples per prompt, the n best by the server's reward come back, best first
    stop           applied on the generator before scoring (serve.batching.finish_call): every sample
                   is cut at its first stop sequence, and its reward, its rank, its log-probs and
                   usage.completion_tokens are those of the text the client gets
    temperature 0  greedy: the argmax token at every step (log-probs 0: the distribution drawn from
                   is the point mass)
    top_p          nucleus sampling; the log-probs reported are those of the distribution actually
                   drawn from, the nucleus renormalised (align.math.draw.nucleus)
    logprobs       {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for the returned tokens:
                   token_logprobs sum to the sample's log-prob under the sampling process, top_logprobs
                   holds the logprobs likeliest tokens of each step's distribution and the drawn one
                   (null for logprobs 0); tokens are slices of the returned text (a token a stop
                   sequence cuts through keeps its part; end-of-sequence is "")
    echo           the prompt before the completion; with logprobs its tokens come first, with the
                   model's own log-probs (temperature 1, no nucleus; null for the first token)
    stream         text/event-stream: `data: {chunk}` per token of each chosen completion (its
                   text and, with logprobs, its log-probs), then one with its finish_reason (and
                   reward), `data: {usage}` with stream_options.include_usage, and `data: [DONE]`.
                   Ranking needs every sample first, so the chunks are sent after ranking: streaming
                   changes how the answer arrives, not when sampling ends; the chunks add up to
                   the answer without stream

/v1/chat/completions, OpenAI's chat completions, with the same limits, options and rules as
/v1/completions (best_of and dera_lambda in extra_body; logprobs true with top_logprobs 0 .. 5 in
OpenAI's chat form; stream as chat.completion.chunk deltas): the messages go through the served
model's chat template (align.engine.chat; a model without one answers 422 naming `messages`), every
answer stops at an end-of-turn id, and each choice carries its reward. max_tokens (or
max_completion_tokens) defaults to min(limits.max_tokens, 256).

    serve run configs/serve.yaml        # a Ray Serve config file
    python -m serve                     # the default task on 127.0.0.1:8000
"""
# No `from __future__ import annotations`: FastAPI reads the request models from the handlers'
# annotations inside the Serve replica, where string annotations do not resolve.
import asyncio
import collections
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from align.engine.engines import DEFAULT_VLLM_PYTHON
from serve.admission import Admission, Refused
from serve.batching import (LAMBDA_MAX, LOGPROBS_MAX, SEED_MAX, STOP_MAX, STOP_MAX_CHARS, TEMPERATURE_MAX, TEMPERATURE_MIN,
                            BatchedScorer, ContinuousBatcher, InvalidCall, text_error)

PLAYGROUND = Path(__file__).with_name("playground.html")
log = logging.getLogger("sweetspot.serve")
WEIGHT_MAX = 1e4  # beta and coef: finite (inf broke the selection); larger weights only rank by log pi_0 (beta) or the uncertainty (coef) alone


class Limits(BaseModel):
    """What one request may ask for (configs/serve.yaml `limits`)."""

    model_config = ConfigDict(extra="forbid")
    max_n: int = Field(64, ge=1)
    max_prompts: int = Field(16, ge=1)
    max_tokens: int = Field(64, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1)
    body_timeout_s: float = Field(5.0, gt=0, description="a request body must arrive within this; else 408")


class Batching(BaseModel):
    """How the generator and scorer deployments batch concurrent requests (configs/serve.yaml `batching`)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, description="prompts per sampler (and scorer) call; a request's prompts stay together")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long an idle replica waits for more requests "
                                                               "before it starts (those arriving while it works join the next call anyway)")


class AdmissionControl(BaseModel):
    """Bounded waits (configs/serve.yaml `admission`; serve/admission.py): each ingress replica admits
    a sampling request only while its expected wait stays within max_wait_s, and answers the rest
    503 at once."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false: admit everything (only the deployments' queues refuse)")
    max_wait_s: float = Field(10.0, gt=0, allow_inf_nan=False,
                              description="the bound on an accepted request's expected time in the replica")
    max_in_flight: int = Field(48, ge=1, description="never more requests in flight in one replica, whatever the estimate: "
                                                     "about what the generator replicas take (max_ongoing_requests) plus a batch; "
                                                     "more wait in Serve's handle queue, which slows the batching")
    min_in_flight: int = Field(32, ge=1, description="requests admitted at once before a completion rate is measured")
    min_completions: int = Field(16, ge=1, description="recent completions needed for the rate (else min_in_flight holds)")
    window_s: float = Field(30.0, gt=0, allow_inf_nan=False, description="the busy seconds the rate is measured over")

    @model_validator(mode="after")
    def _floor_under_cap(self):
        if self.min_in_flight > self.max_in_flight:
            raise ValueError(f"min_in_flight: expected at most max_in_flight ({self.max_in_flight}), got {self.min_in_flight}")
        return self


# Request models are strict: a number is a JSON number (not a bool, not a string; a float field takes
# an integer), finite, and in its range; lists are bounded (prompts by limits.max_prompts, in Api.check).
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def greedy_or_floor(t: float) -> float:
    if 0 < t < TEMPERATURE_MIN:
        raise ValueError(f"expected 0 (greedy) or {TEMPERATURE_MIN:g} <= temperature <= {TEMPERATURE_MAX:g}")
    return t


Temperature = Annotated[float, Field(ge=0, le=TEMPERATURE_MAX, description="0 (greedy, n = 1) or 0.01 to 2"),
                        AfterValidator(greedy_or_floor)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="0 <= seed <= 2**63 - 1")]
Lambda = Annotated[float, Field(ge=0, le=LAMBDA_MAX)]
Weight = Annotated[float, Field(ge=0, le=WEIGHT_MAX)]
StopText = Annotated[str, Field(max_length=STOP_MAX_CHARS)]


class Access(BaseModel):
    """Who may call the endpoints (configs/serve.yaml `access`). The key itself never enters a config,
    a log or a replica's arguments: it is read where the app is built and only its SHA-256 travels."""

    model_config = ConfigDict(extra="forbid")
    api_key_env: str | None = Field(None, description="an environment variable holding the API key: every route "
                                                      "but / and /healthz then needs `Authorization: Bearer <key>`")
    api_key_file: str | None = Field(None, description="or a file whose first line is the key")
    allowed_hosts: list[str] | None = Field(None, description="the Host header values accepted (the port aside), "
                                                              "against DNS rebinding; null: any")

    def key_digest(self) -> str | None:
        """The SHA-256 (hex) of the configured key, or None; a ConfigError naming the field when it is
        configured but missing or empty."""
        import hashlib
        import os

        from align.runtime.config import ConfigError

        if self.api_key_env and self.api_key_file:
            raise ConfigError("access.api_key_file", "null when access.api_key_env is set (one source of the key)")
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key.strip():
                raise ConfigError("access.api_key_env", f"the name of a set, non-empty environment variable "
                                                        f"(${self.api_key_env} is {'empty' if self.api_key_env in os.environ else 'not set'})")
        elif self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            if not path.is_file():
                raise ConfigError("access.api_key_file", "a file holding the key", self.api_key_file)
            key = (path.read_text().splitlines() or [""])[0]
            if not key.strip():
                raise ConfigError("access.api_key_file", "a file whose first line is the key (it is empty)", self.api_key_file)
        else:
            return None
        return hashlib.sha256(key.strip().encode()).hexdigest()


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


class SamplingRequest(BaseModel):
    model_config = ConfigDict(**STRICT, populate_by_name=True)
    prompt: str | list[str] = Field(description="one prompt or a list of prompts")
    n: int = Field(8, ge=1, description="samples per prompt")
    temperature: Temperature = 1.0
    max_tokens: int = Field(24, ge=1)
    min_tokens: int = Field(0, ge=0, description="end-of-sequence is blocked before this many tokens")
    seed: Seed = 0
    return_all: bool = Field(False, description="return every sample with its reward, not only the chosen one")


class BonRequest(SamplingRequest):
    selection: Literal["argmax", "rbon_kl"] = "argmax"
    beta: Weight = Field(0.0, description="RBoN-KL's weight on log pi_0(y|x)")
    penalty: Literal["none", "ensemble", "laplace"] = "none"
    ensemble_mode: Literal["mean", "worst", "uncertainty_weighted"] = "mean"
    coef: Weight = Field(0.0, description="uncertainty weight (ensemble) or k in mu - k sigma (laplace)")


class DeraRequest(SamplingRequest):
    lam: Lambda = Field(1.0, alias="lambda", description="lam * aligned + (1 - lam) * reference logits")
    n: int = Field(1, ge=1, description="samples per prompt; with a scorer, the best of n DeRa samples is chosen")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = Field(False, description="a last chunk with the usage (and no choices) before [DONE]")


class CompletionRequest(BaseModel):
    """The OpenAI completions request (the fields Sweetspot honours; others are refused by name), plus
    `dera_lambda`. `best_of` samples are drawn per prompt and the `n` best by the server's reward are
    returned, as OpenAI defines best_of."""

    model_config = STRICT
    model: str
    prompt: str | list[str]
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; log-probs are the renormalised nucleus'")
    max_tokens: int = Field(16, ge=1)
    stop: StopText | Annotated[list[StopText], Field(max_length=STOP_MAX)] | None = None
    seed: Seed | None = None
    logprobs: int | None = Field(None, ge=0, le=LOGPROBS_MAX, description="per token: its log-prob and this many alternatives")
    echo: bool = Field(False, description="the prompt before the completion (and its tokens first in logprobs)")
    stream: bool = Field(False, description="server-sent events, sent once the best_of samples are ranked")
    stream_options: StreamOptions | None = None
    dera_lambda: Lambda | None = None
    user: str | None = None  # accepted and ignored, as OpenAI clients may send it


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation: OpenAI's role and content (text, or a list of text parts)."""

    model_config = ConfigDict(**STRICT)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None  # accepted and ignored

    def as_message(self) -> dict:
        """{role, content} as align.engine.chat takes it (OpenAI's developer role is the system role)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat completions request (the fields Sweetspot honours; others are refused by name),
    plus `best_of` and `dera_lambda`, which OpenAI clients send in extra_body. The messages go
    through the served model's chat template; `best_of` answers are drawn and the `n` best by the
    server's reward come back."""

    model_config = STRICT
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens; either works")
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: StopText | Annotated[list[StopText], Field(max_length=STOP_MAX)] | None = None
    seed: Seed | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=LOGPROBS_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    dera_lambda: Lambda | None = None
    user: str | None = None  # accepted and ignored


class GeneratorDeployment:
    """One Generator per replica (actors/generator.py). Requests that arrive together are sampled in
    one call (serve/batching.py: ContinuousBatcher decides what runs together, sample_together groups
    it into sampler calls), in a thread so the replica's event loop keeps answering; each request's
    samples are what it would draw alone."""

    def __init__(self, model: str, aligned: str | None = None, device: str = "auto", num_threads: int | None = None,
                 batching: dict | None = None, reward: dict | None = None, engine: str = "torch",
                 engine_python: str | None = None):
        """reward: a scorer spec to score in this replica too (`colocate_scorer`), or None. engine: torch
        (the model in this replica) or vllm (a vLLM engine actor in vLLM's environment, `engine_python`,
        which this replica drives: actors/vllm_generator.py VllmEngineClient)."""
        from actors.cluster import reserved_device
        from align.engine.models import resolve_model_path

        if engine == "vllm":
            from actors.vllm_generator import VllmEngineClient

            # The engine actor reserves its own GPU ("auto": one if the cluster has one free).
            self.generator = VllmEngineClient(resolve_model_path(model), device=device, num_threads=num_threads,
                                              engine_python=engine_python)
        else:
            from actors.generator import Generator

            device = reserved_device(device)  # "auto": a GPU only where this replica reserved one (ray_actor_options)
            self.generator = Generator(resolve_model_path(model), device=device, num_threads=num_threads,
                                       aligned_path=resolve_model_path(aligned) if aligned else None)
        self.has_aligned = aligned is not None
        b = Batching(**(batching or {}))
        self.batcher = ContinuousBatcher(self.sample_calls, b.max_batch_size, size=lambda call: len(call.prompts),
                                         wait_s=b.batch_wait_timeout_s)
        self.score = BatchedScorer(reward, b.max_batch_size, b.batch_wait_timeout_s) if reward else None
        self.counts = collections.Counter()  # requests, sampler_calls, retried_alone

    def stats(self) -> dict:
        """Requests answered and sampler calls made by this replica (their ratio is the batching), and
        the requests run again alone because their batch's sampler call failed."""
        return {"requests": self.counts["requests"], "sampler_calls": self.counts["sampler_calls"],
                "retried_alone": self.counts["retried_alone"]}

    async def sample_calls(self, calls: list) -> list:
        from serve.batching import sample_together

        results = await asyncio.to_thread(sample_together, self.generator, calls, self.counts)
        self.counts["requests"] += len(calls)
        return results

    async def sample(self, call) -> dict:
        """One request's samples (a serve.batching.SampleCall), batched with whatever arrives with it.
        A call the sampler cannot take (serve.batching.check_call) or a prompt too long for the model
        fails here, alone, before it joins a batch."""
        from serve.batching import check_call

        check_call(call)
        self.generator.check_context(list(call.prompts), call.max_tokens)
        return await self.batcher(call)

    async def sample_colocated(self, call) -> dict:
        """One request's samples, scored in this replica (the app was built with colocate_scorer)."""
        result = await self.sample(call)
        return {**result, "samples": await self.score(result["samples"])}


class ScorerDeployment:
    """A scorer per replica; the samples of requests that arrive together are scored in one call."""

    def __init__(self, spec: dict, batching: dict | None = None):
        b = Batching(**(batching or {}))
        self.score = BatchedScorer(spec, b.max_batch_size, b.batch_wait_timeout_s)

    async def score_samples(self, samples):
        return await self.score(samples)


# Defined before the ingress class: serve.ingress captures the class and what it refers to when the
# class is defined.
def openai_logprobs(parts: list[dict], k: int) -> dict:
    """OpenAI's legacy `logprobs` of a choice from its parts' token details (serve.batching.finish_call:
    the echoed prompt's, then the completion's): token texts, their log-probs, the top k of each
    step (null for k = 0) and where each token starts in the choice's text."""
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for part in parts:
        for j, text in enumerate(part["text"]):
            tokens.append(text)
            lps.append(part["logprobs"][j])
            tops.append(None if part["top"] is None else part["top"][j])
            offsets.append(at)
            at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops if k else None, "text_offset": offsets}


def chat_logprobs(parts: list[dict], k: int) -> dict:
    """OpenAI's chat `logprobs` of a choice: per returned token its text, log-prob, UTF-8 bytes and the
    k likeliest tokens of the distribution it was drawn from (the same details as openai_logprobs)."""
    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    legacy = openai_logprobs(parts, k)
    content = []
    for j, text in enumerate(legacy["tokens"]):
        top = legacy["top_logprobs"][j] if legacy["top_logprobs"] else None
        content.append({**entry(text, legacy["token_logprobs"][j]),
                        "top_logprobs": [entry(t, v) for t, v in list((top or {}).items())[:k]]})
    return {"content": content, "refusal": None}


def sse(content) -> bytes:
    """One server-sent event: `data: <JSON>` (or the literal, for [DONE])."""
    import json

    return b"data: " + (content if isinstance(content, bytes) else json.dumps(content).encode()) + b"\n\n"


def fast_json(content: dict):
    """`content` as a JSON response, as it is: plain JSON types already, so FastAPI's per-value
    encoding and response validation (milliseconds for a return_all answer) are skipped."""
    from fastapi.responses import JSONResponse

    return JSONResponse(content)


app = FastAPI(title="Sweetspot", description="Best-of-n and decoding-time realignment (DeRa) endpoints")


def error_body(message: str, param: str | None) -> dict:
    """FastAPI's `detail` and OpenAI's `error` object in one body, so plain HTTP clients and the
    official `openai` client both show the message and the field. Text that cannot be encoded (a
    lone surrogate from the request, e.g. in an unknown field's name) is escaped, not a 500."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"detail": message, "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


class BodyGuard:
    """ASGI middleware for POST bodies, before FastAPI parses them: 413 for a body larger than
    limits.max_body_bytes (by its Content-Length before it is read, else counted as it streams in),
    408 for a body that has not all arrived within limits.body_timeout_s (a client that promises more
    bytes than it sends gets an answer instead of holding the connection). The body read is then
    handed on to the app as it came."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app"), "state", None)
        limit = getattr(state, "max_body_bytes", None)
        if scope["type"] != "http" or scope["method"] != "POST" or limit is None:
            return await self.app(scope, receive, send)
        timeout = getattr(state, "body_timeout_s", None)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > limit:
            return await self.refuse(send, 413, f"body: expected at most {limit} bytes, got {int(declared)}")
        chunks, size = [], 0

        async def read() -> bool:  # False: the client went away
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return False
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit or not message.get("more_body", False):
                    return True

        try:
            if not await asyncio.wait_for(read(), timeout):
                return None
        except asyncio.TimeoutError:
            promised = f" of the {declared} promised by Content-Length" if declared.isdigit() else ""
            return await self.refuse(send, 408, f"body: {size} bytes{promised} arrived within {timeout:g} s; "
                                                "send the whole body at once", close=True)
        if size > limit:
            return await self.refuse(send, 413, f"body: expected at most {limit} bytes, got more")
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # the disconnect, for whoever listens for it

        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(send, status: int, message: str, close: bool = False, param: str = "body",
                     extra: list | None = None) -> None:
        import json

        content = json.dumps(error_body(message, param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()), *(extra or [])]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


app.add_middleware(BodyGuard)


class Door:
    """ASGI middleware in front of everything (before a body is read): a Host header outside
    access.allowed_hosts is a 400 naming Host (a DNS-rebinding page cannot reach a loopback server),
    and, when an API key is configured, a request without `Authorization: Bearer <key>` is a 401
    naming Authorization. GET / (the playground page) and /healthz hold no data and stay open, for a
    browser to load the page and for a load balancer's health probe."""

    OPEN_PATHS = ("/", "/healthz")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        state = getattr(scope.get("app"), "state", None)
        path, root = scope.get("path", ""), scope.get("root_path", "")  # under a route prefix the path holds it
        if scope["type"] != "http" or state is None or (path[len(root):] if path.startswith(root) else path) in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        allowed = getattr(state, "allowed_hosts", None)
        if allowed is not None:
            host = host_name(headers.get(b"host", b"").decode("latin-1")).lower()
            if host not in allowed:
                return await BodyGuard.refuse(send, 400, f"Host: expected one of {', '.join(allowed)} "
                                                         f"(access.allowed_hosts), got {host!r}", param="Host")
        digest = getattr(state, "key_digest", None)
        if digest is not None:
            import hashlib
            import hmac

            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            given = hashlib.sha256(key.strip().encode("utf-8", "replace")).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, digest):
                return await BodyGuard.refuse(send, 401, "Authorization: expected `Bearer <the server's API key>`",
                                              param="Authorization", extra=[(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The host of a Host header, without its port ("[::1]:8000" -> "::1", "a.b:80" -> "a.b")."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


app.add_middleware(Door)  # added last: the outermost, so a refused request is not even read


@app.exception_handler(StarletteHTTPException)  # FastAPI's own 400s (a body it cannot parse) too
async def http_error(request, exc: StarletteHTTPException):
    """The error body naming the field the message starts with. FastAPI's 400 for a body it cannot
    decode (not UTF-8) or parse (nested deeper than the JSON parser goes) is a 422 naming `body`."""
    from fastapi.responses import JSONResponse

    message, status = str(exc.detail), exc.status_code
    cause = exc.__cause__
    if status == 400 and cause is not None:
        status = 422
        if isinstance(cause, UnicodeError):
            message = f"body: expected JSON in UTF-8 ({cause})"
        elif isinstance(cause, RecursionError):
            message = "body: JSON nested deeper than the parser takes"
        else:
            message = f"body: could not be parsed ({type(cause).__name__})"
    return JSONResponse(error_body(message, message.split(":")[0] if ":" in message else None),
                        status_code=status, headers=getattr(exc, "headers", None))


def union_tag(x) -> bool:
    """Whether a location element is the tag pydantic gives a union's branch ("str", "list[str]",
    "constrained-str"), not a field name or an index."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x or "-" in x)


def field_errors(errors: list[dict]) -> list[tuple[str, str]]:
    """(field, message) per field from pydantic's errors, the field being the location without
    "body" and union branch tags. Of a union field's branches, those its value got past the type
    check of speak for it (1000 stop strings: "at most 4 items", not also "not a string")."""
    entries = []  # (the union's location or None, field, error type, message)
    for e in errors:
        if e["type"] == "json_invalid":
            entries.append((None, "body", e["type"], f"invalid JSON ({(e.get('ctx') or {}).get('error', e['msg'])})"))
            continue
        loc = [x for x in e["loc"] if x != "body"]
        tag = next((i for i, x in enumerate(loc) if union_tag(x)), None)
        entries.append((None if tag is None else tuple(loc[:tag]), ".".join(str(x) for x in loc if not union_tag(x)) or "body",
                        e["type"], e["msg"]))
    past_type_check = {union for union, _, kind, _ in entries if union is not None and not kind.endswith("_type")}
    fields: dict[str, list[str]] = {}
    for union, field, kind, msg in entries:
        if not (union in past_type_check and kind.endswith("_type")):
            fields.setdefault(field, []).append(msg)
    return [(field, " or ".join(dict.fromkeys(msgs))) for field, msgs in fields.items()]


@app.exception_handler(RequestValidationError)
async def validation_error(request, exc: RequestValidationError):
    """422 naming each bad field (its location in the body) and what was wrong with it."""
    from fastapi.responses import JSONResponse

    parts = field_errors(exc.errors())
    message = "; ".join(f"{field}: {msg}" for field, msg in parts)
    return JSONResponse(error_body(message, parts[0][0] if parts else None), status_code=422)


@serve.ingress(app)
class Api:
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle | None, limits: dict | None = None,
                 has_aligned: bool = False, reward_kind: str = "vader", model_name: str = "sweetspot",
                 retry_after_s: float = 1.0, allowed_hosts: list[str] | None = None, key_digest: str | None = None,
                 admission: dict | None = None):
        self.generator, self.scorer = generator, scorer
        control = AdmissionControl(**(admission or {}))
        self.admission = Admission(**control.model_dump(exclude={"enabled"})) if control.enabled else None
        self.limits, self.has_aligned, self.reward_kind = Limits(**(limits or {})), has_aligned, reward_kind
        self.model_name, self.retry_after_s = model_name, retry_after_s
        self.created = int(time.time())  # the model's `created` in /v1/models: when this server started
        app.state.max_body_bytes = self.limits.max_body_bytes  # read by BodyGuard, in this replica
        app.state.body_timeout_s = self.limits.body_timeout_s
        app.state.allowed_hosts, app.state.key_digest = allowed_hosts, key_digest  # read by Door

    def check(self, req: SamplingRequest) -> list[str]:
        """The request's prompts, or a 422 naming the field and the allowed range."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        lim = self.limits
        bad_text = next((f"{e} in prompt[{i}]" for i, p in enumerate(prompts) if (e := text_error(p))), None)
        for ok, field, allowed in (
            (1 <= len(prompts) <= lim.max_prompts, "prompt", f"1 to {lim.max_prompts} prompts"),
            (all(p.strip() for p in prompts), "prompt", "non-empty text"),
            (all(len(p) <= lim.max_prompt_chars for p in prompts), "prompt", f"at most {lim.max_prompt_chars} characters"),
            (bad_text is None, "prompt", f"valid Unicode text, got {bad_text}"),
            (req.n <= lim.max_n, "n", f"1 <= n <= {lim.max_n}"),
            (req.max_tokens <= lim.max_tokens, "max_tokens", f"1 <= max_tokens <= {lim.max_tokens}"),
            (req.min_tokens <= req.max_tokens, "min_tokens", "0 <= min_tokens <= max_tokens"),
            (req.temperature != 0 or req.n == 1, "n", f"n = 1 with temperature 0 (greedy decoding has one answer), got {req.n}"),
        ):
            if not ok:
                raise HTTPException(422, detail=f"{field}: expected {allowed}")
        return prompts

    def check_dera(self, field: str) -> None:
        """A 422 naming `field` when this server cannot answer DeRa requests."""
        if not self.has_aligned:
            raise HTTPException(422, detail=f"{field}: this server has no aligned model (start it with `aligned`)")
        from align.rewards.registry import reward_kind

        if reward_kind(self.reward_kind).scores_within_prompt:  # e.g. combined: its LSC reference is a quantile over pi_0's samples
            raise HTTPException(422, detail=f"{field}: the {self.reward_kind} reward ranks pi_0 samples against each "
                                            "other; DeRa samples need another reward kind")

    async def scored_samples(self, prompts: list[str], req: SamplingRequest, lam: float | None = None, **options) -> dict:
        """Sample on the generator deployment, score on the scorer deployment: the generator's result
        (serve.batching.sample_together: finish reasons, token details) with its samples scored.
        `options`: SampleCall's top_p, stop, logprobs, echo. A request the admission control does not
        admit (its expected wait is over admission.max_wait_s) is a 503 at once, with Retry-After its
        expected wait; an admitted one is counted out however it ends. A full queue on either
        deployment, or a replica that died while it held the request (Serve starts a new one), is a
        503 with Retry-After: the request can be sent again as it was."""
        import contextlib

        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        from actors.generator import PromptError

        from serve.batching import SampleCall

        call = SampleCall(tuple(prompts), req.n, req.max_tokens, req.temperature, req.min_tokens, req.seed, lam, **options)
        retry = {"Retry-After": str(math.ceil(self.retry_after_s))}
        try:
            admitted = self.admission.admit() if self.admission is not None else contextlib.nullcontext()
        except Refused as e:
            after = math.ceil(max(self.retry_after_s, e.expected_wait_s or 0))
            raise HTTPException(503, detail=f"{e}. Retry after {after} s", headers={"Retry-After": str(after)}) from None
        with admitted:
            try:
                if self.scorer is None:  # colocate_scorer: the generator replica scores too
                    return await self.generator.sample_colocated.remote(call)
                # Awaited here, not handed on to the scorer as a response: a generator replica that dies
                # must reach this handler as its own error (a 503), not as the scorer's failed argument.
                result = await self.generator.sample.remote(call)
                return {**result, "samples": await self.scorer.score_samples.remote(result["samples"])}
            except BackPressureError as e:
                raise HTTPException(503, detail=f"overloaded: {e} Retry after {self.retry_after_s:g} s", headers=retry) from None
            except (PromptError, InvalidCall) as e:  # Ray wraps it (with the replica's traceback); its cause is the message
                raise HTTPException(422, detail=str(getattr(e, "cause", None) or e)) from None
            except RayActorError as e:  # ActorDiedError, ActorUnavailableError
                log.warning("a replica failed while holding a request: %s", type(e).__name__)
                raise HTTPException(503, detail=f"unavailable: a replica failed while holding this request "
                                                f"({type(e).__name__}); retry after {self.retry_after_s:g} s",
                                    headers=retry) from None

    @app.get("/", include_in_schema=False)
    async def playground(self):
        """A page to try the endpoints: a prompt, n, the ranking and a DeRa lambda; samples ranked."""
        from fastapi.responses import HTMLResponse

        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info(self) -> dict:
        """What this server offers: its model name, reward kind, whether DeRa is on, and the limits."""
        return {"model": self.model_name, "reward": self.reward_kind, "dera": self.has_aligned,
                "limits": self.limits.model_dump()}

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        """One generator replica's counts of requests and sampler calls (how much batching happens),
        and this ingress replica's admission state (serve.admission.Admission.state)."""
        return {"generator": await self.generator.stats.remote(),
                "admission": self.admission.state() if self.admission is not None else {"enabled": False}}

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        """OpenAI's model list: the one model this server serves, by the name requests must give."""
        return {"object": "list", "data": [self.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str) -> dict:
        """OpenAI's model object for this server's model; 404 naming `model` for any other id."""
        if model_id != self.model_name:
            raise HTTPException(404, detail=f"model: this server serves {self.model_name!r}, got {model_id!r}")
        return self.model_card()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sweetspot"}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        """OpenAI-compatible completions; best_of is best-of-n ranked by the server's reward scorer.
        Stop sequences cut the samples before they are scored; stream sends the ranked answer as
        server-sent events (the module docstring)."""
        import secrets
        import uuid

        if req.model != self.model_name:
            raise HTTPException(404, detail=f"model: this server serves {self.model_name!r}, got {req.model!r}")
        best_of = req.best_of or req.n
        if req.n > best_of:
            raise HTTPException(422, detail=f"n: expected n <= best_of ({best_of}), got {req.n}")
        if req.best_of is not None and req.best_of > self.limits.max_n:
            raise HTTPException(422, detail=f"best_of: expected n <= best_of <= {self.limits.max_n}, got {req.best_of}")
        if req.temperature == 0 and best_of > 1:  # greedy decoding has one answer: nothing to rank
            field, value = ("n", req.n) if req.n > 1 else ("best_of", req.best_of)
            raise HTTPException(422, detail=f"{field}: expected 1 with temperature 0 (greedy decoding has one answer), got {value}")
        if req.stream_options is not None and not req.stream:
            raise HTTPException(422, detail="stream_options: expected only with stream: true")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if bad := next((f"{e} in stop[{i}]" for i, t in enumerate(stops) if (e := text_error(t))), None):
            raise HTTPException(422, detail=f"stop: expected valid Unicode text, got {bad}")
        if req.dera_lambda is not None:
            self.check_dera("dera_lambda")
        # no seed: a fresh one per request, as OpenAI-compatible servers sample
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        sampling = SamplingRequest(prompt=req.prompt, n=best_of, temperature=req.temperature, max_tokens=req.max_tokens,
                                   seed=seed)
        prompts = self.check(sampling)
        # a stream is sent token by token: it needs the tokens' texts (logprobs 0) even without logprobs
        logprobs = req.logprobs if req.logprobs is not None else (0 if req.stream else None)
        result = await self.scored_samples(prompts, sampling, req.dera_lambda, top_p=req.top_p, stop=tuple(stops),
                                           logprobs=logprobs, echo=req.echo and logprobs is not None)
        choices, parts, completion_tokens = [], [], 0
        for p, s in enumerate(result["samples"]):
            completion_tokens += sum(len(ids) for ids in s.completion_ids)  # every best_of sample, as cut
            best = sorted(range(len(s.completions)), key=lambda i: -s.rewards[i])[: req.n]  # stable: ties keep order
            for i in best:
                part = [] if logprobs is None else [result["tokens"][p][i]]
                if req.echo:
                    part.insert(0, result["prompt"][p] if result["prompt"] else {"text": [s.prompt], "logprobs": [None], "top": None})
                parts.append(part)
                choices.append({"text": (s.prompt if req.echo else "") + s.completions[i], "index": len(choices),
                                "logprobs": None if req.logprobs is None else openai_logprobs(part, req.logprobs),
                                "finish_reason": result["finish"][p][i], "reward": s.rewards[i]})
        prompt_tokens = sum(len(s.prompt_ids) for s in result["samples"])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        if req.stream:
            return self.stream(head, choices, parts, usage if req.stream_options and req.stream_options.include_usage else None,
                               req.logprobs)
        return fast_json({**head, "choices": choices, "usage": usage})

    @staticmethod
    def stream(head: dict, choices: list[dict], parts: list[list[dict]], usage: dict | None, k: int | None):
        """The ranked choices as server-sent events: a chunk per token of each choice (its text, and
        with logprobs its entry of the choice's logprobs), a chunk with its finish_reason and reward,
        the usage chunk when asked for, then [DONE]."""
        from fastapi.responses import StreamingResponse

        def events():
            for choice, part in zip(choices, parts):
                lp = openai_logprobs(part, k or 0)
                for j, text in enumerate(lp["tokens"]):
                    one = None if k is None else {"tokens": [text], "token_logprobs": [lp["token_logprobs"][j]],
                                                  "top_logprobs": None if lp["top_logprobs"] is None else [lp["top_logprobs"][j]],
                                                  "text_offset": [lp["text_offset"][j]]}
                    yield sse({**head, "choices": [{"text": text, "index": choice["index"], "logprobs": one, "finish_reason": None}]})
                yield sse({**head, "choices": [{"text": "", "index": choice["index"], "logprobs": None,
                                                "finish_reason": choice["finish_reason"], "reward": choice["reward"]}]})
            if usage is not None:
                yield sse({**head, "choices": [], "usage": usage})
            yield sse(b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        """OpenAI-compatible chat completions: the messages through the model's chat template, each
        answer stopped at the end of its turn; best_of (extra_body) answers ranked by the server's
        reward and the n best returned, each choice with its reward."""
        import secrets
        import uuid

        from align.engine.chat import check_prompt

        if req.model != self.model_name:
            raise HTTPException(404, detail=f"model: this server serves {self.model_name!r}, got {req.model!r}")
        best_of = req.best_of or req.n
        for ok, message in (
            (req.n <= best_of, f"n: expected n <= best_of ({best_of}), got {req.n}"),
            (best_of <= self.limits.max_n, f"{'best_of' if req.best_of else 'n'}: expected n <= best_of <= {self.limits.max_n}, "
                                           f"got {best_of}"),
            (req.temperature != 0 or best_of == 1, f"{'n' if req.n > 1 else 'best_of'}: expected 1 with temperature 0 "
                                                   "(greedy decoding has one answer)"),
            (req.stream_options is None or req.stream, "stream_options: expected only with stream: true"),
            (req.top_logprobs is None or req.logprobs, "top_logprobs: expected only with logprobs: true"),
            (req.max_tokens is None or req.max_completion_tokens is None,
             "max_completion_tokens: expected one of max_tokens and max_completion_tokens"),
        ):
            if not ok:
                raise HTTPException(422, detail=message)
        max_tokens = req.max_completion_tokens or req.max_tokens or min(self.limits.max_tokens, 256)
        if max_tokens > self.limits.max_tokens:
            field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise HTTPException(422, detail=f"{field}: expected 1 <= {field} <= {self.limits.max_tokens}, got {max_tokens}")
        conversation = [m.as_message() for m in req.messages]
        try:
            check_prompt(conversation, "messages")
        except ValueError as e:
            raise HTTPException(422, detail=str(e)) from None
        texts = [("messages", m["content"]) for m in conversation]
        if sum(len(t) for _, t in texts) > self.limits.max_prompt_chars:
            raise HTTPException(422, detail=f"messages: expected at most {self.limits.max_prompt_chars} characters in all")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        for where, text in [*((f"messages[{i}].content", t) for i, (_, t) in enumerate(texts)),
                            *((f"stop[{i}]", t) for i, t in enumerate(stops))]:
            if (why := text_error(text)) is not None:
                raise HTTPException(422, detail=f"{where.split('[')[0]}: expected valid Unicode text, got {why} in {where}")
        if req.dera_lambda is not None:
            self.check_dera("dera_lambda")
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        sampling = SamplingRequest.model_construct(prompt="", n=best_of, temperature=req.temperature, max_tokens=max_tokens,
                                                   min_tokens=0, seed=seed)
        k = req.top_logprobs or 0
        logprobs = k if req.logprobs else (0 if req.stream else None)
        result = await self.scored_samples([conversation], sampling, req.dera_lambda, top_p=req.top_p, stop=tuple(stops),
                                           logprobs=logprobs)
        (s,) = result["samples"]
        best = sorted(range(len(s.completions)), key=lambda i: -s.rewards[i])[: req.n]  # stable: ties keep order
        parts = [[result["tokens"][0][i]] if logprobs is not None else [] for i in best]
        choices = [{"index": j, "message": {"role": "assistant", "content": s.completions[i], "refusal": None},
                    "logprobs": chat_logprobs(parts[j], k) if req.logprobs else None,
                    "finish_reason": result["finish"][0][i], "reward": s.rewards[i]} for j, i in enumerate(best)]
        completion_tokens = sum(len(ids) for ids in s.completion_ids)  # every best_of answer, as cut
        usage = {"prompt_tokens": len(s.prompt_ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(s.prompt_ids) + completion_tokens}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            return self.chat_stream(head, choices, parts, usage if req.stream_options and req.stream_options.include_usage
                                    else None, k if req.logprobs else None)
        return fast_json({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    @staticmethod
    def chat_stream(head: dict, choices: list[dict], parts: list[list[dict]], usage: dict | None, k: int | None):
        """The ranked answers as chat.completion.chunk events: per choice a first chunk with the role,
        a chunk per token (its text; with logprobs its entry), a last one with finish_reason and
        reward; the usage chunk when asked for; then [DONE]."""
        from fastapi.responses import StreamingResponse

        head = {**head, "object": "chat.completion.chunk"}

        def events():
            for choice, part in zip(choices, parts):
                i = choice["index"]
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
                lp = chat_logprobs(part, k or 0)
                for entry in lp["content"]:
                    yield sse({**head, "choices": [{"index": i, "delta": {"content": entry["token"]},
                                                    "logprobs": None if k is None else {"content": [entry], "refusal": None},
                                                    "finish_reason": None}]})
                yield sse({**head, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                "finish_reason": choice["finish_reason"], "reward": choice["reward"]}]})
            if usage is not None:
                yield sse({**head, "choices": [], "usage": usage})
            yield sse(b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/bon")
    async def bon(self, req: BonRequest) -> dict:
        """Best-of-n per prompt: n samples from pi_0, scored, one chosen by the selection rule."""
        prompts = self.check(req)
        if req.penalty != "none" and req.penalty != self.reward_kind:
            raise HTTPException(422, detail=f"penalty: '{req.penalty}' needs the server's reward kind to be "
                                            f"'{req.penalty}' (it is '{self.reward_kind}')")
        return fast_json({"results": [self.answer(s, req) for s in (await self.scored_samples(prompts, req))["samples"]]})

    @app.post("/v1/dera")
    async def dera(self, req: DeraRequest) -> dict:
        """Samples at DeRa strength lambda; with n > 1 the best of them by the server's reward."""
        prompts = self.check(req)
        self.check_dera("lambda")
        scored = (await self.scored_samples(prompts, req, req.lam))["samples"]
        return fast_json({"results": [self.answer(s, req, lam=req.lam) for s in scored]})

    @staticmethod
    def answer(s, req: SamplingRequest, lam: float | None = None) -> dict:
        import torch

        from align.math.selection import prompt_ranking, select

        if isinstance(req, BonRequest):
            ranking = prompt_ranking(s.rewards, s.reward_var, s.reward_members, req.penalty, req.ensemble_mode, req.coef)
            chosen = int(select(ranking, req.selection, req.beta, torch.tensor([s.logprobs], dtype=torch.float64))[0])
        else:
            chosen = int(torch.tensor(s.rewards, dtype=torch.float64).argmax())
        out = {"prompt": s.prompt, "completion": s.completions[chosen], "reward": s.rewards[chosen], "chosen": chosen,
               "n": len(s.completions)}
        if lam is not None:
            out["lambda"] = lam
        if req.return_all:
            out["samples"] = [{"completion": c, "reward": r, "logprob": lp, "tokens": len(ids)}
                              for c, r, lp, ids in zip(s.completions, s.rewards, s.logprobs, s.completion_ids)]
        return out


class AppArgs(BaseModel):
    """The application's arguments (configs/serve.yaml `args`)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "default"
    model_name: str = "sweetspot"  # the `model` OpenAI-style requests must name
    aligned: str | None = None
    device: str = "auto"
    reward: dict = Field(default_factory=lambda: {"kind": "vader"})
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After of a 503 when a queue is full")
    generator_threads: int | None = Field(None, ge=1)
    engine: Literal["torch", "vllm"] = Field("torch", description="torch: the model in the generator replicas | vllm: "
                                             "a vLLM engine actor per replica (align/engine/engines.py)")
    engine_python: str = Field(DEFAULT_VLLM_PYTHON, description="engine vllm: the Python of vLLM's environment "
                                                                "(make vllm-env), on every node")
    colocate_scorer: bool = Field(False, description="score in the generator's replicas: one handle call less "
                                                     "per request, but generation and scoring then scale together")
    access: Access = Field(default_factory=Access)
    admission: AdmissionControl = Field(default_factory=AdmissionControl)


# Defaults small enough for a 2-core machine; a Serve config file's `deployments` override them.
DEPLOYMENT_OPTIONS = {
    "GeneratorDeployment": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 32, "max_queued_requests": 128},
    "ScorerDeployment": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 32, "max_queued_requests": 128},
    # The ingress takes many requests at once: admission answers the excess at once, while a request
    # held in the proxy's queue for it is unseen by admission and handed on slowly (docs/benchmarks.md).
    "Api": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1024, "max_queued_requests": 512,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1}},
}


def check_engine(a: AppArgs) -> str | None:
    """ConfigError naming the field when the generator's engine cannot serve these args (DeRa needs
    the torch engine) or vLLM's environment is missing; else its Python as an absolute path (the
    replicas do not start in this directory)."""
    from align.engine.engines import require_capability
    from align.runtime.config import ConfigError

    if a.engine != "vllm":
        return None
    if a.aligned is not None:
        require_capability("vllm", "dera", field="engine")
    python = Path(a.engine_python).absolute()
    if not python.is_file():
        raise ConfigError("engine_python", "the Python of an environment with vLLM (run `make vllm-env`, or give its path)",
                          a.engine_python)
    return str(python)


def bind_app(a: AppArgs, options: dict[str, dict] | None = None) -> serve.Application:
    """Generator and scorer deployments bound into the ingress; `options` replaces a deployment's
    default options (DEPLOYMENT_OPTIONS) by its name."""
    from align.rewards.registry import check_spec

    check_spec(a.reward, "reward")  # a ConfigError (a ValueError) naming reward.<field>, before any replica starts
    engine_python = check_engine(a)
    opts = {**DEPLOYMENT_OPTIONS, **(options or {})}
    batching = a.batching.model_dump()
    spec = {"device": a.device, **a.reward}
    generator = serve.deployment(GeneratorDeployment, **opts["GeneratorDeployment"]).bind(
        a.model, a.aligned, a.device, a.generator_threads, batching, spec if a.colocate_scorer else None, a.engine,
        engine_python)
    scorer = None if a.colocate_scorer else serve.deployment(ScorerDeployment, **opts["ScorerDeployment"]).bind(spec, batching)
    return serve.deployment(Api, **opts["Api"]).bind(
        generator, scorer, a.limits.model_dump(), a.aligned is not None, a.reward["kind"], a.model_name, a.retry_after_s,
        a.access.allowed_hosts, a.access.key_digest(), a.admission.model_dump())


def build_app(args: dict | None = None) -> serve.Application:
    """The application from the config file's `args` (a typed builder Serve calls)."""
    return bind_app(AppArgs(**(args or {})))
