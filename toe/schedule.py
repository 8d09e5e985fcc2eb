"""The ToE stage schedule: which stage an epoch is in, and how many tokens each step keeps.

All counts follow the published ``TokenSelect`` arithmetic exactly (including its float quirks such as
``1 // 0.2 == 4.0`` and ``0.7 - 0.4 == 0.29999999999999993``), because the reference fixtures pin them.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Tuple

DISTANCES = ("cosine", "manhattan", "euclidean")
# the pipeline ablations; the first entry of each is the published behaviour (see toe/ops.py for their semantics)
INITS = ("grid", "random")
EXPANSIONS = ("farthest", "random", "none")
MERGES = ("mean", "drop")


class ScheduleError(ValueError):
    """An impossible ToE schedule; the message names the offending key and how to fix it."""


@dataclass(frozen=True)
class ToESchedule:
    """Hyper-parameters of Token Expansion (names follow the paper, not the authors' argparse flags).

    expansion_steps: epochs at which stages 1..S start (``--expansion-step``).
    keep_rates: kept rate r_s of each stage (``--keep-rate``); the last one is usually 1.0.
    init_keep_rate: r0, the rate of seed tokens (``--initialization-keep-rate``).
    repeat_k: the repetition step k: each stage's expansion is done in k sub-steps
        (``--expansion-multiple-stage``).
    distance: cosine, manhattan or euclidean.
    init, expansion, merge: the pipeline ablations (``grid`` / ``farthest`` / ``mean`` are the published method; see
        :func:`toe.ops.select_tokens_ablation` for the others). They change which tokens are kept and how the
        rest are treated, never how many are kept, so every count below holds for all of them.
    """

    expansion_steps: Tuple[int, ...] = (0, 100, 200)
    keep_rates: Tuple[float, ...] = (0.5, 0.75, 1.0)
    init_keep_rate: float = 0.25
    repeat_k: int = 2
    distance: str = "cosine"
    init: str = "grid"
    expansion: str = "farthest"
    merge: str = "mean"

    def __post_init__(self):
        object.__setattr__(self, "expansion_steps", tuple(int(s) for s in self.expansion_steps))
        object.__setattr__(self, "keep_rates", tuple(float(r) for r in self.keep_rates))
        self.validate()

    def validate(self, prefix: str = "toe") -> None:
        steps, rates, r0 = self.expansion_steps, self.keep_rates, self.init_keep_rate
        if not steps:
            raise ScheduleError(f"{prefix}.expansion_steps is empty: give the start epoch of each stage, e.g. [0, 100, 200]")
        if len(steps) != len(rates):
            raise ScheduleError(
                f"{prefix}.expansion_steps has {len(steps)} entries but {prefix}.keep_rates has {len(rates)}: "
                "give one keep rate per stage")
        if any(s < 0 for s in steps):
            raise ScheduleError(f"{prefix}.expansion_steps {list(steps)} has a negative epoch: stages start at epoch >= 0")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ScheduleError(f"{prefix}.expansion_steps {list(steps)} must be strictly increasing")
        if any(not 0.0 < r <= 1.0 for r in rates):
            raise ScheduleError(f"{prefix}.keep_rates {list(rates)} must all lie in (0, 1]")
        if any(b <= a for a, b in zip(rates, rates[1:])):
            raise ScheduleError(f"{prefix}.keep_rates {list(rates)} must be strictly increasing (tokens are expanded, never dropped)")
        if not 0.0 < r0 <= rates[0]:
            raise ScheduleError(
                f"{prefix}.init_keep_rate {r0} must lie in (0, keep_rates[0]={rates[0]}]: seeds are a subset of stage 1")
        if int(self.repeat_k) != self.repeat_k or self.repeat_k < 1:
            raise ScheduleError(f"{prefix}.repeat_k {self.repeat_k} must be an integer >= 1")
        if self.distance not in DISTANCES:
            raise ScheduleError(f"{prefix}.distance '{self.distance}' is not one of {', '.join(DISTANCES)}")
        for key, value, choices in (("init", self.init, INITS), ("expansion", self.expansion, EXPANSIONS),
                                    ("merge", self.merge, MERGES)):
            if value not in choices:
                raise ScheduleError(f"{prefix}.{key} '{value}' is not one of {', '.join(choices)}")

    @property
    def published_selection(self) -> bool:
        """Whether seeds and expansion are the published ones (raster-stride grid, farthest-first)."""
        return self.init == "grid" and self.expansion == "farthest"

    @property
    def ablations(self) -> dict:
        """The pipeline settings that differ from the published method, e.g. ``{"init": "random"}``."""
        return {k: v for k, v, d in (("init", self.init, INITS[0]), ("expansion", self.expansion, EXPANSIONS[0]),
                                     ("merge", self.merge, MERGES[0])) if v != d}

    @property
    def num_stages(self) -> int:
        return len(self.expansion_steps)

    def stage(self, epoch: int) -> int:
        """Stage of an epoch: 0 before the first step (no reduction), then 1..S (``bisect_right``)."""
        return bisect.bisect_right(list(self.expansion_steps), epoch)

    def is_reducing(self, stage: int) -> bool:
        """Whether the operator changes tokens in this stage (stage 0 and a final rate of 1.0 are no-ops)."""
        return stage > 0 and not (stage == self.num_stages and self.keep_rates[-1] == 1.0)

    def _increments(self) -> List[float]:
        rates = self.keep_rates
        return [rates[0] - self.init_keep_rate] + [rates[i] - rates[i - 1] for i in range(1, len(rates))]

    def num_seeds(self, num_tokens: int) -> int:
        return int(num_tokens * self.init_keep_rate)

    def seed_stride(self) -> int:
        return int(1 // self.init_keep_rate)

    def chunk_sizes(self, num_tokens: int, stage: int) -> List[int]:
        """Tokens added by each expansion sub-step up to ``stage``, in order (k sub-steps per stage)."""
        incs, sizes = self._increments(), []
        for s in range(1, stage + 1):
            if s == self.num_stages:  # the last stage lands exactly on the final rate
                added = int(num_tokens * self.keep_rates[-1]) - int(
                    num_tokens * (self.init_keep_rate + sum([incs[i] for i in range(s - 1)])))
            else:
                added = int(num_tokens * incs[s - 1])
            k = int(self.repeat_k)
            sizes += [added // k] * (k - 1) + [added - (k - 1) * (added // k)]
        return sizes

    def kept_tokens(self, num_tokens: int, stage: int) -> int:
        """Patch tokens that leave the operator in ``stage`` (prefix tokens not counted)."""
        if not self.is_reducing(stage):
            return num_tokens
        return self.num_seeds(num_tokens) + sum(self.chunk_sizes(num_tokens, stage))

    def stage_epochs(self, total_epochs: int) -> List[Tuple[int, int, int]]:
        """``(stage, first_epoch, last_epoch_exclusive)`` for every stage that occurs in ``total_epochs``."""
        bounds = [0] + [s for s in self.expansion_steps if 0 < s < total_epochs] + [total_epochs]
        out = []
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                out.append((self.stage(a), a, b))
        return out
