"""Training objectives by name: what the trainer (actors/trainer.py) builds and minimises.

To add one, write one module holding one dataclass decorated with @register_objective("name") that
implements align.objectives.base.Objective (ObjectiveBase gives the common defaults). Its fields are
the job's config section; the instance itself crosses to the Ray workers. A module in this package is
found by its plain name ("preference"); one anywhere else by "your.module:name" (align.runtime.plugins),
with no project file edited.
"""
from __future__ import annotations

from align.runtime.plugins import Registry

OBJECTIVES: Registry[type] = Registry("objective", __name__, skip=("base",))


def register_objective(name: str):
    """Class decorator: file the objective under `name`, qualified as "module:name" outside this
    package; the qualified name is also its NAME, what runs and saved models record."""
    def register(cls: type) -> type:
        cls.NAME = OBJECTIVES.add(name, cls.__module__, cls,
                                  same=lambda a, b: (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__))
        return cls

    return register


def objective_class(name: str, field: str = "objective") -> type:
    """The class registered as `name` ("preference", or "some.module:name" for one registered in
    some.module, imported here). Unknown: a ConfigError naming `field` and listing the known ones."""
    return OBJECTIVES.get(name, field)
