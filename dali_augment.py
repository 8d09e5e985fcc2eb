"""The recipe's RandAugment for ``loader: dali`` (:mod:`dali_loader`), read from timm's objects.

RandAugment: timm parses the recipe's ``aa`` string (``rand-m9-mstd0.5-inc1``: n ops per image, magnitude m of 10,
magnitude noise, the increasing op set); :func:`rand_augment_plan` reads the ops timm built and maps each to a DALI
augmentation whose magnitude table is timm's own level-to-argument rule, at 0.1 of timm's magnitude per bin, so
``m9`` is bin 90 and the magnitude noise is drawn per op as in timm. :func:`apply_rand_augment` then follows timm's
``RandAugment``: per layer one op drawn uniformly, applied with timm's probability (0.5), its sign drawn per sample.

This module imports DALI only inside its functions, so it imports without it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

BINS_PER_LEVEL = 10        # DALI magnitude bins per unit of timm's magnitude (timm's scale is 0..10)


class AugmentError(ValueError):
    """A RandAugment setting DALI cannot follow; ``str(err)`` is the one line shown to the user."""


# ------------------------------------------------------------------------------------------------ RandAugment
def _enhance(level: float) -> float:          # timm _enhance_increasing_level_to_arg, the sign left to DALI
    return 0.9 * level


def _enhance_plain(level: float) -> float:    # timm _enhance_level_to_arg (factor 0.1..1.9), shifted by -1
    return level * 1.8 + 0.1 - 1.0


# timm op name -> (DALI augmentation name, timm's argument at level (magnitude / 10), randomly negated)
TIMM_TO_DALI = {
    "AutoContrast": ("auto_contrast", None, False),
    "Equalize": ("equalize", None, False),
    "Invert": ("invert", None, False),
    "Rotate": ("rotate", lambda lv: 30.0 * lv, True),
    # DALI's warp maps input to output, PIL's transform output to input: the same sign moves the other way
    "ShearX": ("shear_x", lambda lv: -0.3 * lv, True),
    "ShearY": ("shear_y", lambda lv: -0.3 * lv, True),
    "TranslateXRel": ("translate_x", lambda lv: -0.45 * lv, True),
    "TranslateYRel": ("translate_y", lambda lv: -0.45 * lv, True),
    "PosterizeIncreasing": ("posterize", lambda lv: 4 - int(lv * 4), False),     # bits kept
    "Posterize": ("posterize", lambda lv: int(lv * 4), False),
    "PosterizeOriginal": ("posterize", lambda lv: int(lv * 4) + 4, False),
    "SolarizeIncreasing": ("solarize", lambda lv: 256 - int(lv * 256), False),   # threshold
    "Solarize": ("solarize", lambda lv: int(lv * 256), False),
    "SolarizeAdd": ("solarize_add", lambda lv: int(lv * 110), False),
    "ColorIncreasing": ("color", _enhance, True),
    "ContrastIncreasing": ("contrast", _enhance, True),
    "BrightnessIncreasing": ("brightness", _enhance, True),
    "SharpnessIncreasing": ("sharpness", _enhance, True),
    "Color": ("color", _enhance_plain, False),
    "Contrast": ("contrast", _enhance_plain, False),
    "Brightness": ("brightness", _enhance_plain, False),
    "Sharpness": ("sharpness", _enhance_plain, False),
}


@dataclass
class RandAugmentPlan:
    """What timm's RandAugment of the recipe does, in DALI's terms."""
    ops: List[str]               # timm op names, in timm's order
    num_layers: int
    prob: float                  # each drawn op is applied with this probability
    magnitude: float             # timm's magnitude (0..10)
    magnitude_std: float         # timm's per-op magnitude noise (0: none; inf: uniform in [0, magnitude])
    magnitude_max: float         # the noisy magnitude is clipped to [0, magnitude_max]

    @property
    def num_bins(self) -> int:
        return int(round(self.magnitude_max * BINS_PER_LEVEL)) + 1


def rand_augment_plan(aa: Optional[str], key: str = "aa") -> Optional[RandAugmentPlan]:
    """The RandAugment of ``aa`` as timm builds it (``None`` for no RandAugment); other policies are refused."""
    if aa in (None, "", "none"):
        return None
    if not str(aa).startswith("rand"):
        raise AugmentError(f"{key}: '{aa}' is an AutoAugment/AugMix policy; loader: dali runs RandAugment (rand-...) "
                           f"only; use loader: fast")
    from timm.data.auto_augment import rand_augment_transform
    try:
        ra = rand_augment_transform(str(aa), {})
    except (AssertionError, KeyError, ValueError) as e:
        raise AugmentError(f"{key}: timm cannot parse '{aa}' ({e or 'unknown section'})") from None
    if ra.choice_weights is not None:
        raise AugmentError(f"{key}: '{aa}' weights its ops (-w); loader: dali draws them uniformly; use loader: fast")
    unknown = sorted({op.name for op in ra.ops} - set(TIMM_TO_DALI))
    if unknown:
        raise AugmentError(f"{key}: '{aa}' has ops DALI has no counterpart for here ({', '.join(unknown)}); "
                           f"use loader: fast")
    first = ra.ops[0]
    return RandAugmentPlan(ops=[op.name for op in ra.ops], num_layers=ra.num_layers, prob=first.prob,
                           magnitude=float(first.magnitude), magnitude_std=float(first.magnitude_std or 0.0),
                           magnitude_max=float(first.magnitude_max or 10))


def _current_ops() -> dict:
    """DALI's equalize and sharpness on the operators' current names (its own call the deprecated
    ``fn.experimental`` ones, and warn on every pipeline whatever the warning filters say)."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=a.sharpness_kernel, param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    return {"equalize": equalize, "sharpness": sharpness}


def _dali_suite(plan: RandAugmentPlan):
    """One DALI augmentation per timm op, its magnitude table timm's argument at every bin."""
    from nvidia.dali.auto_aug import augmentations as a
    levels = np.arange(plan.num_bins) / BINS_PER_LEVEL / 10.0           # timm's level = magnitude / 10
    current, suite = _current_ops(), []
    for name in plan.ops:
        dali_name, to_arg, negate = TIMM_TO_DALI[name]
        base = current.get(dali_name) or getattr(a, dali_name)
        if to_arg is None:
            suite.append(base.augmentation(name=name))
            continue
        table = np.array([to_arg(lv) for lv in levels], dtype=np.float64)
        mapping = _param_mapping(dali_name, a)
        suite.append(base.augmentation(mag_range=table, randomly_negate=negate, name=name,
                                       **({"mag_to_param": mapping} if mapping is not None else {})))
    return suite


def _param_mapping(dali_name: str, a):
    """The DALI parameter of a timm argument where they differ (posterize: a bit mask; enhance: 1 + shift)."""
    if dali_name == "posterize":      # 0 bits kept: black, as datasets.fix_posterize (DALI's own keeps 1 bit)
        return lambda bits: np.uint8(0) if bits <= 0 else a.poster_mask_uint8(float(bits))
    if dali_name == "solarize_add":    # uint8 arithmetic: pixels below 128 plus at most 127 cannot wrap
        return lambda shift: np.uint8(min(max(shift, 0), 127))
    return None


def _magnitude_bins(plan: RandAugmentPlan):
    """This layer's magnitude bin per sample: timm's magnitude, with its noise, clipped, at 0.1 resolution."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
    top = plan.num_bins - 1
    centre = plan.magnitude * BINS_PER_LEVEL
    if plan.magnitude_std == 0:
        return int(round(min(max(centre, 0), top)))
    if math.isinf(plan.magnitude_std):
        drawn = fn.random.uniform(range=[0.0, centre])
    else:
        drawn = fn.random.normal(mean=centre, stddev=plan.magnitude_std * BINS_PER_LEVEL)
    return fn.cast(dmath.floor(dmath.clamp(drawn, 0.0, float(top)) + 0.5), dtype=types.INT32)


def apply_rand_augment(images, plan: RandAugmentPlan, size: int, fill: int, interp):
    """timm's RandAugment on a batch of uint8 HWC images (inside a pipeline with conditionals on): per layer one of
    the ops with probability ``prob`` (uniformly), else the image as it is (DALI's identity, the last choice)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import select, signed_bin
    suite = _dali_suite(plan) + [a.identity]
    k = len(suite) - 1
    for _ in range(plan.num_layers):
        op = fn.random.choice(np.arange(len(suite), dtype=np.int32), p=[plan.prob / k] * k + [1.0 - plan.prob])
        images = select(suite, op, images, magnitude_bin=signed_bin(_magnitude_bins(plan)),
                        num_magnitude_bins=plan.num_bins, shape=(size, size), fill_value=fill, interp_type=interp)
    return images


__all__ = ["AugmentError", "RandAugmentPlan", "rand_augment_plan", "apply_rand_augment", "TIMM_TO_DALI"]
