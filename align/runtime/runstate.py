"""Run state on disk: every output is written through a temporary name and a rename, every run saves
its resolved config beside its outputs, and a rerun reuses outputs (samples, tokenized data,
checkpoints) only when the part of the config that produced them is the same; otherwise it stops
with an error naming the keys that differ.

`resume` modes, shared by every job: auto (reuse matching state, start fresh when there is none),
never (discard any previous state and start over), must (fail unless there is matching state).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

RESUME_MODES = ("auto", "never", "must")


class StaleStateError(ValueError):
    """Outputs on disk were made under a different config (or are missing when resume is 'must')."""

    def __init__(self, where: str, differing: list[str], hint: str):
        self.where, self.differing = where, differing
        if differing:
            msg = f"{where} holds state made under a different config; differing keys: {', '.join(differing)}. {hint}"
        else:
            msg = f"{where}: {hint}"
        super().__init__(msg)


def write_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file and a rename, so a killed job never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Put the finished directory `tmp` at `target`. The previous `target` stays in place until the
    new one is complete, then moves aside and is removed (a directory cannot be renamed over)."""
    tmp, target = Path(tmp), Path(target)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def drop_keys(d: dict, ignore: Iterable[str]) -> dict:
    """The flattened config without the dotted keys (or key prefixes ending in '.') in `ignore`."""
    ignore = tuple(ignore)
    return {k: v for k, v in flatten(d).items() if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignore)}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new'."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """A hash of the names, sizes and modification times of every file under `path` (or of the file):
    changes when the data does, without reading it. The cache files `datasets` may add next to a saved
    dataset (cache-*.arrow) are not the data and are left out."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("cache-"))
    return digest([[str(p.relative_to(path) if p != path else p.name), p.stat().st_size, p.stat().st_mtime_ns] for p in files])


def check_resume(saved: dict | None, current: dict, mode: str, where: str, has_state: bool) -> bool:
    """Decide whether to reuse the state in `where`: True to resume, False to start fresh.

    saved: the config the state was made under (None if unknown); current: this run's config, both
    reduced to the keys that matter. Raises StaleStateError when they differ (modes auto, must), or
    when mode is 'must' and there is nothing to resume.
    """
    if mode not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {mode!r}")
    if mode == "never" or (not has_state and mode == "auto"):
        return False
    if not has_state:
        raise StaleStateError(where, [], "resume is 'must' but there is nothing to resume")
    diff = config_diff(saved or {}, current) if saved is not None else ["<no saved config>"]
    if diff:
        raise StaleStateError(where, diff, "Set resume=never to discard it and start over, or use another output directory.")
    return True


# Keys that say where or how fast a job runs, not what it computes: a rerun may change them freely.
WHERE_NOT_WHAT = frozenset({"output_dir", "replace", "resume", "ray_address", "device", "num_actors", "num_cpus",
                            "num_cpus_per_actor", "num_gpus_per_actor", "cache", "compile", "num_examples"})


def result_keys(cfg: dict) -> dict:
    """The flattened config without the WHERE_NOT_WHAT keys, at any depth: what a job's results depend on."""
    return {k: v for k, v in flatten(cfg).items() if k.rsplit(".", 1)[-1] not in WHERE_NOT_WHAT}


def claim_output(out: str | Path, cfg: dict, replace: bool, file: str = "config.yaml") -> list[str]:
    """Before a job writes into `out`: refuse when `out/file` (the config the results there were made
    under) differs from `cfg` in a key the results depend on, unless `replace` (the job was told to
    replace them). Returns the differing keys ('key: old -> new'), empty for a new directory or a rerun
    of the same config, so a job that may replace knows what changed. The caller saves `cfg` to `file`
    when its results are written, so a failed run leaves the old results and their config together."""
    import yaml

    saved_file = Path(out) / file
    if not saved_file.is_file():
        return []
    diff = config_diff(result_keys(yaml.safe_load(saved_file.read_text()) or {}), result_keys(cfg))
    if diff and not replace:
        raise StaleStateError(str(out), diff, "Set replace=true to replace them, or use another output_dir.")
    return diff


def check_output_owner(out: str | Path, owner: dict, replace: bool, hint: str) -> None:
    """Refuse to write into `out` when its saved config.yaml shows it holds another run's results:
    one whose `owner` keys (e.g. the training run's name and checkpoint storage) differ. `replace`
    (the job was told to start over) lets the new run take the directory. Raises StaleStateError
    naming the differing keys and `hint` (how to replace them or go elsewhere)."""
    import yaml

    saved_file = Path(out) / "config.yaml"
    if replace or not saved_file.is_file():
        return
    saved = flatten(yaml.safe_load(saved_file.read_text()) or {})
    diff = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in sorted(owner.items()) if k in saved and saved[k] != v]
    if diff:
        raise StaleStateError(str(out), diff, hint)
