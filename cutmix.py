"""The cutmix box of the published code bases (DeiT, ToE, PSS, Tri-Level, EfficientTrain, SimMIM), all on timm < 1.0.

timm 1.x cuts a box side of odd length ``c`` in full (``cy - c // 2`` to ``cy + (c + 1) // 2``); timm 0.3-0.9 cut
``c - 1`` pixels (to ``cy + c // 2``), and the mixed targets follow the box (``correct_lam``). ``cutmix_box:
published`` (the table configs) trains with the published box; ``timm`` with timm 1.x's.
"""
from __future__ import annotations

import contextlib

import numpy as np
from timm.data import Mixup
from timm.data import mixup as timm_mixup


def published_rand_bbox(img_shape, lam, margin=0., count=None):
    """timm < 1.0's ``rand_bbox``: a square box of side ``int(side * sqrt(1 - lam))`` around a uniform centre,
    ``c // 2`` on both sides of it (an odd side loses a pixel), clipped to the image."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = np.random.randint(0 + margin_y, img_h - margin_y, size=count)
    cx = np.random.randint(0 + margin_x, img_w - margin_x, size=count)
    yl, yh = np.clip(cy - cut_h // 2, 0, img_h), np.clip(cy + cut_h // 2, 0, img_h)
    xl, xh = np.clip(cx - cut_w // 2, 0, img_w), np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


@contextlib.contextmanager
def _box(rand_bbox):
    """timm's mixup module with another box function for the duration of one call (timm looks it up there)."""
    own = timm_mixup.rand_bbox
    timm_mixup.rand_bbox = rand_bbox
    try:
        yield
    finally:
        timm_mixup.rand_bbox = own


class PublishedBoxMixup(Mixup):
    """timm's :class:`~timm.data.Mixup` (same draws, same targets) with the published cutmix box."""

    def __call__(self, x, target):
        with _box(published_rand_bbox):
            return super().__call__(x, target)
