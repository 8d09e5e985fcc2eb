"""The Token Expansion operator: initialization -> expansion -> merging, as one batched tensor program.

Equivalent to the authors' ``TokenSelect.token_select`` (same kept positions, same order, same merged values),
but computed differently so that it is cheap and compile-friendly:

* the pairwise score matrix of all patch tokens is computed once per call (``[B, N, N]``, a few per cent of one
  transformer block) instead of once per sub-step on shrinking subsets;
* "max score of each unselected token to the selected set" is kept as a running maximum, updated with the columns
  of the tokens added by each sub-step, so a sub-step is a ``topk`` plus a ``gather``; selected tokens hold
  ``+inf`` there, which both excludes them from the next ``topk`` and marks them as kept;
* merging is ONE ``scatter_add`` of all input rows (prefix and kept tokens onto their own slot, every other token
  onto its closest kept token) divided by the group size, so the only tensors of size ``[B, N, C]`` that are
  differentiated are the input and the output (no slice/gather/cat copies to run forward and backward);
* every size is a Python int derived from the schedule, and the constant index tensors (seeds, prefix slots) are
  cached per shape and device, so there is no host-device copy, no data-dependent shape and no graph break.

The remaining Python loop runs over the k * stage expansion sub-steps (at most a handful), which depend on each other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .schedule import ToESchedule

_CACHE: Dict[Tuple, torch.Tensor] = {}


def _cached(key: Tuple, make) -> torch.Tensor:
    """A constant index tensor, built once per key (shape, rate, device) and then reused by every eager call.

    Under ``torch.compile`` it is built inside the graph instead (a free constant there): looking it up in this
    module-level dict would make dynamo guard on the dict and recompile whenever another shape adds an entry.
    """
    if torch.compiler.is_compiling():
        return make()
    value = _CACHE.get(key)
    if value is None:
        value = _CACHE[key] = make()
    return value


def seed_positions(num_tokens: int, init_keep_rate: float, device: torch.device) -> torch.Tensor:
    """Raster-stride seeds of the published code: the first ``int(N*r0)`` positions ``i`` with ``i % int(1//r0) == 0``."""
    def make():
        count, stride = int(num_tokens * init_keep_rate), int(1 // init_keep_rate)
        return torch.arange(0, num_tokens, stride, dtype=torch.long)[:count].to(device)
    return _cached(("seeds", num_tokens, init_keep_rate, str(device)), make)


def _arange(n: int, device: torch.device) -> torch.Tensor:
    return _cached(("arange", n, str(device)), lambda: torch.arange(n, dtype=torch.long, device=device))


def pairwise_scores(x: torch.Tensor, distance: str, nearest: bool) -> torch.Tensor:
    """``[B, N, N]`` scores between L2-normalised tokens; larger means "closer" for expansion and merging.

    With ``nearest=False`` (the published behaviour) the raw distance is used as the score for manhattan and
    euclidean too, so "closest" is in fact the farthest token; ``nearest=True`` negates distances instead.
    """
    xn = x / x.norm(dim=-1, keepdim=True)
    if distance == "cosine":
        return xn @ xn.transpose(-1, -2)
    p = 1.0 if distance == "manhattan" else 2.0
    dist = torch.cdist(xn, xn, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    return -dist if nearest else dist


def _columns_max(scores: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: for every token, its best score over the columns ``cols`` (``[B, m]``, per sample)."""
    batch, num_tokens, _ = scores.shape
    return scores.gather(2, cols.unsqueeze(1).expand(batch, num_tokens, -1)).amax(-1)


def select_tokens(scores: torch.Tensor, schedule: ToESchedule, stage: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Initialization and expansion on a ``[B, N, N]`` score matrix.

    Returns ``kept`` (``[B, M]`` patch positions in the reference order) and ``assign`` (``[B, N]``: the slot in
    ``kept`` that every patch token ends up in: its own slot if kept, else its closest kept token's slot).
    """
    batch, num_tokens, _ = scores.shape
    inf = float("inf")
    seeds = seed_positions(num_tokens, schedule.init_keep_rate, scores.device)
    # best[b, j]: score of token j to its closest selected token; +inf once j itself is selected
    best = scores.index_select(2, seeds).amax(-1).index_fill_(1, seeds, inf)
    parts: List[torch.Tensor] = [seeds.expand(batch, -1)]
    for size in schedule.chunk_sizes(num_tokens, stage):
        if size == 0:
            continue
        # the unselected tokens least similar to the selected set are the most novel: add them
        added = best.topk(size, dim=1, largest=False, sorted=True).indices
        parts.append(added)
        best = torch.maximum(best, _columns_max(scores, added)).scatter_(1, added, inf)
    kept = torch.cat(parts, dim=1)                                                       # [B, M]
    num_kept = kept.shape[1]
    # merging: every unselected token goes to its closest kept token (first one on ties, as torch.max) ...
    assign = scores.gather(2, kept.unsqueeze(1).expand(batch, num_tokens, -1)).argmax(-1)   # [B, N]
    # ... and every kept token stays in its own slot
    assign.scatter_(1, kept, _arange(num_kept, scores.device).expand(batch, -1))
    return kept, assign


def token_expansion(
    x: torch.Tensor,
    schedule: ToESchedule,
    stage: int,
    num_prefix_tokens: int = 1,
    nearest: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Reduce ``x`` ``[B, P + N, C]`` to ``[B, P + M, C]`` for ``stage``; also return the kept positions ``[B, P + M]``.

    The ``P`` prefix tokens (CLS, distillation, registers) pass through first and untouched. Kept patch tokens follow
    in the reference order (seeds in raster order, then expanded tokens in order of addition), each holding the mean
    of itself and the tokens merged into it. Returns ``(x, None)`` when the stage does not reduce.
    """
    if not schedule.is_reducing(stage):
        return x, None
    batch, length, dim = x.shape
    num_prefix = num_prefix_tokens

    with torch.no_grad():
        scores = pairwise_scores(x[:, num_prefix:], schedule.distance, nearest)          # [B, N, N]
        kept, assign = select_tokens(scores, schedule, stage)
        prefix_slots = _arange(num_prefix, x.device).expand(batch, -1)
        # output slot of every input row: prefix tokens first, then the groups of the kept tokens
        slot = torch.cat([prefix_slots, assign + num_prefix], dim=1)                     # [B, P + N]
        index = torch.cat([prefix_slots, kept + num_prefix], dim=1)                      # [B, P + M]
        out_len = index.shape[1]
        counts = torch.zeros(batch, out_len, dtype=x.dtype, device=x.device).scatter_add_(
            1, slot, torch.ones_like(slot, dtype=x.dtype))

    sums = x.new_zeros(batch, out_len, dim).scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, dim), x)
    return sums / counts.unsqueeze(-1), index
