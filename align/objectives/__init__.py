"""Training objectives by name: what the trainer (actors/trainer.py) builds and minimises.

To add one, write one module holding one dataclass decorated with @register_objective("name") that
implements align.objectives.base.Objective (ObjectiveBase gives the common defaults). Its fields are
the job's config section; the instance itself crosses to the Ray workers. A module in this package is
found by its plain name ("preference"); one anywhere else by "your.module:name", with no project file
edited.
"""
from __future__ import annotations

import importlib
import pkgutil

from align.runtime.config import ConfigError

OBJECTIVES: dict[str, type] = {}
_builtins_loaded = False


def register_objective(name: str):
    """Class decorator: file the objective under `name` (also its NAME, what runs and models record)."""
    def register(cls: type) -> type:
        known = OBJECTIVES.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"objective {name!r} is registered twice: {known.__module__}.{known.__qualname__} "
                             f"and {cls.__module__}.{cls.__qualname__}")
        cls.NAME = name
        OBJECTIVES[name] = cls
        return cls

    return register


def load_builtins() -> None:
    """Import every module of this package once, so the built-ins register themselves."""
    global _builtins_loaded
    if not _builtins_loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _builtins_loaded = True


def objective_class(name: str, field: str = "objective") -> type:
    """The class registered as `name` ("preference") or, for "some.module:name", as name by some.module
    once imported. Unknown: a ConfigError naming `field` and listing the known objectives."""
    load_builtins()
    module, qualified, short = name.rpartition(":")
    if qualified:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(field, f"module:name with an importable module ({e})", name) from None
    if short not in OBJECTIVES:
        raise ConfigError(field, f"one of {', '.join(sorted(OBJECTIVES))} or module:name of one registered "
                          "in your own module", name)
    return OBJECTIVES[short]
