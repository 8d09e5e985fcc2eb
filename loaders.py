"""The run's training and validation loaders, as the ``loader:`` key picks them.

``reference`` and ``fast`` are :func:`datasets.build_loaders`'s DataLoaders (what their workers hand over:
:mod:`fast_loader`); ``dali`` is NVIDIA DALI's pipeline over the same files and sampler (:mod:`dali_loader`), imported
only then: DALI is an optional install.
"""
from __future__ import annotations

import datasets


def build_loaders(cfg, rank: int, world_size: int, seed: int, extensions=None):
    """``(train_loader, val_loader, nb_classes)`` for one process (see :func:`datasets.build_loaders`)."""
    if cfg.loader == "dali":
        from dali_loader import build_dali_loaders
        return build_dali_loaders(cfg, rank, world_size, seed, extensions=extensions)
    return datasets.build_loaders(cfg, rank, world_size, seed, extensions=extensions)


__all__ = ["build_loaders"]
