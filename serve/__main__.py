"""`python -m serve`: start the Sweetspot endpoints for the default task (or any model) and block.

    python -m serve                                   # http://127.0.0.1:8000, pi_0 of the default task, VADER
    python -m serve --aligned outputs/bonbon/model    # also /v1/dera
    python -m serve --host 0.0.0.0 --port 9000        # reachable from other machines (not the default)
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="default", help="pi_0: 'default', an HF name or a directory")
    parser.add_argument("--aligned", default=None, help="an aligned model (same tokenizer) for /v1/dera")
    parser.add_argument("--reward", default='{"kind": "vader"}', help="the scorer as JSON, e.g. '{\"kind\": \"classifier\", \"path\": \"outputs/rm/model\"}'")
    args = parser.parse_args(argv)

    from ray import serve

    from actors.cluster import init_ray
    from serve.app import build_app

    app = build_app({"model": args.model, "aligned": args.aligned, "reward": json.loads(args.reward)})
    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"  Sweetspot serving on http://{args.host}:{args.port} (OpenAPI schema at /docs); Ctrl-C stops it", flush=True)
    serve.run(app, name="sweetspot", route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
