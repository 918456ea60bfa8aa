"""Prompt sets: the embedded task's splits, a local JSON/JSONL/CSV/text file, a folder of
<split>.jsonl files, a saved `datasets` directory, or a Hugging Face dataset name, all returned as a
plain list of strings."""
from __future__ import annotations

import json

DEFAULT = "default"


def load_prompts(source: str, split: str = "test", column: str = "prompt", limit: int | None = None) -> list[str]:
    """Load prompt strings. `source`: "default" | file (.jsonl/.json/.csv/.txt) | saved dataset dir | hub name."""
    if source == DEFAULT:
        from align.default_task import ensure_default_task

        prompts = ensure_default_task().prompts(split)
    else:
        prompts = _load_column(source, split, column)
    return prompts[:limit] if limit is not None else prompts


def _load_column(source: str, split: str, column: str) -> list[str]:
    import datasets

    from align.paths import resolve_input

    path = resolve_input(source)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():  # a folder of <split>.jsonl files
        path = path / f"{split}.jsonl"
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        numbered = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
        if path.suffix == ".txt":
            return [line for _, line in numbered]
        rows = [(i, json.loads(line)) for i, line in numbered]
        missing = [i for i, r in rows if column not in r]
        if missing:
            raise ValueError(f"prompts.column: {column!r} is missing in line {missing[0]} of {source}")
        return [str(r[column]) for _, r in rows]
    if path.is_file():
        fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if fmt is None:
            raise ValueError(f"prompts.source: unsupported file type {path.suffix!r} (use .jsonl, .json, .csv, .parquet, .txt)")
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    elif path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, split=split)
    if column not in ds.column_names:
        raise ValueError(f"prompts.column: {column!r} is not a column of {source} (columns: {ds.column_names})")
    return [str(x) for x in ds[column]]
