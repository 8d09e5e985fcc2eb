"""The Tri-Level keep-ratio schedule and the checks of its settings.

The token keep ratio r and the attention keep ratio a follow the same per-iteration rule (the authors' engine, taken
from EViT): 1 for ``warmup_epochs``, then a cosine from 1 down to the target over ``decay_epochs``, then the target.
The arithmetic is the published one, in float64 and in the same order, because the reference fixture pins every value.
Evaluation does not follow the schedule: it always runs at the targets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Tuple


class TriLevelConfigError(ValueError):
    """An impossible Tri-Level setting; the one-line message names the key (``trilevel.<key>``)."""


def check_ratio(value: float, key: str) -> float:
    """``value`` as a float in (0, 1], else a one-line error naming ``trilevel.<key>``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TriLevelConfigError(f"trilevel.{key} must be a number in (0, 1], got {value!r}")
    if not (0.0 < value <= 1.0):      # also rejects NaN
        raise TriLevelConfigError(f"trilevel.{key} {value} must lie in (0, 1]")
    return float(value)


def check_count(value: int, key: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, else a one-line error naming ``trilevel.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise TriLevelConfigError(f"trilevel.{key} must be an integer, got {value!r}")
    if value < minimum:
        raise TriLevelConfigError(f"trilevel.{key} {value} must be >= {minimum}")
    return int(value)


def check_pruning_loc(pruning_loc: Iterable[int], depth: int) -> Tuple[int, ...]:
    """Pruning blocks, strictly increasing in ``0..depth-1``; else an error naming ``trilevel.pruning_loc``."""
    locs = tuple(check_count(b, "pruning_loc") for b in pruning_loc)
    if any(b >= depth for b in locs):
        raise TriLevelConfigError(
            f"trilevel.pruning_loc {list(locs)} is outside 0..{depth - 1} for a {depth}-block model")
    if any(b <= a for a, b in zip(locs, locs[1:])):
        raise TriLevelConfigError(f"trilevel.pruning_loc {list(locs)} must be strictly increasing")
    return locs


def keep_rate(epoch: int, step: int, target: float, iterations_per_epoch: int, warmup_epochs: int = 10,
              decay_epochs: int = 100) -> float:
    """Ratio in effect for training iteration ``step`` of ``epoch`` (the counter the engine reads before stepping)."""
    if epoch < warmup_epochs:
        return 1.0
    if epoch >= warmup_epochs + decay_epochs:
        return float(target)
    total = iterations_per_epoch * decay_epochs
    done = epoch * iterations_per_epoch + step - iterations_per_epoch * warmup_epochs
    return target + (1 - target) * (math.cos(done / total * math.pi) + 1) * 0.5


@dataclass(frozen=True)
class KeepSchedule:
    """One ratio's schedule: ``KeepSchedule(0.7, iterations_per_epoch=2502)(epoch, step) -> r``."""

    target: float
    iterations_per_epoch: int
    warmup_epochs: int = 10
    decay_epochs: int = 100

    def __post_init__(self):
        self.validate()

    def validate(self, key: str = "keep_ratio") -> None:
        check_ratio(self.target, key)
        check_count(self.iterations_per_epoch, "iterations_per_epoch", 1)
        check_count(self.warmup_epochs, "warmup_epochs")
        check_count(self.decay_epochs, "decay_epochs")

    def __call__(self, epoch: int, step: int = 0) -> float:
        return keep_rate(epoch, step, self.target, self.iterations_per_epoch, self.warmup_epochs, self.decay_epochs)

    @property
    def final_epoch(self) -> int:
        """First epoch that trains at the target throughout."""
        return self.warmup_epochs + self.decay_epochs


@dataclass(frozen=True)
class RatioSchedule:
    """Both ratios (token keep ratio r, attention keep ratio a), driven by the same warm-up + cosine rule."""

    keep_ratio: float = 0.7
    attn_ratio: float = 0.3
    warmup_epochs: int = 10
    decay_epochs: int = 100

    def __post_init__(self):
        check_ratio(self.keep_ratio, "keep_ratio")
        check_ratio(self.attn_ratio, "attn_ratio")
        check_count(self.warmup_epochs, "warmup_epochs")
        check_count(self.decay_epochs, "decay_epochs")

    def at(self, epoch: int, step: int, iterations_per_epoch: int) -> Tuple[float, float]:
        """``(r, a)`` for training iteration ``step`` of ``epoch``."""
        args = (iterations_per_epoch, self.warmup_epochs, self.decay_epochs)
        return (keep_rate(epoch, step, self.keep_ratio, *args), keep_rate(epoch, step, self.attn_ratio, *args))

    @property
    def targets(self) -> Tuple[float, float]:
        """``(r, a)`` used in evaluation, as published."""
        return self.keep_ratio, self.attn_ratio
