"""Model factory: any timm ViT by name, with ToE patched in when the config has a ``toe:`` section.

Nothing here forks or re-registers timm code: the returned model is exactly ``timm.create_model(...)``, plus a
parameter-free ``model.toe`` operator and its forward pre-hook. Its ``state_dict`` is that of the plain model.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import timm
from torch import nn

from toe import apply_toe

from . import lvvit  # noqa: F401  (registers lvvit_t/s/m/l with timm)


def create_model(cfg, num_classes: int, **overrides: Any) -> nn.Module:
    """Build ``cfg.model`` for ``num_classes`` classes at ``cfg.input_size``, then apply ToE if configured."""
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
    if cfg.toe is not None:
        apply_toe(model, cfg.toe.schedule(), insert_block=cfg.toe.insert_block, sparse_eval=cfg.toe.sparse_eval,
                  distance_mode=cfg.toe.distance_mode)
    return model


def num_patches(model: nn.Module) -> Optional[int]:
    """Patch tokens of a ViT at its configured input size (``None`` if the model has no patch embedding)."""
    pe = getattr(unwrap(model), "patch_embed", None)
    return getattr(pe, "num_patches", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
