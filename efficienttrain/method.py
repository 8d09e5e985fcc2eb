"""EfficientTrain v1 as a method plug-in: the ``efficienttrain:`` config section, a curriculum over the run.

The run is cut into equal phases (phase ``i`` of ``n`` ends at epoch ``int(epochs / n * (i + 1))``, the published
``--end_epoch``; cooldown epochs stay in the last phase). Each phase sets, through :meth:`Method.recipe`:

* the input size: the loader still makes ``input_size`` images (crop, flip, RandAugment, erasing at full size, as
  published) and each batch is cut to the phase's size by :func:`.ops.low_frequency_crop` before mixup/cutmix; the
  model's absolute position embedding (and its Adam moments) is resampled bilinearly to the new grid at the phase's
  start, as EfficientTrain's relaunch does when it loads the checkpoint. A fresh model is built at the first phase's
  size (EfficientTrain creates it with ``img_size`` of phase 1);
* RandAugment: ``rand_augment`` with ``{m}`` replaced by the phase's magnitude (``null``: the config's ``aa``);
* the per-process batch: ``batch_size x batch_scale`` with ``grad_accum_steps / batch_scale`` accumulation steps, so
  the effective batch (and the lr) stays that of the config.

Evaluation runs at ``input_size`` (``eval_size: final``: the model is resized for the evaluation and put back
exactly); ``eval_size: phase`` evaluates low-frequency crops at the phase's size, as the published per-phase
launches do (their logged accuracies of phases 1-4 are at 160/192 px). The phase is a function of the epoch, so
checkpoints carry nothing for it; the model's input size is saved with the checkpoint by the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from methods import Clock, Method, MethodError, Recipe, Variant, bilinear_resize, register_method
from models import check_vit
from models.resize import ResizeError, check_resizable, set_input_size

from .ops import low_frequency_crop

EVAL_SIZES = ("final", "phase")


@dataclass
class EfficientTrainConfig:
    """EfficientTrain v1 curriculum (defaults: the published ET_training.py for DeiT, five phases)."""
    input_sizes: List[int] = field(default_factory=lambda: [160, 160, 160, 192, 224])  # px per phase, last input_size
    rand_magnitudes: List[int] = field(default_factory=lambda: [1, 3, 5, 7, 9])   # RandAugment magnitude per phase
    # the RandAugment policy of every phase, {m} the phase's magnitude; null: the config's aa in every phase
    rand_augment: Optional[str] = "rand-m{m}-mstd0.5-inc1"
    # per-process batch = batch_size x this; accumulation = grad_accum_steps / this (the effective batch is kept)
    batch_scale: List[int] = field(default_factory=lambda: [2, 2, 2, 2, 1])
    # final: evaluate at input_size in every phase; phase: at the phase's size (the published logs of phases 1-4)
    eval_size: str = field(default="final", metadata={"choices": EVAL_SIZES})


@dataclass(frozen=True)
class Phase:
    index: int             # 0-based
    first: int             # first epoch
    end: int               # one past the last epoch of the lr schedule's epochs (the last phase also takes cooldown)
    input_size: int
    magnitude: int
    batch_scale: int


def phases_of(section: EfficientTrainConfig, epochs: int) -> List[Phase]:
    n = len(section.input_sizes)
    ends = [int(epochs / n * (i + 1)) for i in range(n)]
    return [Phase(i, ends[i - 1] if i else 0, ends[i], section.input_sizes[i], section.rand_magnitudes[i],
                  section.batch_scale[i]) for i in range(n)]


def _check_policy(policy: str, magnitudes: List[int]) -> None:
    """``policy`` has a ``{m}`` and is a timm policy for every phase's magnitude."""
    if "{m}" not in policy:
        raise MethodError(f"efficienttrain.rand_augment: '{policy}' has no {{m}} for the phase's magnitude, e.g. "
                          f"rand-m{{m}}-mstd0.5-inc1")
    from config import ConfigError, _check_auto_augment
    for m in sorted(set(magnitudes)):
        try:
            _check_auto_augment(policy.format(m=m))
        except ConfigError as e:
            raise MethodError(f"efficienttrain.rand_augment: {str(e).split(': ', 1)[-1]}") from None


@register_method
class EfficientTrain(Method):
    name = "efficienttrain"
    label = "EfficientTrain"
    Config = EfficientTrainConfig

    def __init__(self, section: EfficientTrainConfig, cfg: Any):
        super().__init__(section, cfg)
        self.phases = phases_of(section, cfg.epochs)
        self.current = self.phases[0]

    @classmethod
    def validate(cls, s: EfficientTrainConfig, cfg: Any) -> None:
        n = len(s.input_sizes)
        if n == 0:
            raise MethodError("efficienttrain.input_sizes: give one input size per phase, e.g. [160, 160, 160, 192, 224]")
        for key in ("rand_magnitudes", "batch_scale"):
            if len(getattr(s, key)) != n:
                raise MethodError(f"efficienttrain.{key}: {len(getattr(s, key))} values for {n} phases "
                                  f"(input_sizes); give one per phase")
        if n > cfg.epochs:
            raise MethodError(f"efficienttrain.input_sizes: {n} phases do not fit in {cfg.epochs} epochs")
        for i, size in enumerate(s.input_sizes):
            if size <= 0 or size % 2 or size > cfg.input_size:
                raise MethodError(f"efficienttrain.input_sizes: phase {i + 1} size {size} must be even and at most "
                                  f"input_size ({cfg.input_size}): the phases crop the loader's images")
        if s.input_sizes[-1] != cfg.input_size:
            raise MethodError(f"efficienttrain.input_sizes: the last phase trains at {s.input_sizes[-1]} px but "
                              f"input_size is {cfg.input_size}; the model ends at input_size: make them equal")
        for i, m in enumerate(s.rand_magnitudes):
            if not 0 <= m <= 10:
                raise MethodError(f"efficienttrain.rand_magnitudes: phase {i + 1} magnitude {m} is outside 0..10")
        if s.rand_augment is not None:
            _check_policy(s.rand_augment, s.rand_magnitudes)
        for i, scale in enumerate(s.batch_scale):
            if scale < 1 or cfg.grad_accum_steps % scale:
                raise MethodError(f"efficienttrain.batch_scale: phase {i + 1} scales the per-process batch by {scale}, "
                                  f"which keeps the effective batch only if grad_accum_steps ({cfg.grad_accum_steps}) "
                                  f"is a multiple of it; raise grad_accum_steps (and lower batch_size to match)")
        if getattr(cfg, "token_label", None) is not None:
            raise MethodError("efficienttrain: token labeling is not supported (its label maps are made for the "
                              "input_size patch grid); drop the token_label section or efficienttrain")

    # --- the model ------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> List[nn.Module]:
        check_vit(model, "efficienttrain")
        try:
            check_resizable(model, "efficienttrain")             # and one whose input size can follow the curriculum
        except ResizeError as e:
            raise MethodError(str(e)) from None
        patch = int(model.patch_embed.patch_size[0])
        bad = [size for size in self.section.input_sizes if size % patch]
        if bad:
            raise MethodError(f"efficienttrain.input_sizes: {bad[0]} is not a multiple of the patch size {patch}")

    # --- the clock and the recipe -----------------------------------------------------------------------------
    def phase_at(self, epoch: int) -> Phase:
        return next((p for p in self.phases if epoch < p.end), self.phases[-1])

    def on_epoch(self, clock: Clock) -> None:
        self.current = self.phase_at(clock.epoch)

    def recipe(self, epoch: int) -> Recipe:
        p, s = self.phase_at(epoch), self.section
        return Recipe(batch_size=self.cfg.batch_size * p.batch_scale,
                      grad_accum_steps=self.cfg.grad_accum_steps // p.batch_scale,
                      aa=None if s.rand_augment is None else s.rand_augment.format(m=p.magnitude),
                      input_size=p.input_size,
                      eval_size=p.input_size if s.eval_size == "phase" else self.cfg.input_size,
                      resize=cropped_or_resized)

    # --- reporting ------------------------------------------------------------------------------------------
    def fields(self, scope: str) -> Dict[str, Any]:
        p = self.current
        if scope == "run":
            return {"phases": [{"epochs": [q.first, q.end], "input_size": q.input_size, "rand_magnitude": q.magnitude,
                                "batch_scale": q.batch_scale} for q in self.phases],
                    "eval_size": self.section.eval_size}
        out = {"efficienttrain_phase": p.index + 1, "efficienttrain_input_size": p.input_size}
        if scope == "epoch":
            out["efficienttrain_rand_magnitude"] = None if self.section.rand_augment is None else p.magnitude
        return out

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        p = self.phase_at(clock.epoch)
        return f"phase {p.index + 1}/{len(self.phases)}"

    # --- measurement ----------------------------------------------------------------------------------------
    def size_spans(self, epochs: int) -> List[Tuple[int, int, int]]:
        """``(input_size, first, end)`` of every run of consecutive phases at one size."""
        out: List[Tuple[int, int, int]] = []
        for p in phases_of(self.section, epochs):
            if out and out[-1][0] == p.input_size:
                out[-1] = (p.input_size, out[-1][1], p.end)
            else:
                out.append((p.input_size, p.first, p.end))
        return out

    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        out = []
        grid = round(num_patches ** 0.5)                      # patches per side at input_size
        for size, first, end in self.size_spans(epochs):
            def apply(model: nn.Module, size: int = size) -> None:
                set_input_size(model, size)
            out.append(Variant(f"ET {size}px", (end - first) / epochs, apply, (size * grid // self.cfg.input_size) ** 2,
                               (first, end), input_size=size))
        return out


def cropped_or_resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """A batch brought to a phase's ``size``: the low-frequency crop when smaller (EfficientTrain), else bilinear."""
    return low_frequency_crop(images, size) if size < images.shape[-1] else bilinear_resize(images, size)
