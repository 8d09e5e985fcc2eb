"""Change the input size of a live timm ViT during training: the patch grid, the absolute position embedding and
that parameter's optimizer moments, for a curriculum over input sizes (the published one relaunches its script and
resamples the embedding and its Adam moments while loading the checkpoint; here it happens in place, in the same
process).

The position embedding becomes a new ``nn.Parameter`` (a fresh autograd leaf: DDP's reducer keeps the old leaf's
gradient accumulator, which remembers the old shape); each optimizer given is pointed at it and keeps its state
there. A DDP wrapper must be built again afterwards (its gradient buckets are sized at construction).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
from torch import nn


class ResizeError(ValueError):
    """The model cannot change its input size; ``str(err)`` is the one line shown to the user."""


def grid_of(model: nn.Module) -> tuple:
    return tuple(model.patch_embed.grid_size)


def input_size_of(model: nn.Module) -> int:
    """The square input size the model is set up for (``patch_embed.img_size``)."""
    return int(model.patch_embed.img_size[0])


def check_resizable(model: nn.Module, what: str) -> None:
    """A timm VisionTransformer (DeiT, ViT) with an absolute position embedding; else one line naming ``what``
    (models with relative position tables sized by the grid, e.g. BEiT-style ones, cannot follow)."""
    from timm.models.vision_transformer import VisionTransformer
    pe, pos = getattr(model, "patch_embed", None), getattr(model, "pos_embed", None)
    if not isinstance(model, VisionTransformer) or not hasattr(pe, "set_input_size") or not isinstance(pos, nn.Parameter):
        raise ResizeError(f"{what}: {type(model).__name__} has no absolute position embedding over a timm patch "
                          f"embedding, so its input size cannot follow a curriculum; use a DeiT/ViT model")
    if getattr(model, "no_embed_class", False) or getattr(model, "dynamic_img_size", False):
        raise ResizeError(f"{what}: {type(model).__name__} with no_embed_class or dynamic_img_size is not supported")


def resample_grid(t: torch.Tensor, old: tuple, new: tuple, prefix: int) -> torch.Tensor:
    """``[1, prefix + H*W, C]`` resampled to the ``new`` grid: bilinear, ``align_corners=False``, no antialiasing
    (the rule of the published curriculum, see ``efficienttrain/``); prefix tokens (CLS ...) unchanged."""
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(t, new_size=list(new), old_size=list(old), num_prefix_tokens=prefix,
                                  interpolation="bilinear", antialias=False, align_corners=False)


def set_input_size(model: nn.Module, size: int, optimizers: Iterable[Optional[torch.optim.Optimizer]] = ()) -> bool:
    """Set ``model`` (bare, not DDP) to ``size`` px: patch grid, position embedding, and the position embedding's
    state in each optimizer (every state tensor of its shape: Adam's moments). Returns whether anything changed."""
    check_resizable(model, "input_size")
    old = grid_of(model)
    model.patch_embed.set_input_size(img_size=size)
    new = grid_of(model)
    if new == old:
        return False
    pos = model.pos_embed
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    with torch.no_grad():
        fresh = nn.Parameter(resample_grid(pos.detach(), old, new, prefix), requires_grad=pos.requires_grad)
    model.pos_embed = fresh
    for opt in optimizers:
        if opt is None:
            continue
        for group in opt.param_groups:
            group["params"] = [fresh if p is pos else p for p in group["params"]]
        state = opt.state.pop(pos, None)
        if state is not None:
            opt.state[fresh] = {k: resample_grid(v, old, new, prefix) if torch.is_tensor(v) and v.shape == pos.shape
                                else v for k, v in state.items()}
    from timm.models._input import update_model_input_size
    update_model_input_size(model, model.patch_embed.img_size)
    return True


@contextlib.contextmanager
def at_input_size(model: nn.Module, size: int):
    """``model`` at ``size`` px for the duration (evaluation at the final size during a low-resolution phase), then
    back exactly as it was: the same position-embedding parameter is put back, not resampled twice."""
    old_size = input_size_of(model)
    if old_size == size:
        yield model
        return
    pos = model.pos_embed
    set_input_size(model, size)
    try:
        yield model
    finally:
        model.patch_embed.set_input_size(img_size=old_size)
        model.pos_embed = pos
