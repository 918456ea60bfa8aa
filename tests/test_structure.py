"""The shape of the code, checked from its imports: layers import one way, no module imports itself
through others (no import circle, lazy function-level imports included), no entry point depends on a
benchmark, and align.math is pure tensor math."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones: align <- actors <- serve <- jobs <- tune.
LAYERS = ["align", "actors", "serve", "jobs", "tune"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions); `from a.b import c`
    counts as importing a.b.c when that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in LAYERS)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] in LAYERS:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found.update(subs or {node.module})
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle_and_only_circles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_layers_import_one_way():
    graph = import_graph()
    upward = [(m, d) for m, deps in graph.items() for d in deps
              if LAYERS.index(d.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert upward == []


def test_no_entry_point_imports_a_benchmark():
    graph = import_graph()
    assert [(m, d) for m, deps in graph.items() if not m.startswith("jobs.bench")
            for d in deps if d.startswith("jobs.bench")] == []


def test_align_math_imports_only_itself_from_the_project():
    graph = import_graph()
    assert {m: sorted(d for d in deps if not d.startswith("align.math"))
            for m, deps in graph.items() if m.startswith("align.math")} == \
        {m: [] for m in graph if m.startswith("align.math")}


@pytest.mark.parametrize("blocked", [("transformers", "ray", "deepspeed", "peft", "datasets")])
def test_align_math_runs_without_the_ml_stack(blocked):
    """Every align.math module imports with transformers, ray, deepspeed, peft and datasets made
    unimportable (a None entry in sys.modules raises ImportError on import)."""
    names = sorted(m for m in project_modules() if m.startswith("align.math."))
    assert len(names) >= 10
    code = "import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked) + \
        "".join(f"import {m}\n" for m in names) + \
        f"assert not [m for m in sys.modules if m.split('.')[0] in {blocked!r} and sys.modules[m] is not None]\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
