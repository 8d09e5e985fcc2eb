"""Plug-in config sections that change what the model learns from, not what it computes (e.g. dense teacher labels).

A method (:mod:`methods`) patches the model and follows the training clock; an extension only swaps parts of the
recipe around the model: it may wrap the training set, replace the criterion and check the built model. Each one is
a package beside this file with an ``extension.py`` that registers an :class:`Extension` subclass under its config
section name (found the way :mod:`methods` finds ``method.py``), so the generic code never names one:

    @register_extension
    class Mine(Extension):
        name = "mine"                 # the config section `mine:` (and --mine.KEY overrides)
        Config = MineConfig           # its dataclass; field metadata {"choices": (...)} limits a value

Extension sections are not methods: they are not in ``cfg.active_methods()`` and no :class:`methods.MethodSet` sees
them. :class:`ExtensionSet` fans the hooks out to the sections a config has.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Type

from torch import nn
from torch.utils.data import Dataset

from plugins import Registry


class ExtensionError(ValueError):
    """A mistake in an extension's section or in how it fits the rest of the config: one line naming the key."""


class Extension:
    """One active extension section of a run. Every hook has a do-nothing default."""

    name: ClassVar[str] = ""                  # the config section
    Config: ClassVar[type] = type(None)       # the section's dataclass

    def __init__(self, section: Any, cfg: Any):
        self.section, self.cfg = section, cfg

    @classmethod
    def validate(cls, section: Any, cfg: Any) -> None:
        """Checks across the config (e.g. keys this extension cannot run with); raise :class:`ExtensionError`."""

    def check_model(self, model: nn.Module) -> None:
        """Checks of the built model (before any weights load); raise :class:`ExtensionError`."""

    def train_dataset(self, dataset: Dataset, cfg: Any) -> Dataset:
        """The training split as this extension feeds it (``cfg``: the loader's config, the epoch's recipe applied)."""
        return dataset

    def criterion(self, nb_classes: int) -> Optional[nn.Module]:
        """A loss that replaces the default criterion, mixup and distillation (``None``: keep the default). It is
        called as ``criterion(images, outputs, targets)`` with the targets the extension's dataset gives."""
        return None


# ---------------------------------------------------------------------------------------------- the registry
_REGISTRY: Registry[Extension] = Registry("extension", "extension")
register_extension = _REGISTRY.register       # class decorator: ``cls`` is the extension of section ``cls.name``
unregister_extension = _REGISTRY.unregister


def extension_classes() -> Dict[str, Type[Extension]]:
    """Section name -> extension class, for every registered extension (from ``<package>/extension.py``)."""
    return _REGISTRY.classes()


def extension_class(name: str) -> Type[Extension]:
    classes = extension_classes()
    if name not in classes:
        raise ExtensionError(f"unknown extension '{name}' (known: {', '.join(sorted(classes)) or 'none'})")
    return classes[name]


# ---------------------------------------------------------------------------------------------- a run's extensions
class ExtensionSet:
    """The extension sections of a run, in config order; fans every hook out to them."""

    def __init__(self, extensions: Sequence[Extension]):
        self.extensions = list(extensions)

    @classmethod
    def from_config(cls, cfg: Any) -> "ExtensionSet":
        sections = getattr(cfg, "extensions", None) or {}
        return cls([extension_class(name)(section, cfg) for name, section in sections.items() if section is not None])

    def __iter__(self) -> Iterator[Extension]:
        return iter(self.extensions)

    def __len__(self) -> int:
        return len(self.extensions)

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.extensions]

    def check_model(self, model: nn.Module) -> None:
        for e in self.extensions:
            e.check_model(model)

    def train_dataset(self, dataset: Dataset, cfg: Any) -> Dataset:
        for e in self.extensions:
            dataset = e.train_dataset(dataset, cfg)
        return dataset

    def criterion(self, nb_classes: int) -> Optional[nn.Module]:
        """The one extension criterion (``None``: the default one); two extensions may not both replace it."""
        found = [(e.name, c) for e in self.extensions for c in [e.criterion(nb_classes)] if c is not None]
        if len(found) > 1:
            raise ExtensionError(f"{found[0][0]} and {found[1][0]} both replace the training criterion; use one of them")
        return found[0][1] if found else None
