"""The reward kinds, by name: what each builds, whether it needs a path, its typed params. Config
validation, the scorer factory (actors.scorer.make_scorer) and Serve's checks all read this one table.

A reward spec is a flat dict, the form configs hold and Ray actors receive:
    {"kind": "brevity", "path": None, "device": "auto", "max_words": 12}
`kind`, `path`, `device` and `embedder` are common; every other key is one of the kind's params.
A kind is a module's `@register_reward("name", ...)` on its builder, `build(params, path, device)`.
Built-in kinds live in this package and are found by name; a kind registered in any other importable
module is named "package.module:name" (align.runtime.plugins: imported on first use, Ray workers too).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from align.runtime.config import ConfigError, from_dict
from align.runtime.plugins import Registry

COMMON_KEYS = ("kind", "path", "device", "embedder")


@dataclass(frozen=True)
class RewardKind:
    name: str
    build: Callable  # build(params, path: str | None, device: str) -> align.rewards.base.Scorer
    params: type | None  # dataclass of the kind's own keys (validated, defaults filled); None: it has none
    needs_path: bool  # a model directory or hub name in `path`
    path_problem: Callable[[Path], str | None] | None  # why a local path cannot be this kind (checked at load)
    nested: str | None  # the param holding a list of component specs (their paths shipped and resolved too)
    scores_within_prompt: bool = False  # a sample's score depends on the other samples of its prompt (pi_0's)


KINDS: Registry[RewardKind] = Registry("reward kind", __package__, skip=("base", "registry"))


def register_reward(name: str, *, params: type | None = None, needs_path: bool = False,
                    path_problem: Callable[[Path], str | None] | None = None, nested: str | None = None,
                    scores_within_prompt: bool = False):
    """Decorator: register `build(params, path, device) -> Scorer` as reward kind `name`."""
    def decorate(build: Callable) -> Callable:
        qualified = KINDS.qualified(name, build.__module__)
        KINDS.add(name, build.__module__,
                  RewardKind(qualified, build, params, needs_path, path_problem, nested, scores_within_prompt),
                  same=lambda a, b: (a.build.__module__, a.build.__qualname__) == (b.build.__module__, b.build.__qualname__))
        return build
    return decorate


def known_kinds() -> list[str]:
    """The built-in kinds, then those registered by other modules (named "module:kind")."""
    return KINDS.names()


def reward_kind(name, field: str = "reward.kind") -> RewardKind:
    """The registered kind `name` ("vader", or "module:name" for one registered elsewhere)."""
    return KINDS.get(name, field)


def spec_params(spec: dict, field: str = "reward", params_field: str | None = None):
    """The kind's typed params from a flat spec (every key but the common ones), validated; errors
    name `params_field` + the key (default: `field` + the key)."""
    kind = reward_kind(spec.get("kind"), f"{field}.kind" if field else "kind")
    values = {k: v for k, v in spec.items() if k not in COMMON_KEYS}
    prefix = (params_field if params_field is not None else field)
    prefix = f"{prefix}." if prefix else ""
    if kind.params is None:
        if values:
            raise ConfigError(prefix + sorted(values)[0], f"no params for reward kind {kind.name!r}")
        return None
    return from_dict(kind.params, values, prefix=prefix)


def check_spec(spec: dict, field: str = "reward", params_field: str | None = None, check_paths: bool = True) -> dict:
    """Validate a flat spec before any work (kind known, path given when needed and loadable, params
    typed and in range); returns it with the kind's defaults filled in. ConfigError names the field."""
    if not isinstance(spec, dict):
        raise ConfigError(field or "reward", "a mapping with a 'kind'", spec)
    at = f"{field}." if field else ""
    kind = reward_kind(spec.get("kind"), at + "kind")
    path = spec.get("path")
    if kind.needs_path and not path:
        raise ConfigError(at + "path", f"a reward-model directory or hub name when kind is {kind.name!r}", path)
    if path and check_paths and kind.path_problem is not None:
        from align.runtime.paths import resolve_input

        local = resolve_input(path)
        problem = f"{path!r} does not exist" if not local.exists() else kind.path_problem(local)
        if problem:
            raise ConfigError(at + "path", f"a directory this kind can load ({problem})", path)
    params = spec_params(spec, field, params_field)
    filled = dataclasses.asdict(params) if params is not None else {}
    return {**{k: spec[k] for k in COMMON_KEYS if k in spec}, **filled}


def map_paths(spec: dict, fn: Callable) -> dict:
    """The spec with fn applied to its `path` and to those of its nested component specs."""
    out = dict(spec)
    if out.get("path") is not None:
        out["path"] = fn(out["path"])
    nested = reward_kind(out["kind"]).nested
    if nested and out.get(nested):
        out[nested] = [map_paths(c, fn) for c in out[nested]]
    return out


def build_scorer(spec: dict):
    """The Scorer of a flat spec whose paths are local (see actors.scorer.make_scorer for specs
    shipped to Ray actors); "embedder" attaches sentence embeddings (RBoN-WD)."""
    kind = reward_kind(spec.get("kind"))
    device = spec.get("device", "auto")
    scorer = kind.build(spec_params(spec), spec.get("path"), device)
    if spec.get("embedder"):
        scorer.attach_embedder(spec["embedder"], device)
    return scorer
