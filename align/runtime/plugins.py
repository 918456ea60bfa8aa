"""Named extensions of one kind (reward kinds, training objectives), found the same way for both.

The built-ins are the modules of one package, imported once on first lookup and named plainly
("vader", "preference"). An extension in any other importable module is named "module:name" and that
module is imported on first use, also inside a Ray worker (which gets the driver's working directory
on its path): a user adds one by writing one module, with no project file edited.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from align.runtime.config import ConfigError

V = TypeVar("V")


class Registry(Generic[V]):
    """name -> V for one kind of extension whose built-ins live in `package` (its modules named in
    `skip`, e.g. the base classes, are not imported as built-ins)."""

    def __init__(self, what: str, package: str, skip: tuple[str, ...] = ()):
        self.what, self.package, self.skip = what, package, skip
        self.entries: dict[str, V] = {}
        self._builtins_loaded = False

    def qualified(self, name: str, module: str) -> str:
        """The name an entry of `module` is found by: plain for a built-in, "module:name" otherwise."""
        return name if module.startswith(self.package + ".") else f"{module}:{name}"

    def add(self, name: str, module: str, value: V, same=lambda a, b: a is b) -> str:
        """File `value` (defined in `module`) and return its qualified name. A second, different entry
        under the same name is an error; the same one again (a module imported twice) is not."""
        key = self.qualified(name, module)
        known = self.entries.get(key)
        if known is not None and not same(known, value):
            raise ValueError(f"{self.what} {key!r} is registered twice: by {known!r} and by {value!r}")
        self.entries[key] = value
        return key

    def load_builtins(self) -> None:
        if not self._builtins_loaded:
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                if info.name not in self.skip:
                    importlib.import_module(f"{self.package}.{info.name}")
            self._builtins_loaded = True

    def names(self) -> list[str]:
        """The built-ins, then those registered by other modules (named "module:name")."""
        self.load_builtins()
        return sorted(self.entries, key=lambda name: (":" in name, name))

    def get(self, name, field: str) -> V:
        """The entry `name`; an unknown name or an unimportable module is a ConfigError naming `field`
        and listing the known names."""
        if isinstance(name, str) and ":" in name and name not in self.entries:
            try:
                importlib.import_module(name.split(":", 1)[0])
            except ImportError as e:
                raise ConfigError(field, f"'module:name' with an importable module ({e})", name) from None
        self.load_builtins()
        if name not in self.entries:
            raise ConfigError(field, "one of " + " | ".join(self.names()) +
                              f" (or 'module:name' of a {self.what} registered in your own module)", name)
        return self.entries[name]
