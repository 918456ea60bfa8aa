"""The Sweetspot Serve application: best-of-n and DeRa over HTTP, with the code the batch jobs run.

    GeneratorDeployment   a Generator (pi_0, and an aligned model for DeRa); concurrent requests
                          are batched into one sampler call (serve/batching.py: continuous batching,
                          the requests that arrive during a call go together in the next), run in a thread
    ScorerDeployment      a scorer from actors.scorer.make_scorer; batched the same way (or, with
                          colocate_scorer, none: the generator replica scores its own samples)
    Api                   the FastAPI ingress: GET / (the playground), GET /healthz, GET /v1/info,
                          POST /v1/bon, POST /v1/dera, POST /v1/completions (OpenAI-compatible)

The ingress holds DeploymentHandles to the other two, so generation and scoring scale separately
(replicas and autoscaling per deployment in configs/serve.yaml). Requests are validated by pydantic
and by the configured limits: bad input is a 4xx naming the field, never a 5xx. A deployment whose
queue is full (max_queued_requests), or a replica that dies while holding the request, makes the
request a 503 with a Retry-After header; Serve replaces the dead replica.

    serve run configs/serve.yaml        # a Ray Serve config file
    python -m serve                     # the default task on 127.0.0.1:8000
"""
# No `from __future__ import annotations`: FastAPI reads the request models from the handlers'
# annotations inside the Serve replica, where string annotations do not resolve.
import asyncio
import logging
import math
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batching import BatchedScorer, ContinuousBatcher

PLAYGROUND = Path(__file__).with_name("playground.html")
log = logging.getLogger("sweetspot.serve")


class Limits(BaseModel):
    """What one request may ask for (configs/serve.yaml `limits`)."""

    model_config = ConfigDict(extra="forbid")
    max_n: int = Field(64, ge=1)
    max_prompts: int = Field(16, ge=1)
    max_tokens: int = Field(64, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1)


class Batching(BaseModel):
    """How the generator and scorer deployments batch concurrent requests (configs/serve.yaml `batching`)."""

    model_config = ConfigDict(extra="forbid")
    max_batch_size: int = Field(16, ge=1, description="prompts per sampler (and scorer) call; a request's prompts stay together")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long an idle replica waits for more requests "
                                                               "before it starts (those arriving while it works join the next call anyway)")


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prompt: str | list[str] = Field(description="one prompt or a list of prompts")
    n: int = Field(8, ge=1, description="samples per prompt")
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(24, ge=1)
    min_tokens: int = Field(0, ge=0, description="end-of-sequence is blocked before this many tokens")
    seed: int = 0
    return_all: bool = Field(False, description="return every sample with its reward, not only the chosen one")


class BonRequest(SamplingRequest):
    selection: Literal["argmax", "rbon_kl"] = "argmax"
    beta: float = Field(0.0, ge=0, description="RBoN-KL's weight on log pi_0(y|x)")
    penalty: Literal["none", "ensemble", "laplace"] = "none"
    ensemble_mode: Literal["mean", "worst", "uncertainty_weighted"] = "mean"
    coef: float = Field(0.0, ge=0, description="uncertainty weight (ensemble) or k in mu - k sigma (laplace)")


class DeraRequest(SamplingRequest):
    lam: float = Field(1.0, ge=0, alias="lambda", description="lam * aligned + (1 - lam) * reference logits")
    n: int = Field(1, ge=1, description="samples per prompt; with a scorer, the best of n DeRa samples is chosen")


class CompletionRequest(BaseModel):
    """The OpenAI completions request (the fields Sweetspot honours; others are refused by name), plus
    `dera_lambda`. `best_of` samples are drawn per prompt and the `n` best by the server's reward are
    returned, as OpenAI defines best_of."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | list[str]
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, gt=0)
    max_tokens: int = Field(16, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    dera_lambda: float | None = Field(None, ge=0)
    user: str | None = None  # accepted and ignored, as OpenAI clients may send it


class GeneratorDeployment:
    """One Generator per replica (actors/generator.py). Requests that arrive together are sampled in
    one call (serve/batching.py: ContinuousBatcher decides what runs together, sample_together groups
    it into sampler calls), in a thread so the replica's event loop keeps answering; each request's
    samples are what it would draw alone."""

    def __init__(self, model: str, aligned: str | None = None, device: str = "auto", num_threads: int | None = None,
                 batching: dict | None = None, reward: dict | None = None):
        """reward: a scorer spec to score in this replica too (`colocate_scorer`), or None."""
        from actors.generator import Generator
        from align.engine.models import resolve_model_path

        self.generator = Generator(resolve_model_path(model), device=device, num_threads=num_threads,
                                   aligned_path=resolve_model_path(aligned) if aligned else None)
        self.has_aligned = aligned is not None
        b = Batching(**(batching or {}))
        self.batcher = ContinuousBatcher(self.sample_calls, b.max_batch_size, size=lambda call: len(call.prompts),
                                         wait_s=b.batch_wait_timeout_s)
        self.score = BatchedScorer(reward, b.max_batch_size, b.batch_wait_timeout_s) if reward else None
        self.requests = self.sampler_calls = 0

    def eos_token_id(self) -> int | None:
        return self.generator.tokenizer.eos_token_id

    def stats(self) -> dict:
        """Requests answered and sampler calls made by this replica (their ratio is the batching)."""
        return {"requests": self.requests, "sampler_calls": self.sampler_calls}

    async def sample_calls(self, calls: list) -> list:
        from serve.batching import sample_together

        results = await asyncio.to_thread(sample_together, self.generator, calls)
        self.requests += len(calls)
        self.sampler_calls += len({c.group for c in calls})
        return results

    async def sample(self, call) -> dict:
        """One request's samples (a serve.batching.SampleCall), batched with whatever arrives with it.
        A prompt too long for the model fails here, alone, before it joins a batch."""
        self.generator.check_context(list(call.prompts), call.max_tokens)
        return await self.batcher(call)

    async def sample_colocated(self, call) -> list:
        """One request's samples, scored in this replica (the app was built with colocate_scorer)."""
        return await self.score((await self.sample(call))["samples"])


class ScorerDeployment:
    """A scorer per replica; the samples of requests that arrive together are scored in one call."""

    def __init__(self, spec: dict, batching: dict | None = None):
        b = Batching(**(batching or {}))
        self.score = BatchedScorer(spec, b.max_batch_size, b.batch_wait_timeout_s)

    async def score_samples(self, samples):
        return await self.score(samples)


# Defined before the ingress class: serve.ingress captures the class and what it refers to when the
# class is defined.
def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first of the stop sequences (not included), and whether one was found."""
    cut = min((i for i in (text.find(t) for t in stops if t) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def fast_json(content: dict):
    """`content` as a JSON response, as it is: plain JSON types already, so FastAPI's per-value
    encoding and response validation (milliseconds for a return_all answer) are skipped."""
    from fastapi.responses import JSONResponse

    return JSONResponse(content)


app = FastAPI(title="Sweetspot", description="Best-of-n and decoding-time realignment (DeRa) endpoints")


def error_body(message: str, param: str | None) -> dict:
    """FastAPI's `detail` and OpenAI's `error` object in one body, so plain HTTP clients and the
    official `openai` client both show the message and the field."""
    return {"detail": message, "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


@app.middleware("http")
async def limit_body(request, call_next):
    """413 for a body larger than the configured limit, before it is read (by its Content-Length;
    a body sent without one is counted as it streams in)."""
    from fastapi.responses import JSONResponse

    limit = getattr(request.app.state, "max_body_bytes", None)
    if limit is not None and request.method == "POST":
        declared = request.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else len(await request.body())
        if size > limit:
            return JSONResponse(error_body(f"body: expected at most {limit} bytes, got {size}", "body"), status_code=413)
    return await call_next(request)


@app.exception_handler(StarletteHTTPException)  # FastAPI's own 400s (a body it cannot parse) too
async def http_error(request, exc: StarletteHTTPException):
    from fastapi.responses import JSONResponse

    message = str(exc.detail)
    return JSONResponse(error_body(message, message.split(":")[0] if ":" in message else None),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def validation_error(request, exc: RequestValidationError):
    """422 naming each bad field (its location in the body) and what was wrong with it."""
    from fastapi.responses import JSONResponse

    parts = [(".".join(str(x) for x in e["loc"] if x != "body") or "body", e["msg"]) for e in exc.errors()]
    message = "; ".join(f"{field}: {msg}" for field, msg in parts)
    return JSONResponse(error_body(message, parts[0][0] if parts else None), status_code=422)


@serve.ingress(app)
class Api:
    def __init__(self, generator: DeploymentHandle, scorer: DeploymentHandle | None, limits: dict | None = None,
                 has_aligned: bool = False, reward_kind: str = "vader", model_name: str = "sweetspot",
                 retry_after_s: float = 1.0):
        self.generator, self.scorer = generator, scorer
        self.limits, self.has_aligned, self.reward_kind = Limits(**(limits or {})), has_aligned, reward_kind
        self.model_name, self.eos_token_id, self.retry_after_s = model_name, None, retry_after_s
        app.state.max_body_bytes = self.limits.max_body_bytes  # read by limit_body, in this replica

    def check(self, req: SamplingRequest) -> list[str]:
        """The request's prompts, or a 422 naming the field and the allowed range."""
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        lim = self.limits
        for ok, field, allowed in (
            (1 <= len(prompts) <= lim.max_prompts, "prompt", f"1 to {lim.max_prompts} prompts"),
            (all(p.strip() for p in prompts), "prompt", "non-empty text"),
            (all(len(p) <= lim.max_prompt_chars for p in prompts), "prompt", f"at most {lim.max_prompt_chars} characters"),
            (req.n <= lim.max_n, "n", f"1 <= n <= {lim.max_n}"),
            (req.max_tokens <= lim.max_tokens, "max_tokens", f"1 <= max_tokens <= {lim.max_tokens}"),
            (req.min_tokens <= req.max_tokens, "min_tokens", "0 <= min_tokens <= max_tokens"),
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

    async def scored_samples(self, prompts: list[str], req: SamplingRequest, lam: float | None = None):
        """Sample on the generator deployment, score on the scorer deployment. A full queue on either,
        or a replica that died while it held the request (Serve starts a new one), is a 503 with
        Retry-After: the request can be sent again as it was."""
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        from actors.generator import PromptTooLongError

        from serve.batching import SampleCall

        call = SampleCall(tuple(prompts), req.n, req.max_tokens, req.temperature, req.min_tokens, req.seed, lam)
        retry = {"Retry-After": str(math.ceil(self.retry_after_s))}
        try:
            if self.scorer is None:  # colocate_scorer: the generator replica scores too
                return await self.generator.sample_colocated.remote(call)
            # Awaited here, not handed on to the scorer as a response: a generator replica that dies
            # must reach this handler as its own error (a 503), not as the scorer's failed argument.
            result = await self.generator.sample.remote(call)
            return await self.scorer.score_samples.remote(result["samples"])
        except BackPressureError as e:
            raise HTTPException(503, detail=f"overloaded: {e} Retry after {self.retry_after_s:g} s", headers=retry) from None
        except PromptTooLongError as e:  # Ray wraps it (with the replica's traceback); its cause is the message
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
        """One generator replica's counts of requests and sampler calls (how much batching happens)."""
        return {"generator": await self.generator.stats.remote()}

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> dict:
        """OpenAI-compatible completions; best_of is best-of-n ranked by the server's reward scorer."""
        import secrets
        import time
        import uuid

        if req.model != self.model_name:
            raise HTTPException(404, detail=f"model: this server serves {self.model_name!r}, got {req.model!r}")
        best_of = req.best_of or req.n
        if req.n > best_of:
            raise HTTPException(422, detail=f"n: expected n <= best_of ({best_of}), got {req.n}")
        if req.dera_lambda is not None:
            self.check_dera("dera_lambda")
        # no seed: a fresh one per request, as OpenAI-compatible servers sample
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        sampling = SamplingRequest(prompt=req.prompt, n=best_of, temperature=req.temperature, max_tokens=req.max_tokens,
                                   seed=seed)
        prompts = self.check(sampling)
        if self.eos_token_id is None:  # asked once: finish_reason is "stop" when a completion drew it
            self.eos_token_id = await self.generator.eos_token_id.remote()
        scored = await self.scored_samples(prompts, sampling, req.dera_lambda)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        choices, completion_tokens = [], 0
        for s in scored:
            completion_tokens += sum(len(ids) for ids in s.completion_ids)
            best = sorted(range(len(s.completions)), key=lambda i: -s.rewards[i])[: req.n]  # stable: ties keep order
            for i in best:
                text, finish = cut_at_stop(s.completions[i], stops)
                ended = bool(s.completion_ids[i]) and s.completion_ids[i][-1] == self.eos_token_id
                choices.append({"text": text, "index": len(choices), "logprobs": None,
                                "finish_reason": "stop" if finish or ended else "length", "reward": s.rewards[i]})
        prompt_tokens = sum(len(s.prompt_ids) for s in scored)
        return fast_json({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                          "model": self.model_name, "choices": choices,
                          "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                    "total_tokens": prompt_tokens + completion_tokens}})

    @app.post("/v1/bon")
    async def bon(self, req: BonRequest) -> dict:
        """Best-of-n per prompt: n samples from pi_0, scored, one chosen by the selection rule."""
        prompts = self.check(req)
        if req.penalty != "none" and req.penalty != self.reward_kind:
            raise HTTPException(422, detail=f"penalty: '{req.penalty}' needs the server's reward kind to be "
                                            f"'{req.penalty}' (it is '{self.reward_kind}')")
        return fast_json({"results": [self.answer(s, req) for s in await self.scored_samples(prompts, req)]})

    @app.post("/v1/dera")
    async def dera(self, req: DeraRequest) -> dict:
        """Samples at DeRa strength lambda; with n > 1 the best of them by the server's reward."""
        prompts = self.check(req)
        self.check_dera("lambda")
        return fast_json({"results": [self.answer(s, req, lam=req.lam) for s in await self.scored_samples(prompts, req, req.lam)]})

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
    colocate_scorer: bool = Field(False, description="score in the generator's replicas: one handle call less "
                                                     "per request, but generation and scoring then scale together")


# Defaults small enough for a 2-core machine; a Serve config file's `deployments` override them.
DEPLOYMENT_OPTIONS = {
    "GeneratorDeployment": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 32, "max_queued_requests": 128},
    "ScorerDeployment": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 32, "max_queued_requests": 128},
    "Api": {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 256, "max_queued_requests": 512,
            "backpressure_config": {"status_code": 503, "retry_after_s": 1}},
}


def bind_app(a: AppArgs, options: dict[str, dict] | None = None) -> serve.Application:
    """Generator and scorer deployments bound into the ingress; `options` replaces a deployment's
    default options (DEPLOYMENT_OPTIONS) by its name."""
    from align.rewards.registry import check_spec

    check_spec(a.reward, "reward")  # a ConfigError (a ValueError) naming reward.<field>, before any replica starts
    opts = {**DEPLOYMENT_OPTIONS, **(options or {})}
    batching = a.batching.model_dump()
    spec = {"device": a.device, **a.reward}
    generator = serve.deployment(GeneratorDeployment, **opts["GeneratorDeployment"]).bind(
        a.model, a.aligned, a.device, a.generator_threads, batching, spec if a.colocate_scorer else None)
    scorer = None if a.colocate_scorer else serve.deployment(ScorerDeployment, **opts["ScorerDeployment"]).bind(spec, batching)
    return serve.deployment(Api, **opts["Api"]).bind(
        generator, scorer, a.limits.model_dump(), a.aligned is not None, a.reward["kind"], a.model_name, a.retry_after_s)


def build_app(args: dict | None = None) -> serve.Application:
    """The application from the config file's `args` (a typed builder Serve calls)."""
    return bind_app(AppArgs(**(args or {})))
