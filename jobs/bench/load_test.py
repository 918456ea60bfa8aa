"""A bounded load test of the Serve app on loopback: `clients` concurrent clients send `requests`
requests in all (for at most `max_seconds`), then latency percentiles of the accepted (200) requests
and of the refused ones (503), throughput, status codes, the server's admission state (GET /v1/stats)
and the memory (RSS) of every replica before and after.

    python -m jobs.bench.load_test --config configs/bench/load_test.yaml                  # starts the app here
    python -m jobs.bench.load_test --config configs/bench/load_test.yaml url=http://127.0.0.1:8000

A request the server accepted must complete (200); a 503 is what an overloaded or failing server
answers (with Retry-After), and it should come at once; anything else (another 5xx, a dropped
connection, a client timeout) is counted as a failure. With honor_retry_after a client answered 503
waits the Retry-After before its next request, as well-behaved clients do (without it, it sends the
next one at once). Writes results.md/json in output_dir.

A 10x overload (docs/benchmarks.md, "Bounded waits"): clients = 10 x the requests the server holds
at its admission bound (the lesser of its throughput x admission.max_wait_s and admission.max_in_flight),
each honouring Retry-After; on the default task (2 cores) that is 480 clients, the command in
configs/bench/load_test.yaml, run once with admission on and once with `app.admission.enabled=false`.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from align.runtime.config import OutputPath, require, run_job


@dataclass
class LoadTestConfig:
    url: str | None = None  # a running server; null: start serve.app here, on 127.0.0.1 and a free port
    app: dict = field(default_factory=lambda: {"model": "default"})  # serve.app's arguments when url is null
    deployment_options: dict = field(default_factory=dict)  # per deployment, e.g. {GeneratorDeployment: {max_queued_requests: 4}}
    route: str = "/v1/bon"
    body: dict = field(default_factory=lambda: {"prompt": "the movie was", "n": 4, "max_tokens": 16})
    clients: int = 64  # concurrent clients, each sending its next request when the last is answered
    requests: int = 1000  # in all
    max_seconds: float = 60  # stop sending after this long (requests already sent still finish)
    timeout_s: float = 60  # per request: longer counts as a failure
    honor_retry_after: bool = False  # a client answered 503 waits its Retry-After (within max_seconds) before its next request
    output_dir: OutputPath = "outputs/load_test"

    def __post_init__(self):
        require(self.clients >= 1, "clients", "an integer >= 1", self.clients)
        require(self.requests >= 1, "requests", "an integer >= 1", self.requests)
        require(self.max_seconds > 0, "max_seconds", "a number > 0", self.max_seconds)
        require(self.timeout_s > 0, "timeout_s", "a number > 0", self.timeout_s)
        require(self.route.startswith("/"), "route", "a path starting with /", self.route)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest-rank method."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[k]


def serve_replicas(app_name: str | None = None, deployment: str | None = None) -> list[dict]:
    """The live Serve replica actors (this Ray's actor table: name, class "ServeReplica:<app>:<deployment>",
    pid), read from the GCS, so it works without the dashboard that the state API needs."""
    import ray._private.state

    out = []
    for a in ray._private.state.actors().values():
        cls = a.get("ActorClassName") or ""
        if a.get("State") != "ALIVE" or not cls.startswith("ServeReplica:"):
            continue
        _, app, dep = cls.split(":", 2)
        if (app_name is None or app == app_name) and (deployment is None or dep == deployment):
            out.append({"name": a["Name"], "app": app, "deployment": dep, "pid": a["Pid"], "actor_id": a["ActorID"]})
    return out


def replica_rss(app_name: str | None = None) -> dict[str, int]:
    """{"<deployment> (<pid>)": resident memory in bytes} for the Serve replicas on this machine."""
    import psutil

    out = {}
    for r in serve_replicas(app_name):
        try:
            out[f"{r['deployment']} ({r['pid']})"] = psutil.Process(r["pid"]).memory_info().rss
        except psutil.Error:  # on another node, or gone
            pass
    return out


def retry_after_s(header: str | None) -> float:
    """A Retry-After header's delay in seconds (0 when absent or an HTTP date)."""
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:
        return 0.0


async def drive(url: str, cfg: LoadTestConfig) -> tuple[list[tuple[int, float]], float]:
    """(status or -1 for a failure without one, seconds) per request, and the wall time."""
    import aiohttp

    results: list[tuple[int, float]] = []
    sent = 0
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

    async def client(session):
        nonlocal sent
        while sent < cfg.requests and time.perf_counter() - start < cfg.max_seconds:
            sent += 1
            t0 = time.perf_counter()
            pause = 0.0
            try:
                async with session.post(url + cfg.route, json=cfg.body) as r:
                    await r.read()
                    results.append((r.status, time.perf_counter() - t0))
                    if r.status == 503 and cfg.honor_retry_after:
                        pause = retry_after_s(r.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.append((-1, time.perf_counter() - t0))
            if pause > 0:  # not past the end of sending
                await asyncio.sleep(min(pause, max(0.0, start + cfg.max_seconds - time.perf_counter())))

    connector = aiohttp.TCPConnector(limit=cfg.clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(cfg.clients)))
    return results, time.perf_counter() - start


def summarize(results: list[tuple[int, float]], wall: float) -> dict:
    """Counts per status, and latency percentiles of the accepted (200: p50_s ...) and the refused
    (503: p50_503_s ...) requests."""
    ok = sorted(s for code, s in results if code == 200)
    busy = sorted(s for code, s in results if code == 503)
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[str(code) if code >= 0 else "no answer"] = codes.get(str(code) if code >= 0 else "no answer", 0) + 1
    return {"requests": len(results), "ok": len(ok), "status": codes,
            "overloaded_503": codes.get("503", 0),
            "failures": sum(n for c, n in codes.items() if c not in ("200", "503") and not c.startswith("4")),
            "p50_s": percentile(ok, 0.5), "p95_s": percentile(ok, 0.95), "p99_s": percentile(ok, 0.99),
            "max_s": ok[-1] if ok else None,
            "p50_503_s": percentile(busy, 0.5), "p99_503_s": percentile(busy, 0.99), "max_503_s": busy[-1] if busy else None,
            "throughput_rps": len(ok) / wall if wall > 0 else None, "wall_s": wall}


def admission_state(url: str) -> dict | None:
    """The server's admission state from GET /v1/stats, or None (no such route, or a closed door)."""
    import requests

    try:
        r = requests.get(url + "/v1/stats", timeout=30)
        return r.json().get("admission") if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def run(cfg: LoadTestConfig) -> dict:
    import ray

    from actors.cluster import free_ports, init_ray
    from jobs.bench.common import format_table, write_results

    started = init_ray()
    app_name = None
    try:
        url = cfg.url
        if url is None:
            from ray import serve

            from serve.app import AppArgs, bind_app

            (port,) = free_ports(1)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app_name = "load_test"
            serve.run(bind_app(AppArgs(**cfg.app), cfg.deployment_options or None), name=app_name, route_prefix="/")
            url = f"http://127.0.0.1:{port}"
        import requests

        requests.post(url + cfg.route, json=cfg.body, timeout=cfg.timeout_s)  # warm: the first call loads lazily
        before = replica_rss(app_name)
        print(f"\n  {cfg.requests} requests to {url}{cfg.route} from {cfg.clients} clients (at most {cfg.max_seconds:g} s)",
              flush=True)
        results, wall = asyncio.run(drive(url, cfg))
        after = replica_rss(app_name)
        admission = admission_state(url)
    finally:
        if app_name is not None:
            from ray import serve

            serve.shutdown()
        if started:
            ray.shutdown()
    summary = summarize(results, wall)
    memory = [{"replica": k, "before_mb": before[k] / 2**20, "after_mb": after[k] / 2**20,
               "growth_mb": (after[k] - before[k]) / 2**20} for k in sorted(before) if k in after]
    summary["memory"] = memory
    summary["admission"] = admission
    ms = {k: (summary[k] * 1000 if summary[k] is not None else None)
          for k in ("p50_s", "p95_s", "p99_s", "max_s", "p50_503_s", "p99_503_s", "max_503_s")}
    row = {**summary, **{k.removesuffix("_s") + "_ms": v for k, v in ms.items()},
           "codes": ", ".join(f"{c}: {n}" for c, n in sorted(summary["status"].items()))}
    text, md = format_table([row], [("requests", "requests", "{}"), ("200", "ok", "{}"), ("503", "overloaded_503", "{}"),
                                    ("status codes", "codes", "{}"),
                                    ("200 p50 (ms)", "p50_ms", "{:.0f}"), ("200 p95 (ms)", "p95_ms", "{:.0f}"),
                                    ("200 p99 (ms)", "p99_ms", "{:.0f}"), ("200 max (ms)", "max_ms", "{:.0f}"),
                                    ("503 p50 (ms)", "p50_503_ms", "{:.0f}"), ("503 p99 (ms)", "p99_503_ms", "{:.0f}"),
                                    ("requests/s", "throughput_rps", "{:.1f}"), ("wall (s)", "wall_s", "{:.1f}")])
    mtext, mmd = format_table(memory, [("replica", "replica", "{}"), ("RSS before (MB)", "before_mb", "{:.0f}"),
                                       ("after (MB)", "after_mb", "{:.0f}"), ("growth (MB)", "growth_mb", "{:+.1f}")])
    head = f"Load test: {cfg.clients} clients, {cfg.route}, body {cfg.body}"
    if cfg.honor_retry_after:
        head += ", clients honour Retry-After"
    if admission is None:
        said = "admission: not reported (GET /v1/stats)"
    elif not admission.get("enabled"):
        said = "admission: off"
    else:
        rate = admission.get("completion_rate_per_s")
        said = (f"admission: max_wait_s {admission['max_wait_s']:g}, {admission['admitted']} admitted, "
                f"{admission['refused']} refused, {admission['in_flight']} in flight after the run, "
                f"{'no rate measured' if rate is None else f'{rate:.2f} completed per busy second'}")
    out = write_results(cfg, summary, f"# {head}\n\n{md}\n\n{said}\n\n## Replica memory\n\n{mmd}\n")
    print(f"\n  {head}\n{text}\n\n  {said}\n\n{mtext}\n\n  failures (no answer, or a 5xx other than 503): {summary['failures']}"
          f"\n  wrote {out / 'results.md'}", flush=True)
    return summary


def main(argv=None) -> dict:
    return run_job(LoadTestConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
