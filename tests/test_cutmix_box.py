"""The published cutmix box (timm < 1.0, which every published code base ran) against timm 1.x's."""
import numpy as np
import pytest
import torch
from timm.data import Mixup

import cutmix


def old_timm_box(img_shape, lam, seed):
    """timm 0.4.12's ``rand_bbox`` as written there: ``cy +/- cut // 2``."""
    np.random.seed(seed)
    ratio = np.sqrt(1 - lam)
    h, w = img_shape[-2:]
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = np.random.randint(0, h), np.random.randint(0, w)
    return (np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h), np.clip(cx - cw // 2, 0, w),
            np.clip(cx + cw // 2, 0, w))


@pytest.mark.parametrize("seed", range(20))
def test_the_box_is_the_published_one(seed):
    lam = 0.3 + 0.02 * seed
    np.random.seed(seed)
    assert tuple(cutmix.published_rand_bbox((3, 31, 29), lam)) == old_timm_box((3, 31, 29), lam, seed)


def test_mixup_with_the_published_box_differs_from_timm_1_only_in_the_box():
    kwargs = dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.0, label_smoothing=0.1, num_classes=10)
    x = torch.arange(2 * 3 * 15 * 15, dtype=torch.float32).view(2, 3, 15, 15)
    y = torch.tensor([1, 7])
    diffs = 0
    for seed in range(10):
        np.random.seed(seed)
        a, ta = cutmix.PublishedBoxMixup(**kwargs)(x.clone(), y.clone())
        np.random.seed(seed)
        b, tb = Mixup(**kwargs)(x.clone(), y.clone())
        cut_a, cut_b = (a[1] != x[1]).any(0), (b[1] != x[1]).any(0)
        assert bool((cut_a & ~cut_b).sum() == 0)                       # the published box inside timm 1.x's
        assert torch.allclose(ta.sum(1), tb.sum(1))
        diffs += int(not torch.equal(cut_a, cut_b))
    assert diffs > 0
    assert cutmix.timm_mixup.rand_bbox is not cutmix.published_rand_bbox      # timm's module is left as it was
