"""Results tables: an aligned text table for the terminal and the same as markdown, and the results
files (results.json, results.md, config.yaml) a job or a benchmark writes beside its outputs."""
from __future__ import annotations

from pathlib import Path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> tuple[str, str]:
    """(aligned text, markdown) of rows; columns are (heading, key, format). Missing values print as -."""
    cells = [[fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in columns] for r in rows]
    heads = [h for h, _, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    text = "\n".join("  " + "  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [heads, *cells])
    md = "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] + ["| " + " | ".join(c) + " |" for c in cells])
    return text, md


def write_results(cfg, result: dict, md: str) -> Path:
    """results.json, results.md and the resolved config.yaml under cfg.output_dir (align.runtime.paths rules);
    returns that directory."""
    import json

    import yaml

    from align.runtime.config import to_dict
    from align.runtime.runstate import write_atomic

    out = Path(cfg.output_dir)
    write_atomic(out / "results.json", json.dumps(result, indent=2))
    write_atomic(out / "results.md", md)
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out
