"""Prompt sets: the embedded task's splits, a local JSON/JSONL/CSV/text file, a folder of
<split>.jsonl files, a saved `datasets` directory, or a Hugging Face dataset name, all returned as a
list of prompts: text, or a conversation (a list of {role, content} messages, as in TRL's
conversational datasets) that the policy's chat template renders (`align.engine.chat`)."""
from __future__ import annotations

import json

from align.engine.chat import Prompt, check_prompt
from align.runtime.config import ConfigError

DEFAULT = "default"
ARITHMETIC = "arithmetic"  # the instruct task's questions, as conversations (align.task.instruct_task)


def load_prompts(source: str, split: str = "test", column: str = "prompt", limit: int | None = None) -> list[Prompt]:
    """Load prompts: strings, or conversations (lists of {role, content} messages, `align.engine.chat`). `source`: "default" | "arithmetic" | file (.jsonl/.json/.csv/.txt) | saved dataset dir | hub name."""
    if source == DEFAULT:
        from align.task.default_task import ensure_default_task

        prompts = ensure_default_task().prompts(split)
    elif source == ARITHMETIC:
        from align.task.instruct_task import arithmetic_prompts

        prompts = arithmetic_prompts(split)
    else:
        prompts = _load_column(source, split, column)
    return prompts[:limit] if limit is not None else prompts


MAX_PROMPT_CHARS = 1_000_000  # a longer line is not a prompt (the model's context check comes later, in tokens)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def read_lines(path, source: str, field: str = "prompts.source") -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a UTF-8 text file; a line that is not UTF-8 or
    longer than MAX_PROMPT_CHARS is a ValueError naming the config field, the file and the line."""
    out = []
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{field}: line {i} of {source} is not UTF-8 (byte {e.start})") from None
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"{field}: line {i} of {source} has {len(line)} characters (at most {MAX_PROMPT_CHARS})")
        if line.strip():
            out.append((i, line))
    return out


def read_json_objects(path, source: str, field: str = "prompts.source") -> list[tuple[int, dict]]:
    """(line number, object) of a JSON Lines file; a line that is not a JSON object is a ValueError
    naming the field, the file and the line (read_lines' checks first)."""
    rows = []
    for i, line in read_lines(path, source, field):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field}: line {i} of {source} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{field}: line {i} of {source} is a JSON {type(row).__name__}, not an object")
        rows.append((i, row))
    return rows


def _load_column(source: str, split: str, column: str) -> list[Prompt]:
    import datasets

    from align.runtime.paths import resolve_input

    path = resolve_input(source)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():  # a folder of <split>.jsonl files
        path = path / f"{split}.jsonl"
    if not path.exists() and (path.suffix in FILE_SUFFIXES or source.startswith((".", "/", "~"))):
        raise ValueError(f"prompts.source: {source} does not exist (a {'/'.join(FILE_SUFFIXES)} file, a directory, "
                         "'default' or a dataset name)")
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        numbered = read_lines(path, source) if path.suffix == ".txt" else read_json_objects(path, source)
        if not numbered:
            raise ConfigError("prompts.source", "a non-empty prompt set", f"{source} (no non-blank line)")
        if path.suffix == ".txt":
            return [line for _, line in numbered]
        prompts = []
        for i, row in numbered:
            if column not in row:
                raise ValueError(f"prompts.column: {column!r} is missing in line {i} of {source}")
            prompts.append(check_prompt(row[column], f"prompts.column: line {i} of {source}: {column!r}"))
        return prompts
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
    # CSV and Parquet columns are typed by their reader: a column of numbers is read back as text
    values = [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in ds[column]]
    values = [check_prompt(x, f"prompts.column: row {i} of {source}: {column!r}") for i, x in enumerate(values)]
    if not values:
        raise ConfigError("prompts.source", "a non-empty prompt set", f"{source} (no rows)")
    return list(values)
