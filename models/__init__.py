"""Model factory: any timm ViT by name, patched by the run's active methods.

Nothing here forks or re-registers timm code: the returned model is exactly ``timm.create_model(...)``, changed in
place by each active method's ``patch`` (ToE adds a parameter-free operator and a forward pre-hook; its
``state_dict`` is that of the plain model). Model variants a method needs are registered with timm by its package.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import timm
from torch import nn

from methods import MethodError, MethodSet, registry

from . import lvvit  # noqa: F401  (registers lvvit_t/s/m/l with timm)


def create_model(cfg, num_classes: int, methods: Optional[MethodSet] = None, **overrides: Any) -> nn.Module:
    """Build ``cfg.model`` for ``num_classes`` classes at ``cfg.input_size``, then let every active method patch it
    (``methods``: the run's :class:`MethodSet`, built from ``cfg`` when not given; ``MethodSet([])`` for none)."""
    registry()          # imports every method package, which registers the model variants methods need
    kwargs: Dict[str, Any] = dict(pretrained=False, num_classes=num_classes, drop_rate=cfg.drop,
                                  drop_path_rate=cfg.drop_path, img_size=cfg.input_size)
    kwargs.update(cfg.model_kwargs)
    kwargs.update(overrides)
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{cfg.model.split('_')[0]}*")[:8]
            raise ValueError(f"model: unknown timm model '{cfg.model}' (similar: {', '.join(close) or 'none'})") from None
        raise
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    (MethodSet.from_config(cfg) if methods is None else methods).patch(model)
    return model


def num_patches(model: nn.Module) -> Optional[int]:
    """Patch tokens of a ViT at its configured input size (``None`` if the model has no patch embedding)."""
    pe = getattr(unwrap(model), "patch_embed", None)
    return getattr(pe, "num_patches", None)


def vit_problem(model: nn.Module) -> Optional[str]:
    """Why ``model`` is not a timm-style ViT (patch tokens from a ``patch_embed``, then ``blocks`` in a
    Sequential / ModuleList, which the methods hook), or ``None`` when it is one: the one is-it-a-ViT rule."""
    blocks = getattr(unwrap(model), "blocks", None)
    if not num_patches(model) or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        return f"{type(unwrap(model)).__name__} has no patch tokens and `blocks`"
    return None


def check_vit(model: nn.Module, who: str) -> int:
    """The patch tokens of a timm-style ViT; else one :class:`methods.MethodError` line starting with ``who`` (the
    method's section) that says why (:func:`vit_problem`)."""
    problem = vit_problem(model)
    if problem:
        raise MethodError(f"{who}: {problem}; {who} needs a timm-style ViT (DeiT, vit_*, lvvit_*)")
    return int(num_patches(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
