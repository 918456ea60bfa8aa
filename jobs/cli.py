"""`sweetspot`: one console command for every job, sweep, benchmark and the server, beside `python -m`.

    sweetspot bon --config configs/bon.yaml [key.sub=value ...]   # python -m jobs.bon ...
    sweetspot tune.dera --config configs/tune_dera.yaml            # python -m tune.dera ...
    sweetspot bench.generate --config configs/bench/generate.yaml  # python -m jobs.bench.generate ...
    sweetspot serve --model smollm2                                # python -m serve ...
    sweetspot --help                                               # this list

The commands are found, not listed here: every module of jobs/, jobs/bench/ and tune/ with a
`main(argv)`, and serve. Each gets the rest of the command line as its own.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _summary(path: Path) -> str | None:
    """The first line of a module's docstring when the module defines main(argv), else None; read
    without importing it (the jobs import torch and Ray)."""
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
        return None
    paragraph = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
    first = re.split(r"(?<=\.)\s(?=[A-Z])", paragraph)[0].rstrip(".")  # its first sentence,
    head = first.split(": ")[0]
    first = head if len(head) >= 24 else first  # up to a colon that ends a title
    return first if len(first) <= 100 else first[:99].rstrip() + "…"


def commands() -> dict[str, tuple[str, str]]:
    """command name -> (module to run, one-line summary)."""
    found = {}
    for package, prefix in (("jobs", ""), ("jobs.bench", "bench."), ("tune", "tune.")):
        folder = ROOT.joinpath(*package.split("."))
        for info in pkgutil.iter_modules([str(folder)]):
            if info.ispkg or info.name.startswith("_") or info.name == "cli":
                continue
            summary = _summary(folder / f"{info.name}.py")
            if summary is not None:
                found[prefix + info.name] = (f"{package}.{info.name}", summary)
    found["serve"] = ("serve.__main__", _summary(ROOT / "serve" / "__main__.py") or "")
    return dict(sorted(found.items()))


def usage() -> str:
    table = commands()
    width = max(map(len, table))
    lines = ["usage: sweetspot COMMAND [--config FILE] [key.sub=value ...]   (sweetspot COMMAND --help: its own options)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in table.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    table = commands()
    if argv[0] not in table:
        print(f"sweetspot: unknown command {argv[0]!r}; one of: {', '.join(table)}", file=sys.stderr)
        return 2
    module = importlib.import_module(table[argv[0]][0])
    sys.argv = [f"sweetspot {argv[0]}", *argv[1:]]  # argparse's prog in the command's own messages
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
