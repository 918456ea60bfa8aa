"""Where outputs and caches live. A job submitted with `ray job submit --working-dir .` runs inside a
temporary copy of the working directory that is deleted with the job, so relative output paths and
the default-task cache must not land there.

Relative paths resolve against the output root: $SWEETSPOT_ROOT if set; else, inside a submitted Ray
job, ~/sweetspot on the node that runs the job's driver; else the current directory. Inputs given as
relative paths are looked up under the root first (where an earlier job wrote them), then in the
current directory (files uploaded with the working directory).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def submitted_job_id() -> str | None:
    """The submission id when this process is the entrypoint of a `ray job submit` job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def output_root() -> Path | None:
    """The directory relative paths resolve against, or None for the current directory."""
    if os.environ.get("SWEETSPOT_ROOT"):
        return Path(os.environ["SWEETSPOT_ROOT"]).expanduser().resolve()
    if submitted_job_id():
        return Path("~/sweetspot").expanduser().resolve()
    return None


def resolve_output(path: str | Path) -> Path:
    """An absolute path for something a job writes."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = output_root()
    return (root / path) if root else path.resolve()


def resolve_input(path: str | Path) -> Path:
    """An absolute path for something a job reads: under the output root if it exists there, else
    relative to the current directory."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = output_root()
    if root and (root / path).exists():
        return root / path
    return path.resolve()


def cache_dir() -> Path:
    """Where built and extracted artefacts are cached (the default task, shipped models): $SWEETSPOT_CACHE,
    else .sweetspot_cache/ under the output root when there is one, else at the repository root."""
    if os.environ.get("SWEETSPOT_CACHE"):
        return Path(os.environ["SWEETSPOT_CACHE"]).expanduser()
    root = output_root()
    return (root if root else Path(__file__).resolve().parents[2]) / ".sweetspot_cache"
