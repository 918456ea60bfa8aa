"""`python -m serve`: start the Sweetspot endpoints for the default task (or any model) and block.

    python -m serve                                   # http://127.0.0.1:8000, pi_0 of the default task, VADER
    python -m serve --aligned outputs/bonbon/model    # also /v1/dera
    SWEETSPOT_API_KEY=... python -m serve --api-key-env SWEETSPOT_API_KEY   # Authorization: Bearer <key>
    python -m serve --host 0.0.0.0 --port 9000 --allowed-host myhost.example   # reachable from elsewhere

The door is closed by default: HTTP on loopback, a Ray started here on loopback too, and on loopback
only loopback Host headers are accepted (a DNS-rebinding page cannot reach it). "serving on" is
printed once the app is deployed and /healthz answers; Ctrl-C stops the app and the Ray it started.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    """Return once GET url/healthz answers 200; RuntimeError after timeout_s."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz did not answer within {timeout_s:g} s")
        time.sleep(0.25)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="default", help="pi_0: 'default', an HF name or a directory")
    parser.add_argument("--aligned", default=None, help="an aligned model (same tokenizer) for /v1/dera")
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"],
                        help="the generator's engine: torch (the project's sampler) or vllm (make vllm-env first)")
    parser.add_argument("--engine-python", default=None, help="engine vllm: the Python of vLLM's environment "
                                                            "(default .venv-vllm/bin/python)")
    parser.add_argument("--reward", default='{"kind": "vader"}', help="the scorer as JSON, e.g. '{\"kind\": \"classifier\", \"path\": \"outputs/rm/model\"}'")
    parser.add_argument("--api-key-env", default=None, help="an environment variable holding the API key clients must send")
    parser.add_argument("--api-key-file", default=None, help="or a file whose first line is the key")
    parser.add_argument("--allowed-host", action="append", default=None,
                        help="a Host header value to accept (repeatable; default on loopback: the loopback names only)")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from actors.cluster import init_ray
    from serve.app import LOOPBACK_HOSTS, build_app

    allowed = args.allowed_host or (LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS else None)
    try:
        reward = json.loads(args.reward)
        engine = {"engine": args.engine, **({"engine_python": args.engine_python} if args.engine_python else {})}
        app = build_app({"model": args.model, "aligned": args.aligned, "reward": reward, **engine,
                         "access": {"api_key_env": args.api_key_env, "api_key_file": args.api_key_file,
                                    "allowed_hosts": allowed}})
    except ValueError as e:  # a ConfigError, pydantic's ValidationError, bad JSON: before anything starts
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    started = init_ray()
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{'[' + local + ']' if ':' in local else local}:{args.port}"
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"  deploying the app on {args.host}:{args.port} ...", flush=True)
        serve.run(app, name="sweetspot", route_prefix="/", blocking=False)  # returns once every deployment runs
        wait_healthy(url)
        door = ("an API key (Authorization: Bearer)" if args.api_key_env or args.api_key_file else "no API key") + \
               (f", Host in {', '.join(allowed)}" if allowed else ", any Host")
        print(f"  Sweetspot serving on http://{args.host}:{args.port} (OpenAPI schema at /docs; {door}); "
              "Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the shutdown into a traceback
        print("\n  stopping: the app, then the Ray this command started", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # also when it ends another way
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


if __name__ == "__main__":
    main()
