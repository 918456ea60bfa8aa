"""Search spaces written in YAML, turned into Ray Tune's. Each swept knob is one of

    {grid: [v1, v2, ...]}          every value, each in its own trial (tune.grid_search)
    {choice: [v1, v2, ...]}        one value per trial, drawn uniformly
    {uniform: [low, high]}         a float drawn uniformly
    {loguniform: [low, high]}      a float drawn uniformly in log space (low > 0)
    a plain value                  fixed for every trial

and is checked against the knob's allowed range, with errors that name the knob (`search.<knob>`).
"""
from __future__ import annotations

import math
from typing import Any

from align.runtime.config import ConfigError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")


def check_value(name: str, value: Any, low: float | None, high: float | None) -> None:
    """A ConfigError naming `name` unless `value` is a finite number in [low, high]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        span = f"a number in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(name, span, value)


def parse_space(search: dict, knobs: dict[str, tuple[float | None, float | None]]) -> dict:
    """Tune's param_space for the YAML `search` dict. knobs: the knobs this sweep may vary, each with
    its allowed [low, high] (None: unbounded)."""
    from ray import tune

    if not isinstance(search, dict) or not search:
        raise ConfigError("search", f"a mapping from knobs ({', '.join(knobs)}) to spaces", search)
    space = {}
    for knob, spec in search.items():
        name = f"search.{knob}"
        if knob not in knobs:
            raise ConfigError(name, f"one of the knobs {', '.join(knobs)}", knob)
        low, high = knobs[knob]
        if not isinstance(spec, dict):
            check_value(name, spec, low, high)
            space[knob] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(name, f"a number or one of {{{': [...]}, {'.join(SPACE_KINDS)}: [...]}}", spec)
        (kind, values), = spec.items()
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{name}.{kind}", "a non-empty list", values)
        for v in values:
            check_value(f"{name}.{kind}", v, low, high)
        if kind in ("grid", "choice"):
            space[knob] = (tune.grid_search if kind == "grid" else tune.choice)(list(values))
            continue
        if len(values) != 2 or not values[0] < values[1]:
            raise ConfigError(f"{name}.{kind}", "[low, high] with low < high", values)
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{name}.{kind}", "[low, high] with 0 < low < high", values)
        space[knob] = (tune.uniform if kind == "uniform" else tune.loguniform)(*values)
    return space


def grid_size(search: dict) -> int:
    """Trials one pass over the grid knobs makes (1 when nothing is a grid)."""
    return math.prod(len(s["grid"]) for s in search.values() if isinstance(s, dict) and "grid" in s)
