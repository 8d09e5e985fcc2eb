"""The registry behind methods and extensions: plug-in classes by config-section name, found in the packages beside
this file that hold a module of a given name (``method.py``, ``extension.py``), imported on first use."""
from __future__ import annotations

import importlib
import os
from typing import Dict, Generic, Type, TypeVar

ROOT = os.path.dirname(os.path.abspath(__file__))
T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` names the plug-ins in messages ("method"); ``module`` is the file each package holds ("method")."""

    def __init__(self, kind: str, module: str):
        self.kind, self.module = kind, module
        self._classes: Dict[str, Type[T]] = {}
        self._discovered = False

    def register(self, cls: Type[T]) -> Type[T]:
        """Class decorator: make ``cls`` the plug-in of config section ``cls.name``."""
        name = getattr(cls, "name", "")
        if not name or not name.isidentifier():
            raise TypeError(f"{cls.__name__}.name must be an identifier: it is the config section")
        if name in self._classes and self._classes[name] is not cls:
            article = "an" if self.kind[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.kind} named '{name}' is already registered "
                             f"({self._classes[name].__qualname__})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    def classes(self) -> Dict[str, Type[T]]:
        """Section name -> class, by name (whatever imported them first)."""
        if not self._discovered:
            self._discovered = True
            for entry in sorted(os.listdir(ROOT)):
                package = os.path.join(ROOT, entry)
                if (os.path.isfile(os.path.join(package, f"{self.module}.py"))
                        and os.path.isfile(os.path.join(package, "__init__.py"))):
                    importlib.import_module(f"{entry}.{self.module}")
        return dict(sorted(self._classes.items()))
