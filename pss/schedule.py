"""The patch sampling schedule: the patch drop ratio d of every training iteration, as the published DeiT code has it.

The reference fixture pins the published schedulers bit for bit, quirks included, so every formula here is
evaluated in float64 in the authors' order, clipped to [0, 1] and snapped to a multiple of 0.2 with Python's
``round(5 * d) / 5`` (halves go to the even neighbour, so a "fixed 0.1" schedule flips between 0.0 and 0.2 with the
float noise of each iteration). Each scheduler keeps its own cooldown behaviour:

* ``linear``: ``(1 - p) * start + p * end`` with ``p = g / T``; it ignores the cooldown and keeps extrapolating the
  line past ``T`` (with ``end = -0.1`` that reaches 0 anyway; a fixed ratio keeps dropping patches in the cooldown);
* ``cosine``: ``start`` at ``g = 0``, ``end`` for every ``g >= T - 1`` (so the cooldown keeps the end ratio), else
  ``end + (start - end) * (1 + cos(pi * g / T)) / 2``;
* ``cyclic``: a triangle inside every epoch (``c = g mod E``, ``p = c / (E / 2)`` up to ``E // 2``, then
  ``(E - c) / (E / 2)``), and exactly 0.0 once ``g > T - 1``.

``T = (epochs - cooldown_epochs) * iterations_per_epoch``. Counter convention (DeiT's engine reads the ratio, trains,
then steps the counter): global iteration ``g = epoch * iterations_per_epoch + step`` trains with ``drop_ratio(g)``,
so the first iteration uses ``start``. Evaluation always runs with d = 0. A "fixed" schedule is ``linear`` with
``start == end``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Tuple

import numpy as np

SCHEDULERS = ("linear", "cosine", "cyclic")
_CHUNK = 1 << 20  # iterations evaluated per numpy call when scanning a whole schedule


class ScheduleError(ValueError):
    """An impossible PSS schedule; the one-line message names the key (``pss.<key>``) and how to fix it."""


def snap(drop_ratio: float) -> float:
    """Clip to [0, 1] and snap to a multiple of 0.2 with Python's ``round`` (halves to even), as the reference does."""
    return round(max(0.0, min(1.0, drop_ratio)) * 5) / 5


def num_kept_patches(num_patches: int, drop_ratio: float) -> int:
    """Patches kept at drop ratio d (prefix tokens not counted): ``round((1 - d) * (N + 1)) - 1``.

    The reference counts the CLS token inside ``N + 1`` and rounds half to even, so k is not ``round((1 - d) * N)``:
    N = 196, d = 0.5 gives round(98.5) - 1 = 97 patches.
    """
    return int(round((1.0 - drop_ratio) * (num_patches + 1))) - 1


@dataclass(frozen=True)
class PSSSchedule:
    """Hyper-parameters of a patch sampling schedule (defaults: the published DeiT-S-224 run).

    scheduler: ``linear``, ``cosine`` or ``cyclic`` (``--patch-scheduler-name``).
    start_drop_ratio, end_drop_ratio: d at the start and at the end (the paper's runs use 0.8 and -0.1; ratios
        below 0 are fine, they clip).
    epochs: training epochs, cooldown included.
    iterations_per_epoch: optimizer iterations per epoch (1251 for DeiT-S on 4 GPUs x 256, 2502 for SimMIM ViT-B).
    cooldown_epochs: epochs at the end excluded from the schedule (DeiT passes its lr ``--cooldown-epochs``, 10).
    lag: iterations the ratio trails the counter: 0 in the published DeiT loop (it reads d(g) before update g), 1 in
        the published SimMIM loop (it sets the ratio after each update: update g trains at d(g - 1), update 0 at 0).
    """

    scheduler: str = "cyclic"
    start_drop_ratio: float = 0.8
    end_drop_ratio: float = -0.1
    epochs: int = 300
    iterations_per_epoch: int = 1251
    cooldown_epochs: int = 10
    lag: int = 0

    def __post_init__(self):
        for key in ("start_drop_ratio", "end_drop_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScheduleError(f"pss.{key} {value!r} must be a finite number")
            object.__setattr__(self, key, float(value))
        for key in ("epochs", "iterations_per_epoch", "cooldown_epochs", "lag"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                raise ScheduleError(f"pss.{key} {value!r} must be an integer")
            object.__setattr__(self, key, int(value))
        self.validate()

    # ------------------------------------------------------------------------------------------------ checks
    def validate(self, prefix: str = "pss") -> None:
        """Raise :class:`ScheduleError` (one line, naming ``<prefix>.<key>``) if the schedule cannot run."""
        if self.scheduler not in SCHEDULERS:
            raise ScheduleError(
                f"{prefix}.scheduler '{self.scheduler}' is not one of {', '.join(SCHEDULERS)} "
                "(a fixed ratio is 'linear' with start_drop_ratio == end_drop_ratio)")
        if self.epochs < 1:
            raise ScheduleError(f"{prefix}.epochs {self.epochs} must be >= 1")
        if self.iterations_per_epoch < 1:
            raise ScheduleError(f"{prefix}.iterations_per_epoch {self.iterations_per_epoch} must be >= 1")
        if not 0 <= self.cooldown_epochs < self.epochs:
            raise ScheduleError(
                f"{prefix}.cooldown_epochs {self.cooldown_epochs} must lie in [0, epochs={self.epochs}): "
                "the schedule needs at least one scheduled epoch")
        step = _scan(self)[1]
        if step is not None:
            key = "start_drop_ratio" if step == 0 or snap(self.start_drop_ratio) >= 1.0 else "end_drop_ratio"
            raise ScheduleError(
                f"{prefix}.{key} {getattr(self, key)}: the {self.scheduler} schedule (start {self.start_drop_ratio}, "
                f"end {self.end_drop_ratio}) snaps to drop ratio 1.0 at iteration {step} "
                f"(epoch {step // self.iterations_per_epoch}), which keeps no patch; keep it below 0.9")

    # ---------------------------------------------------------------------------------------------- sizes
    @property
    def scheduled_iterations(self) -> int:
        """T: the iterations the schedule spans (cooldown excluded)."""
        return (self.epochs - self.cooldown_epochs) * self.iterations_per_epoch

    @property
    def total_iterations(self) -> int:
        """All training iterations, cooldown included."""
        return self.epochs * self.iterations_per_epoch

    # ---------------------------------------------------------------------------------------------- values
    def raw_drop_ratio(self, global_step: int) -> float:
        """The scheduler's value before clipping and snapping (float64, the authors' order of operations)."""
        g = int(global_step)
        if g < 0:
            raise ValueError(f"global_step {g} must be >= 0")
        s, e, T, E = self.start_drop_ratio, self.end_drop_ratio, self.scheduled_iterations, self.iterations_per_epoch
        if self.scheduler == "linear":
            p = g / T
            return (1 - p) * s + p * e
        if self.scheduler == "cosine":
            if g == 0:
                return s
            if g >= T - 1:
                return e
            return e + (s - e) * (1 + math.cos(g * math.pi / T)) / 2
        if g > T - 1:                       # cyclic: the cooldown runs on all patches
            return 0.0
        c = g % E
        p = c / (E / 2) if c <= E // 2 else (E - c) / (E / 2)
        return (1 - p) * s + p * e

    def drop_ratio(self, global_step: int) -> float:
        """d at global iteration ``g = epoch * iterations_per_epoch + step`` (clipped, snapped to 0.2)."""
        g = int(global_step)
        if 0 <= g < self.lag:
            return 0.0
        return snap(self.raw_drop_ratio(g - self.lag))

    def keep_rate(self, global_step: int) -> float:
        """The patch keep rate rho = 1 - d."""
        return 1.0 - self.drop_ratio(global_step)

    def drop_ratios(self, global_steps) -> np.ndarray:
        """``drop_ratio`` of many iterations at once (float64 array), equal to it element by element.

        Linear and cyclic use only IEEE ``+ - * /``, so numpy gives the same bits as Python. ``np.cos`` may differ
        from ``math.cos`` in the last bit, which matters only where ``5 d`` is within float noise of a half; those
        few iterations are recomputed with the scalar path.
        """
        counter = np.asarray(global_steps, dtype=np.int64)
        if counter.size and counter.min() < 0:
            raise ValueError("global steps must be >= 0")
        g = np.maximum(counter - self.lag, 0)
        s, e, T, E = self.start_drop_ratio, self.end_drop_ratio, self.scheduled_iterations, self.iterations_per_epoch
        if self.scheduler == "linear":
            p = g / T
            raw = (1 - p) * s + p * e
        elif self.scheduler == "cosine":
            raw = e + (s - e) * (1 + np.cos(g.astype(np.float64) * math.pi / T)) / 2
            raw = np.where(g == 0, s, np.where(g >= T - 1, e, raw))
        else:
            c = g % E
            p = np.where(c <= E // 2, c / (E / 2), (E - c) / (E / 2))
            raw = np.where(g > T - 1, 0.0, (1 - p) * s + p * e)
        out = np.rint(np.clip(raw, 0.0, 1.0) * 5) / 5 + 0.0        # rint rounds halves to even, like round()
        if self.scheduler == "cosine" and s != e:
            y = np.clip(raw, 0.0, 1.0) * 5
            for i in np.flatnonzero(np.abs(y - np.floor(y) - 0.5) < 1e-9):
                out.flat[i] = snap(self.raw_drop_ratio(int(g.flat[i])))
        return np.where(counter < self.lag, 0.0, out)

    def level_counts(self) -> Dict[float, int]:
        """``{snapped drop ratio: iterations spent at it}`` over all ``total_iterations`` (cooldown included)."""
        return dict(_scan(self)[0])

    def level_shares(self) -> Dict[float, float]:
        """``{snapped drop ratio: fraction of all iterations spent at it}`` (cooldown included), ascending in d.

        Exact (every iteration counted), so it can weight per-level FLOPs or throughput.
        """
        total = self.total_iterations
        return {level: count / total for level, count in _scan(self)[0]}

    def mean_keep_rate(self) -> float:
        """Average rho over all iterations: the ideal fraction of full-patch compute (before per-token overheads)."""
        return sum((1.0 - level) * share for level, share in self.level_shares().items())


@lru_cache(maxsize=32)
def _scan(schedule: PSSSchedule) -> Tuple[Tuple[Tuple[float, int], ...], Optional[int]]:
    """Level counts of every iteration and the first iteration whose snapped ratio is 1 (``None`` if none).

    Cached per schedule (frozen, so hashable): validation and ``level_shares`` share one pass.
    """
    counts: Dict[float, int] = {}
    first_full: Optional[int] = None
    total = schedule.total_iterations
    for start in range(0, total, _CHUNK):
        d = schedule.drop_ratios(np.arange(start, min(start + _CHUNK, total), dtype=np.int64))
        levels, n = np.unique(d, return_counts=True)
        for level, k in zip(levels.tolist(), n.tolist()):
            counts[level] = counts.get(level, 0) + k
        if first_full is None and levels[-1] >= 1.0:
            first_full = start + int(np.flatnonzero(d >= 1.0)[0])
    return tuple(sorted(counts.items())), first_full
