"""The job tables, derived from the code: which entry points a pipeline stage may run, and which
knobs a tune.train sweep may vary for each training job.

A job is a module of this package with `run(cfg: SomeConfig)`; adding one (say a trainer for a new
objective) makes it a pipeline stage. A training job becomes sweepable when a section of its config
is a dataclass with a SWEEPABLE table (the objective's fields tune.train may vary, with their ranges),
as every registered objective (align.objectives) and vBoN's params have.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing

# Modules that run other jobs (not stages themselves), and those that are not jobs.
NOT_STAGES = ("pipeline", "report", "catalog", "cli", "sections", "tables", "training")


def config_class(job: str) -> type:
    """The typed config dataclass of jobs.<job> (the annotation of its run's `cfg`)."""
    return typing.get_type_hints(importlib.import_module(f"jobs.{job}").run)["cfg"]


@functools.cache
def stages() -> tuple[str, ...]:
    """Every job a pipeline stage may run: the modules of jobs/ that have run(cfg), sorted."""
    import jobs

    found = []
    for info in pkgutil.iter_modules(jobs.__path__):
        if not info.ispkg and info.name not in NOT_STAGES and not info.name.startswith("_"):
            if callable(getattr(importlib.import_module(f"jobs.{info.name}"), "run", None)):
                found.append(info.name)
    return tuple(sorted(found))


def sweepable(cfg_class: type) -> dict[str, tuple]:
    """The knobs of a job's config that a sweep may vary, "section.field" -> (lo, hi): the SWEEPABLE
    of each section whose dataclass declares one."""
    hints = typing.get_type_hints(cfg_class)
    knobs = {}
    for f in dataclasses.fields(cfg_class):
        table = getattr(hints[f.name], "SWEEPABLE", None)
        if dataclasses.is_dataclass(hints[f.name]) and table:
            knobs.update({f"{f.name}.{k}": bounds for k, bounds in table.items()})
    return knobs


@functools.cache
def sweeps() -> dict[str, dict[str, tuple]]:
    """Each training job (a stage whose config has `train`) that has knobs to sweep -> its knobs."""
    table = {}
    for job in stages():
        cls = config_class(job)
        if "train" in {f.name for f in dataclasses.fields(cls)} and (knobs := sweepable(cls)):
            table[job] = knobs
    return table
