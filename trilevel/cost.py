"""What the Tri-Level schedule costs, for measurement: token counts per iteration, forward FLOPs per token count
(cached), and the few representative states that are counted and timed in place of every iteration's.

The keep ratio changes every iteration of the cosine, so a run passes through many token counts (DeiT-S at r = 0.7:
59 first-stage counts, and their compounds). Timing each is pointless; instead the method declares a handful of
states along the schedule (``c``, the cosine factor, at 1, 0.75, 0.5, 0.25 and 0: ``r = target + (1 - target) c``,
the same ``c`` for both ratios) and every iteration's cost, taken from :class:`ForwardCost`, is split between the
two states around it (linear in FLOPs). The shares so obtained reproduce the schedule's exact forward FLOPs (up to
what fvcore counts differently from :class:`ForwardCost`, nothing for a timm ViT), and the timings of the states are
interpolated the same way. The attention ratio costs no FLOPs (the masked attention computes every logit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .ops import num_kept
from .schedule import keep_rate

GRID = (1.0, 0.75, 0.5, 0.25, 0.0)          # cosine factors of the representative states, warm-up first


def stage_tokens(num_patches: int, keep_ratio: float, pruning_loc: Sequence[int]) -> Tuple[int, ...]:
    """Patch tokens of every stage: entering block 0, then after each pruning location (``ceil`` compounds)."""
    out = [int(num_patches)]
    for _ in pruning_loc:
        out.append(num_kept(out[-1], keep_ratio))
    return tuple(out)


@dataclass(frozen=True)
class ViTDims:
    """What the block cost depends on."""
    embed_dim: int
    mlp_hidden: int
    depth: int
    num_prefix_tokens: int

    @classmethod
    def of(cls, model: nn.Module) -> Optional["ViTDims"]:
        blocks = getattr(model, "blocks", None)
        try:
            qkv, fc1 = blocks[0].attn.qkv, blocks[0].mlp.fc1
        except (AttributeError, IndexError, TypeError):
            return None
        return cls(qkv.in_features, fc1.out_features, len(blocks), int(getattr(model, "num_prefix_tokens", 1)))


class ForwardCost:
    """Forward multiply-adds of a ViT's blocks and final norm as fvcore counts them, as a function of the stage token
    counts; the patch embedding and the head do not depend on them and are left out (only differences are used).

    A pruning block runs its attention on the tokens it receives and its MLP on those it keeps. Per ``n`` tokens
    (prefix included): attention ``4 n C^2 + 2 n^2 C`` (qkv, proj, q@k^T, attn@v) and LayerNorm ``5 n C``; MLP
    ``2 n C H`` and LayerNorm ``5 n C``. Cached per count and per stage tuple.
    """

    def __init__(self, dims: ViTDims, pruning_loc: Sequence[int]):
        self.dims, self.pruning_loc = dims, tuple(pruning_loc)
        self._attention: Dict[int, int] = {}
        self._mlp: Dict[int, int] = {}
        self._stages: Dict[Tuple[int, ...], int] = {}

    def attention(self, n: int) -> int:
        if n not in self._attention:
            c = self.dims.embed_dim
            self._attention[n] = 5 * n * c + 4 * n * c * c + 2 * n * n * c
        return self._attention[n]

    def mlp(self, n: int) -> int:
        if n not in self._mlp:
            c = self.dims.embed_dim
            self._mlp[n] = 5 * n * c + 2 * n * c * self.dims.mlp_hidden
        return self._mlp[n]

    def __call__(self, stages: Tuple[int, ...]) -> int:
        if stages not in self._stages:
            p, k, total = self.dims.num_prefix_tokens, 0, 0
            for b in range(self.dims.depth):
                n_in = stages[k] + p
                if b in self.pruning_loc:
                    k += 1
                total += self.attention(n_in) + self.mlp(stages[k] + p)
            self._stages[stages] = total + 5 * (stages[k] + p) * self.dims.embed_dim
        return self._stages[stages]


@dataclass
class State:
    """A representative state: cosine factor ``c``, its ratios, token counts, and its weight in every epoch."""
    c: float
    keep_ratio: float
    attn_ratio: float
    stages: Tuple[int, ...]
    epoch_shares: List[float]

    @property
    def share(self) -> float:
        return sum(self.epoch_shares) / max(len(self.epoch_shares), 1)


def representative_states(keep_target: float, attn_target: float, warmup_epochs: int, decay_epochs: int,
                          epochs: int, iters_per_epoch: int, num_patches: int, pruning_loc: Sequence[int],
                          cost: Optional[ForwardCost] = None, grid: Sequence[float] = GRID) -> List[State]:
    """The states of ``grid`` with per-epoch shares such that, epoch by epoch, the share-weighted cost of the
    states equals the mean cost of that epoch's iterations (by ``cost``; without one, linear in ``c``).

    States with no share are left out; with both targets at 1 there is one state, the whole run.
    """
    grid = sorted(set(float(c) for c in grid), reverse=True)
    if grid[0] != 1.0 or grid[-1] != 0.0:
        raise ValueError(f"the grid of cosine factors must run from 1 to 0, got {grid}")
    if keep_target == 1.0 and attn_target == 1.0:
        grid = [1.0]
    states = []
    for c in grid:
        r = keep_target + (1 - keep_target) * c
        a = attn_target + (1 - attn_target) * c
        states.append(State(c, r, a, stage_tokens(num_patches, r, pruning_loc), [0.0] * epochs))
    if len(states) == 1:
        states[0].epoch_shares = [1.0] * epochs
        return states
    costs = [cost(s.stages) if cost is not None else None for s in states]
    args = (iters_per_epoch, warmup_epochs, decay_epochs)
    for epoch in range(epochs):
        if epoch < warmup_epochs or epoch >= warmup_epochs + decay_epochs:
            states[0 if epoch < warmup_epochs else -1].epoch_shares[epoch] = 1.0
            continue
        weights = [0.0] * len(states)
        for step in range(iters_per_epoch):
            c = keep_rate(epoch, step, 0.0, *args)             # the cosine factor of this iteration
            j = max(i for i, g in enumerate(grid) if g >= c)    # grid[j] >= c > grid[j + 1] (or c == 0)
            if j == len(grid) - 1:
                weights[j] += 1.0
                continue
            hi, lo = j, j + 1
            if cost is not None and costs[hi] != costs[lo]:
                f = cost(stage_tokens(num_patches, keep_rate(epoch, step, keep_target, *args), pruning_loc))
                w = (f - costs[lo]) / (costs[hi] - costs[lo])
            else:
                w = (c - grid[lo]) / (grid[hi] - grid[lo])
            weights[hi] += w
            weights[lo] += 1.0 - w
        for s, w in zip(states, weights):
            s.epoch_shares[epoch] = w / iters_per_epoch
    return [s for s in states if any(s.epoch_shares)]
