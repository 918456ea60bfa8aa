"""What Ray's plumbing costs best-of-n: the same sampling and scoring in-process, through a
GeneratorPool of 1 actor and of 2 actors (actors.best_of_n.scored_batches), at the default task's
sizes, timed in one run.

    python -m jobs.bench.ray_overhead --config configs/bench/ray_overhead.yaml
    python -m jobs.bench.ray_overhead --config configs/bench/ray_overhead.yaml quick=true   # smoke run

in_process: a Generator and a VADER scorer built in this process, batch after batch, with as many
threads as one actor gets. pool_k: k generator actors (one model copy each) and one scorer actor,
sampling and scoring overlapped. Each method in turn is warmed up on one batch (model load, first
call) and then timed `repeats` times over the whole prompt set; medians are reported. pool_1 / in_process is
the overhead of the plumbing (object store, scheduling, the scorer hop); pool_2 / pool_1 is how
throughput scales with a second actor on this machine.

serve_*: the Serve app (serve/app.py) over HTTP on loopback, one generator replica with the same
threads. `serve_call` sends the in-process run's calls as requests, one POST /v1/bon per batch of
batch_size prompts, one after another: serve_call / in_process is what Serve costs a best-of-n call;
`serve_call_colocated` the same with the scorer in the generator replica (colocate_scorer).
`serve_sequential` sends one request per prompt, one after another; `serve_concurrent` all at once
with batching on (up to batch_size prompts per sampler call); `serve_unbatched` all at once with
batching off. serve_concurrent / serve_sequential is what batching concurrent requests buys.

A second table splits one call of batch_size prompts into its costs, each part timed in turn within
every repeat: the call in-process, GET /healthz (the HTTP proxy and the FastAPI ingress), GET
/v1/stats (the same plus one handle call to the generator replica), the call through the generator's
handle alone, through the generator's and then the scorer's handles from this process, as a POST
/v1/bon, and as a POST /v1/bon to the app with the scorer colocated.
Writes results.json and results.md.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.runtime.config import InputRef, OutputPath, require, run_job
from jobs.bench.common import format_table, machine, machine_line, publish

log = logging.getLogger("sweetspot.bench_ray")


@dataclass
class BenchRayConfig:
    model: InputRef = "default"  # "default" (the embedded task's pi_0), an HF name or a directory
    prompts: str = "default"  # "default" (the task's test prompts) or a prompt file (jobs.bon's formats)
    column: str = "prompt"
    limit: int | None = None  # the first `limit` prompts
    n: int = 8  # samples per prompt
    max_new_tokens: int = 24
    min_new_tokens: int = 16
    batch_size: int = 16  # prompts per generator call
    actors: list[int] = field(default_factory=lambda: [1, 2])  # pool sizes to time
    serve: bool = True  # also time the Serve app: sequential, concurrent batched and concurrent unbatched requests
    profile_seconds: float = 0.0  # > 0: py-spy the Serve processes for this long while calls run back to back
    threads_per_actor: int = 1  # torch threads of each actor and of the in-process run
    repeats: int = 3
    quick: bool = False  # 8 prompts, n 2, 4 new tokens, 1 repeat, no serve_unbatched row
    seed: int = 0
    ray_address: str | None = None
    output_dir: OutputPath = "outputs/bench_ray"

    def __post_init__(self):
        require(self.n >= 1, "n", "an integer >= 1", self.n)
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", f"0 <= min_new_tokens <= max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(len(self.actors) >= 1 and all(k >= 1 for k in self.actors), "actors", "a non-empty list of integers >= 1", self.actors)
        require(self.threads_per_actor >= 1, "threads_per_actor", "an integer >= 1", self.threads_per_actor)
        require(self.repeats >= 1, "repeats", "an integer >= 1", self.repeats)
        require(self.profile_seconds >= 0, "profile_seconds", "a number >= 0 (0: no profile)", self.profile_seconds)


def in_process(cfg: BenchRayConfig, model_path: str, batches: dict[int, list[str]]):
    """f() -> new tokens for the whole prompt set, sampled and scored in this process."""
    from actors.generator import Generator, batch_seed
    from actors.scorer import make_scorer

    torch.set_num_threads(cfg.threads_per_actor)
    gen, scorer = Generator(model_path, num_threads=cfg.threads_per_actor), make_scorer({"kind": "vader"})

    def f(which=None):
        tokens = 0
        for b in which or sorted(batches):
            out = gen.sample(batches[b], cfg.n, cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, seed=batch_seed(cfg.seed, b))
            scorer.score_samples(out["samples"])
            tokens += out["new_tokens"]
        return tokens
    return f


def through_pool(cfg: BenchRayConfig, model_path: str, batches: dict[int, list[str]], k: int):
    from actors.best_of_n import scored_batches
    from actors.generator import GeneratorPool
    from actors.scorer import ScorerPool

    pool = GeneratorPool(model_path, num_actors=k, num_cpus_per_actor=cfg.threads_per_actor)
    scorers = ScorerPool({"kind": "vader"})

    def f(which=None):
        todo = {b: batches[b] for b in (which or batches)}
        return sum(t for _, _, t in scored_batches(pool, scorers, todo, cfg.n, cfg.max_new_tokens, cfg.seed,
                                                      min_new_tokens=cfg.min_new_tokens))
    return f, [pool, scorers]


def serve_app(cfg: BenchRayConfig, model_path: str, batched: bool) -> tuple[str, str | None]:
    """Deploy the Serve app on loopback (batching on or off), replacing any earlier one; with batching
    also the same app with its scorer colocated in the generator replica (colocate_scorer), under
    /colocated. Returns the two /v1/bon URLs (the second None without batching)."""
    from ray import serve

    from actors.cluster import free_ports
    from serve.app import AppArgs, bind_app

    serve.shutdown()  # an earlier app (if any) goes: one generator at a time holds the CPUs
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    batch = cfg.batch_size if batched else 1
    generator = {"ray_actor_options": {"num_cpus": cfg.threads_per_actor}, "max_ongoing_requests": max(2 * batch, 8),
                 "max_queued_requests": -1}
    urls = []
    for name, prefix, colocate in [("bench", "/", False), ("bench_colocated", "/colocated", True)][: 2 if batched else 1]:
        args = AppArgs(model=model_path, device="cpu", generator_threads=cfg.threads_per_actor, colocate_scorer=colocate,
                       limits={"max_n": cfg.n, "max_tokens": cfg.max_new_tokens}, batching={"max_batch_size": batch})
        serve.run(bind_app(args, {"GeneratorDeployment": generator}), name=name, route_prefix=prefix)
        urls.append(f"http://127.0.0.1:{port}{prefix.rstrip('/')}/v1/bon")
    return urls[0], urls[1] if batched else None


def through_serve(cfg: BenchRayConfig, url: str, batches: dict[int, list[str]], mode: str):
    """f() -> new tokens for the prompt set through the app at `url`; mode: call (one POST /v1/bon
    per batch, one after another) | sequential (one per prompt, one after another) | concurrent (one
    per prompt, all at once)."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    session = requests.Session()
    prompts = [p for b in sorted(batches) for p in batches[b]]

    def post(some: list[str], seed: int, client=session) -> int:
        body = {"prompt": some, "n": cfg.n, "max_tokens": cfg.max_new_tokens, "min_tokens": cfg.min_new_tokens,
                "seed": seed, "return_all": True}
        r = client.post(url, json=body, timeout=600)
        r.raise_for_status()
        return sum(s["tokens"] for res in r.json()["results"] for s in res["samples"])

    def f(which=None):
        if mode == "call":
            return sum(post(batches[b], cfg.seed + b) for b in (which or sorted(batches)))
        rows = range(len(prompts)) if which is None else range(min(len(prompts), cfg.batch_size))
        if mode == "sequential":
            return sum(post([prompts[i]], cfg.seed + i) for i in rows)
        with ThreadPoolExecutor(len(rows)) as pool:
            return sum(pool.map(lambda i: post([prompts[i]], cfg.seed + i, requests), rows))

    return f


def request_costs(cfg: BenchRayConfig, url: str, colocated_url: str, model_path: str, batch: list[str]) -> list[dict]:
    """Median milliseconds of the parts of one best-of-n call of `batch` to the app at `url`, the
    parts interleaved in every repeat so that drift in the machine's speed falls on all alike."""
    import requests
    from ray import serve

    from serve.batching import SampleCall

    base, session = url.removesuffix("/v1/bon"), requests.Session()
    generator = serve.get_deployment_handle("GeneratorDeployment", "bench")
    scorer = serve.get_deployment_handle("ScorerDeployment", "bench")
    call = SampleCall(tuple(batch), cfg.n, cfg.max_new_tokens, 1.0, cfg.min_new_tokens, cfg.seed)
    body = {"prompt": batch, "n": cfg.n, "max_tokens": cfg.max_new_tokens, "min_tokens": cfg.min_new_tokens,
            "seed": cfg.seed, "return_all": True}
    local = in_process(cfg, model_path, {0: batch})
    k = len(batch)
    parts = {f"in-process: sample and score {k} prompts": lambda: local([0]),
             "GET /healthz: HTTP proxy + ingress": lambda: session.get(base + "/healthz").raise_for_status(),
             "GET /v1/stats: + one handle call": lambda: session.get(base + "/v1/stats").raise_for_status(),
             f"generator handle: sample {k} prompts": lambda: generator.sample.remote(call).result(),
             f"generator -> scorer handles: sample and score {k} prompts":
                 lambda: scorer.score_samples.remote(generator.sample.remote(call).result()["samples"]).result(),
             f"POST /v1/bon: sample and score {k} prompts": lambda: session.post(url, json=body).raise_for_status(),
             f"POST /v1/bon, scorer colocated: sample and score {k} prompts":
                 lambda: session.post(colocated_url, json=body).raise_for_status()}
    times = {name: [] for name in parts}
    for f in parts.values():
        f()  # warm-up
    for _ in range(max(5, 3 * cfg.repeats)):
        for name, f in parts.items():
            start = time.perf_counter()
            f()
            times[name].append(1000 * (time.perf_counter() - start))
    rows = [{"part": name, "ms": statistics.median(t)} for name, t in times.items()]
    for r in rows:
        if "prompts" in r["part"]:
            r["vs_in_process"] = r["ms"] / rows[0]["ms"]
    return rows


OWNERS = {"torch": "torch", "transformers": "torch", "ray": "ray", "fastapi": "web stack", "starlette": "web stack",
          "pydantic": "web stack", "pydantic_core": "web stack", "uvicorn": "web stack", "httptools": "web stack",
          "h11": "web stack", "anyio": "web stack"}
OUR_PACKAGES = ("serve", "actors", "align", "jobs", "tune")


def frame_owner(frame: str) -> str:
    """Whose code a py-spy frame ("function (path:line)") is: sweetspot, torch, the web stack
    (FastAPI, Starlette, pydantic, uvicorn), ray, the Python standard library, or other. py-spy
    names a file relative to the sys.path entry it was imported from ("serve/app.py",
    "ray/serve/handle.py", "threading.py") or by its absolute path."""
    import sys

    path = frame.rpartition("(")[2].rpartition(":")[0]
    installed = "site-packages/" in path
    module = path.split("site-packages/")[-1]
    if module.startswith("/"):  # an absolute path outside site-packages: the repository or the stdlib
        if any(f"/{p}/" in module for p in OUR_PACKAGES):
            return "sweetspot"
        return "python stdlib" if "/python3." in module else "other"
    top = module.split("/")[0].removesuffix(".py")
    if top in OUR_PACKAGES and not installed:
        return "sweetspot"
    if top in OWNERS:
        return OWNERS[top]
    return "python stdlib" if top in sys.stdlib_module_names and not installed else "other"


def profile_serve(url: str, body: dict, seconds: float, out_dir) -> list[dict]:
    """py-spy (which ray[serve] installs) on the proxy, the ingress and the generator and scorer
    replicas of the app "bench" while POST `body` to `url` runs back to back for `seconds`: each
    process's CPU milliseconds per request and the share of its samples by whose code the innermost
    frame is (frame_owner). Empty, with a warning, where py-spy cannot attach (no ptrace)."""
    import collections
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import psutil
    import requests

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    names = {"ProxyActor": "HTTP proxy", "bench:Api": "ingress (Api)", "bench:GeneratorDeployment": "generator",
             "bench:ScorerDeployment": "scorer"}
    procs = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        for key, name in names.items():
            if line.startswith("ray::") and key in line:
                procs[name] = p
    session, n = requests.Session(), 0
    session.post(url, json=body).raise_for_status()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    files = {name: Path(out_dir) / f"py-spy-{name.split()[0]}.txt" for name in procs}
    spies = [subprocess.Popen([spy, "record", "-p", str(p.pid), "-d", str(int(seconds) + 2), "-r", "100", "-f", "raw",
                               "--nonblocking", "-o", str(files[name])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for name, p in procs.items()]
    time.sleep(1)  # py-spy attached
    cpu = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.post(url, json=body).raise_for_status()
        n += 1
    cpu = {name: sum(p.cpu_times()[:2]) - cpu[name] for name, p in procs.items()}
    errors = [s.communicate()[1].decode(errors="replace").strip() for s in spies]
    rows = []
    for name, path in files.items():
        if not path.exists():
            log.warning("py-spy could not profile the %s: %s", name, " ".join(e for e in errors if e)[:300])
            continue
        owners, total = collections.Counter(), 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            owners[frame_owner(stack.split(";")[-1])] += int(count)
            total += int(count)
        rows.append({"process": name, "cpu_ms_per_request": 1000 * cpu[name] / n, "samples": total,
                     "by_owner": ", ".join(f"{o} {100 * c / total:.0f}%" for o, c in owners.most_common()) if total else "-"})
    return rows


def run(cfg: BenchRayConfig) -> dict:
    import dataclasses

    from actors.cluster import init_ray
    from align.data.prompts import load_prompts
    from align.engine.models import resolve_model_path

    if cfg.quick:
        cfg = dataclasses.replace(cfg, limit=8, n=2, max_new_tokens=4, min_new_tokens=4, repeats=1, batch_size=4)
    prompts = load_prompts(cfg.prompts, "test", cfg.column, cfg.limit)
    batches = {b: prompts[i : i + cfg.batch_size] for b, i in enumerate(range(0, len(prompts), cfg.batch_size))}
    model_path = str(resolve_model_path(cfg.model))
    started = init_ray(cfg.ray_address)
    rows = []
    serve_modes = ["serve_call", "serve_call_colocated", "serve_sequential", "serve_concurrent",
                   *([] if cfg.quick else ["serve_unbatched"])] if cfg.serve else []  # quick: one deployment less
    costs, profile = [], []
    try:
        # One method at a time: pools of 1 and 2 actors at once would not fit on a 2-core machine.
        for m in ["in_process", *(f"pool_{k}" for k in cfg.actors), *serve_modes]:
            groups = []
            if m == "in_process":
                f = in_process(cfg, model_path, batches)
            elif m.startswith("serve_"):
                if m in ("serve_call", "serve_unbatched"):  # call, sequential and concurrent share the batched app
                    url, colocated_url = serve_app(cfg, model_path, batched=m != "serve_unbatched")
                if m == "serve_call":
                    costs = request_costs(cfg, url, colocated_url, model_path, batches[0])
                    if cfg.profile_seconds > 0:
                    
                        profile = profile_serve(url, {"prompt": batches[0], "n": cfg.n, "max_tokens": cfg.max_new_tokens,
                                                      "min_tokens": cfg.min_new_tokens, "seed": cfg.seed, "return_all": True},
                                                cfg.profile_seconds, Path(cfg.output_dir))
                if m == "serve_sequential":  # the colocated app's generator would hold a CPU from here on
                    from ray import serve

                    serve.delete("bench_colocated")
                mode = {"serve_call_colocated": "call", "serve_unbatched": "concurrent"}.get(m, m.removeprefix("serve_"))
                f = through_serve(cfg, colocated_url if m == "serve_call_colocated" else url, batches, mode)
            else:
                f, groups = through_pool(cfg, model_path, batches, int(m.removeprefix("pool_")))
            try:
                f([0])  # warm-up: model loaded, first call paid
                seconds, tokens = [], 0
                for _ in range(cfg.repeats):
                    start = time.perf_counter()
                    tokens = f()
                    seconds.append(time.perf_counter() - start)
            finally:
                for g in groups:
                    g.shutdown()
            median = statistics.median(seconds)
            rows.append({"method": m, "seconds": median, "seconds_all": seconds, "new_tokens": tokens,
                         "tokens_per_s": tokens / median})
            log.info("%-10s %.2f s (%s)", m, median, ", ".join(f"{s:.2f}" for s in seconds))
    finally:
        if serve_modes:
            from ray import serve

            serve.shutdown()
        if started:
            import ray

            ray.shutdown()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_in_process"] = r["tokens_per_s"] / base
        r["requests_per_s"] = len(prompts) / r["seconds"]
    by = {r["method"]: r for r in rows}
    if cfg.serve:
        log.info("Serve: a call of %d prompts takes %.2fx the in-process time per token; %d requests: concurrent (batched) %.2fx sequential, "
                 "unbatched %.2fx sequential (nan: not run)", len(batches[0]), 1 / by["serve_call"]["vs_in_process"],
                 len(prompts),
                 by["serve_concurrent"]["requests_per_s"] / by["serve_sequential"]["requests_per_s"],
                 by.get("serve_unbatched", {}).get("requests_per_s", float("nan")) / by["serve_sequential"]["requests_per_s"])
    env = machine(torch.device("cpu"))
    columns = [("method", "method", "{}"), ("seconds", "seconds", "{:.2f}"), ("new tokens", "new_tokens", "{}"),
               ("tokens/s", "tokens_per_s", "{:.0f}"), ("prompts/s", "requests_per_s", "{:.2f}"),
               ("vs in-process", "vs_in_process", "{:.2f}x")]
    header = (f"Best-of-{cfg.n} over {len(prompts)} prompts ({cfg.max_new_tokens} new tokens, VADER scoring), "
              f"{cfg.threads_per_actor} thread(s) per actor, median of {cfg.repeats}; {machine_line(env)}.")
    result = {"rows": rows, "env": env, "request_costs": costs, "profile": profile}
    extra = ""
    if costs:
        text, md = format_table(costs, [("part of a request", "part", "{}"), ("median ms", "ms", "{:.1f}"),
                                        ("time vs in-process", "vs_in_process", "{:.3f}x")])
        extra = f"\nWhere a request's time goes (interleaved, median of {max(5, 3 * cfg.repeats)}):\n\n{md}\n"
    if profile:
        _, pmd = format_table(profile, [("process", "process", "{}"), ("CPU ms per request", "cpu_ms_per_request", "{:.1f}"),
                                        ("py-spy samples", "samples", "{}"), ("innermost frame's code", "by_owner", "{}")])
        extra += (f"\npy-spy on the Serve processes, {cfg.profile_seconds:g} s of POST /v1/bon calls of "
                  f"{len(batches[0])} prompts back to back (py-spy's own sampling adds to the CPU):\n\n{pmd}\n")
    publish(cfg, result, header, rows, columns, extra)
    if costs:
        print(f"\n{text}", flush=True)
    return result


def main(argv=None) -> dict:
    return run_job(BenchRayConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
