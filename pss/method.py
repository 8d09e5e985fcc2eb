"""The Patch Sampling Schedule as a method plug-in: the ``pss:`` config section and its hooks into the trainer.

PSS changes every iteration: before each one the drop ratio of the global iteration counter (DeiT's convention:
read the ratio, train, then step the counter) is set on the sampler of the trained model; the counter is the
trainer's, saved in every checkpoint, so a resumed run continues the schedule exactly (the published DeiT loop
restarts it at 0 on resume). The cyclic period is the number of iterations of an epoch. PSS samples at the input
of block 0, so it cannot precede a method that needs the full patch grid (ToE). Evaluation runs on all patches;
``scripts/sweep.py`` sweeps the keep rate at inference (:meth:`PatchSamplingSchedule.inference_knob`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from torch import nn

from methods import Clock, InferenceKnob, Method, MethodError, TokenSite, Variant, register_method
from models import check_vit, num_patches

from .ops import SAMPLERS, apply_sampler, iter_samplers
from .schedule import SCHEDULERS, PSSSchedule, ScheduleError, num_kept_patches

SWEEP_KEEP_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)       # the published dynamic-inference sweep


@dataclass
class PSSConfig:
    """Patch Sampling Schedule (McDanel & Huynh 2022). The drop ratio d goes from ``start_drop_ratio`` to
    ``end_drop_ratio`` per iteration, clipped to [0, 1] and snapped to a multiple of 0.2; a fixed ratio is
    ``linear`` with start == end."""
    scheduler: str = field(default="cyclic", metadata={"choices": SCHEDULERS})
    start_drop_ratio: float = 0.8      # the drop ratio at the first iteration (cyclic: at each cycle's peak)
    end_drop_ratio: float = -0.1       # the drop ratio the schedule heads for (below 0: clipped to all patches)
    # the last epochs of `epochs` left out of the schedule (cyclic: all patches; cosine: the end ratio; linear:
    # the line goes on, as in the published code). DeiT passes its lr cooldown (10); SimMIM uses 0.
    cooldown_epochs: int = 10
    sampler: str = field(default="magnitude", metadata={"choices": SAMPLERS})
    # when the ratio is set: `before` each update from the iteration counter (the published DeiT loop); `after` each
    # update (the published SimMIM loop: update g trains at d(g - 1), the first update on all patches)
    ratio_timing: str = field(default="before", metadata={"choices": ("before", "after")})
    # keep rates that scripts/sweep.py evaluates a trained model at (dynamic inference)
    sweep_keep_rates: List[float] = field(default_factory=lambda: list(SWEEP_KEEP_RATES))


def _schedule(section: PSSConfig, epochs: int, iterations_per_epoch: int) -> PSSSchedule:
    return PSSSchedule(section.scheduler, section.start_drop_ratio, section.end_drop_ratio, epochs,
                       iterations_per_epoch, section.cooldown_epochs, lag=int(section.ratio_timing == "after"))


@register_method
class PatchSamplingSchedule(Method):
    name = "pss"
    label = "PSS"
    Config = PSSConfig
    per_step = True

    def __init__(self, section: PSSConfig, cfg: Any):
        super().__init__(section, cfg)
        self.epochs = cfg.epochs
        self.schedule: Optional[PSSSchedule] = None
        self.drop_ratio = 0.0
        self._keep_sum, self._kept_sum, self._steps = 0.0, 0, 0

    @classmethod
    def validate(cls, section: PSSConfig, cfg: Any) -> None:
        if section.cooldown_epochs < 0 or section.cooldown_epochs >= cfg.epochs:
            raise MethodError(f"pss.cooldown_epochs: {section.cooldown_epochs} must lie in [0, epochs={cfg.epochs}): "
                              "it counts inside the run's epochs")
        try:        # an even and an odd epoch length: the cyclic peak is hit only with an even one
            for iters in (2, 1251):
                _schedule(section, cfg.epochs, iters)
        except ScheduleError as e:
            raise MethodError(str(e)) from None
        if any(not 0.0 < r <= 1.0 for r in section.sweep_keep_rates):
            raise MethodError(f"pss.sweep_keep_rates: {section.sweep_keep_rates} must all lie in (0, 1]")

    def token_site(self) -> TokenSite:
        return TokenSite(0.0, what="PSS samples patches at the input of block 0")

    # --- the model ------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> List[nn.Module]:
        patches = check_vit(model, "pss")
        worst = max(_schedule(self.section, self.epochs, 2).level_shares())
        if worst > 0 and num_kept_patches(patches, worst) < 1:
            raise MethodError(f"pss.start_drop_ratio: the schedule keeps no patch of the model's {patches}; lower it "
                              "or use a larger input_size")
        try:
            return [apply_sampler(model, self.section.sampler, site=self.token_site().site)]
        except TypeError as e:
            raise MethodError(f"pss: {e}") from None

    @property
    def num_patches(self) -> int:
        return int(num_patches(self.models[0]) or 0) if self.models else 0

    # --- the clock ------------------------------------------------------------------------------------------
    def on_epoch(self, clock: Clock) -> None:
        if self.schedule is None or self.schedule.iterations_per_epoch != clock.iters_per_epoch:
            self.schedule = _schedule(self.section, clock.epochs, clock.iters_per_epoch)
        self._keep_sum, self._kept_sum, self._steps = 0.0, 0, 0

    def on_step(self, clock: Clock) -> None:
        self.drop_ratio = self.schedule.drop_ratio(clock.global_step)
        for s in self.ops:
            s.set_drop_ratio(self.drop_ratio)
        self._keep_sum += 1.0 - self.drop_ratio
        self._kept_sum += self.kept
        self._steps += 1

    # --- reporting ------------------------------------------------------------------------------------------
    @property
    def kept(self) -> int:
        return num_kept_patches(self.num_patches, self.drop_ratio) if self.drop_ratio > 0 else self.num_patches

    def fields(self, scope: str) -> Dict[str, Any]:
        if scope == "step":
            return {"pss_drop_ratio": self.drop_ratio, "pss_kept_patches": self.kept}
        if scope == "epoch":
            n = max(self._steps, 1)
            return {"pss_keep_rate": self._keep_sum / n, "pss_kept_patches": self._kept_sum / n}
        s = self.section
        out: Dict[str, Any] = {"scheduler": s.scheduler, "drop_ratio": [s.start_drop_ratio, s.end_drop_ratio],
                               "sampler": s.sampler, "cooldown_epochs": s.cooldown_epochs,
                               "num_patches": self.num_patches}
        if self.schedule is not None:
            shares = self.schedule.level_shares()
            out.update(keep_rate_shares={f"{1 - d:.1f}": share for d, share in sorted(shares.items())},
                       mean_keep_rate=self.schedule.mean_keep_rate(),
                       iterations_per_epoch=self.schedule.iterations_per_epoch)
        return out

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        schedule = _schedule(self.section, clock.epochs, clock.iters_per_epoch)
        start = clock.epoch * clock.iters_per_epoch
        ratios = schedule.drop_ratios(np.arange(start, start + clock.iters_per_epoch))
        lo, hi = 1 - float(ratios.max()), 1 - float(ratios.min())
        return f"keep {lo:.1f}" if lo == hi else f"keep {lo:.1f}-{hi:.1f}"

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The sums behind ``pss_keep_rate`` / ``pss_kept_patches`` of the epoch in progress (the schedule follows
        from the trainer's iteration counter), so that an epoch resumed inside logs the uninterrupted run's means."""
        return {"epoch_sums": {"keep": self._keep_sum, "kept": self._kept_sum, "steps": self._steps}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        sums = state.get("epoch_sums")
        if sums is not None:
            self._keep_sum, self._kept_sum, self._steps = float(sums["keep"]), int(sums["kept"]), int(sums["steps"])

    # --- measurement ----------------------------------------------------------------------------------------
    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """One state per snapped drop ratio, with its exact share of the iterations, epoch by epoch."""
        schedule = _schedule(self.section, epochs, iters_per_epoch)
        ratios = schedule.drop_ratios(np.arange(epochs * iters_per_epoch)).reshape(epochs, iters_per_epoch)
        out = []
        for d in sorted(set(np.unique(ratios).tolist())):
            per_epoch = (ratios == d).mean(axis=1).tolist()
            out.append(Variant(f"PSS keep {1 - d:.1f}", float(np.mean(per_epoch)), _forcing(d),
                               num_kept_patches(num_patches, d) if d > 0 else num_patches, None, per_epoch))
        return out

    def inference_knob(self) -> InferenceKnob:
        def apply(model: nn.Module, keep_rate: float) -> None:
            _forcing(round(1.0 - keep_rate, 10))(model)
        return InferenceKnob("keep rate", list(self.section.sweep_keep_rates), apply, default=1.0)


def _forcing(drop_ratio: float):
    """Put every sampler of a model at ``drop_ratio``, on in evaluation too (measurement and dynamic inference)."""
    def apply(model: nn.Module) -> None:
        for s in iter_samplers(model):
            s.set_drop_ratio(drop_ratio)
            s.force = drop_ratio > 0
    return apply
