"""Typed job configs: one dataclass tree per job, loaded from YAML, validated before any work starts.

A YAML file mirrors its dataclass one to one. Unknown keys, wrong types and values out of range raise
`ConfigError`, whose message names the dotted field and what is allowed. Command-line overrides use
`key.sub=value` (the value is parsed as YAML, so `n=8`, `model.path=null`, `tags=[a,b]` all work).

Paths are resolved once, here, as the config loads (align.runtime.paths): a field typed `OutputPath`
becomes absolute under the output root, one typed `InputRef` becomes the absolute path of the file or
directory it names when one exists (under the root first, then the current directory) and stays as
given otherwise (a name: "default", a hub model or data set). The job, and the Ray workers the config
crosses to, then use the paths as they are, whatever their own working directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, field: str, allowed: str, got: Any = dataclasses.MISSING):
        self.field, self.allowed, self.got = field, allowed, got
        msg = f"config field '{field}': expected {allowed}"
        if got is not dataclasses.MISSING:
            msg += f", got {got!r}"
        super().__init__(msg)

    def __reduce__(self):  # raised in a Ray worker, it crosses to the driver as itself
        return (type(self), (self.field, self.allowed, self.got))


@dataclasses.dataclass(frozen=True)
class _PathRole:
    role: str  # "output" | "input"


OutputPath = Annotated[str, _PathRole("output")]  # something the job writes (a storage URI such as s3://... kept)
InputRef = Annotated[str, _PathRole("input")]  # a file or directory it reads, or a name that is not a path


def resolve_path_field(value: str, role: str) -> str:
    """The loaded form of a path field (see the module docstring)."""
    from align.runtime.paths import resolve_input, resolve_output

    if "://" in value:
        return value
    if role == "output":
        return str(resolve_output(value))
    local = resolve_input(value)
    return str(local) if local.exists() else value


def require(ok: bool, field: str, allowed: str, got: Any = dataclasses.MISSING) -> None:
    """Raise ConfigError(field, allowed, got) unless ok. Used in __post_init__ validators."""
    if not ok:
        raise ConfigError(field, allowed, got)


def _check_type(value: Any, tp: Any, field: str) -> Any:
    """Coerce/check one value against a type hint; recurse into dataclasses, lists and dicts."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:  # a path field: checked as its type here, resolved by resolve_paths
        return _check_type(value, typing.get_args(tp)[0], field)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, field)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(field, " or ".join(_type_name(a) for a in args), value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        require(value in allowed, field, "one of " + ", ".join(repr(a) for a in allowed), value)
        return value
    if origin in (list, tuple, Sequence):
        require(isinstance(value, (list, tuple)), field, _type_name(tp), value)
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        items = [_check_type(v, arg, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        require(isinstance(value, dict), field, "a mapping", value)
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _check_type(v, vt, f"{field}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        require(isinstance(value, dict), field, f"a mapping for {tp.__name__}", value)
        return from_dict(tp, value, prefix=f"{field}.")
    if tp is float:
        # YAML reads 1e-3 as a string and 1 as an int; accept both as floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(field, "a number", value) from None
        require(isinstance(value, (int, float)) and not isinstance(value, bool), field, "a number", value)
        return float(value)
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), field, "an integer", value)
        return value
    if tp is bool:
        require(isinstance(value, bool), field, "true or false", value)
        return value
    if tp is str:
        require(isinstance(value, str), field, "a string", value)
        return value
    return value


def resolve_paths(value: Any, tp: Any = None) -> Any:
    """`value` with its path fields (OutputPath, InputRef) resolved, in its own sections too; the same
    object when nothing changes (a config already loaded, or one without paths)."""
    tp = type(value) if tp is None else tp
    origin = typing.get_origin(tp)
    if origin is Annotated:
        marks = [m for m in typing.get_args(tp)[1:] if isinstance(m, _PathRole)]
        return resolve_path_field(value, marks[0].role) if marks and isinstance(value, str) else value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if value is not None and arg is not type(None):
                resolved = resolve_paths(value, arg)
                if resolved != value:
                    return resolved
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value), include_extras=True)
        changes = {}
        for f in dataclasses.fields(value):
            old = getattr(value, f.name)
            new = resolve_paths(old, hints[f.name])
            if new != old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return _type_name(typing.get_args(tp)[0])
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and checking every type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, "a mapping", data)
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(prefix + unknown[0], "one of the known keys: " + ", ".join(sorted(fields)))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check_type(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(prefix + name, f"a value ({_type_name(hints[name])}); it is required")
    try:
        return resolve_paths(cls(**kwargs))
    except ConfigError as e:
        if prefix and not e.field.startswith(prefix):
            raise ConfigError(prefix + e.field, e.allowed, e.got) from None
        raise


def to_dict(cfg: Any) -> dict:
    """The plain-dict form of a config, as saved next to a job's outputs."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override of the form key.sub=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{p}' to be a mapping")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(key, f"a YAML value (quote strings holding {{}} [] : or #; {problem})", raw) from None
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read YAML at `path` (optional), apply overrides, and build a validated `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", "an existing YAML file", str(path))
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError("--config", f"a UTF-8 text file ({path}: byte {e.start} is not UTF-8)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError("--config", f"valid YAML ({path}{where}: {problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(str(path), "a YAML mapping at the top level", type(data).__name__)
    return from_dict(cls, apply_overrides(data, overrides))


def parse_args(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """`--config configs/X.yaml key.sub=value ...` -> a validated config of type `cls`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file mirroring the job's config dataclass")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def run_job(cls: type[T], run, argv: Sequence[str] | None = None, description: str = ""):
    """The body of every job's main(): log to the console, build the config from the command line,
    run it. A bad config, bad input data or outputs made under another config end the process with
    the message and exit status 2, not a traceback."""
    import logging
    import sys

    from align.runtime.runstate import StaleStateError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(parse_args(cls, argv, description=description))
    except (ConfigError, StaleStateError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
