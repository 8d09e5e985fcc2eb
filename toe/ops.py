"""The Token Expansion operator: initialization -> expansion -> merging, as one batched tensor program.

Equivalent to the authors' ``TokenSelect.token_select`` (same kept positions, same order, same merged values),
but computed differently so that it is cheap and compile-friendly:

* the pairwise score matrix of all patch tokens is computed once per call (``[B, N, N]``, a few per cent of one
  transformer block) instead of once per sub-step on shrinking subsets;
* "max score of each unselected token to the selected set" is kept as a running maximum, updated with the columns
  of the tokens added by each sub-step, so a sub-step is a ``topk`` plus a ``gather``;
* merging is a ``scatter_add`` of the unselected tokens into their closest kept token, divided by the group size;
* every size is a Python int derived from the schedule, and the seed positions are a cached device tensor, so
  there is no host-device copy and no data-dependent shape.

The remaining Python loop runs over the k * stage expansion sub-steps (at most a handful), which depend on each other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .schedule import ToESchedule

_SEED_CACHE: Dict[Tuple[int, float, str], torch.Tensor] = {}


def seed_positions(num_tokens: int, init_keep_rate: float, device: torch.device) -> torch.Tensor:
    """Raster-stride seeds of the published code: the first ``int(N*r0)`` positions ``i`` with ``i % int(1//r0) == 0``."""
    key = (num_tokens, init_keep_rate, str(device))
    idx = _SEED_CACHE.get(key)
    if idx is None:
        count, stride = int(num_tokens * init_keep_rate), int(1 // init_keep_rate)
        idx = torch.arange(0, num_tokens, stride, dtype=torch.long)[:count].to(device)
        _SEED_CACHE[key] = idx
    return idx


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
    prefix, tokens = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    batch, num_tokens, dim = tokens.shape

    with torch.no_grad():
        scores = pairwise_scores(tokens, schedule.distance, nearest)              # [B, N, N]
        kept = seed_positions(num_tokens, schedule.init_keep_rate, x.device).expand(batch, -1)
        selected = torch.zeros(batch, num_tokens, dtype=torch.bool, device=x.device)
        selected[:, kept[0]] = True
        # best[b, j]: score of token j to its closest selected token
        best = scores.gather(2, kept.unsqueeze(1).expand(batch, num_tokens, -1)).amax(-1)
        parts: List[torch.Tensor] = [kept]
        for size in schedule.chunk_sizes(num_tokens, stage):
            if size == 0:
                continue
            # the unselected tokens least similar to the selected set are the most novel: add them
            candidate = best.masked_fill(selected, float("inf"))
            added = candidate.topk(size, dim=1, largest=False, sorted=True).indices
            parts.append(added)
            selected.scatter_(1, added, True)
            new_cols = scores.gather(2, added.unsqueeze(1).expand(batch, num_tokens, -1)).amax(-1)
            best = torch.maximum(best, new_cols)
        kept = torch.cat(parts, dim=1)                                               # [B, M]
        num_kept = kept.shape[1]
        # merging: every unselected token goes to its closest kept token (first one on ties, as torch.max)
        assign = scores.gather(2, kept.unsqueeze(1).expand(batch, num_tokens, -1)).argmax(-1)   # [B, N]
        weight = (~selected).to(tokens.dtype)                                        # kept tokens add nothing

    kept_tokens = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))
    if num_kept < num_tokens:
        sums = torch.zeros_like(kept_tokens).scatter_add(
            1, assign.unsqueeze(-1).expand(-1, -1, dim), tokens * weight.unsqueeze(-1))
        counts = torch.zeros(batch, num_kept, dtype=tokens.dtype, device=x.device).scatter_add(1, assign, weight)
        kept_tokens = (kept_tokens + sums) / (1.0 + counts).unsqueeze(-1)
    prefix_index = torch.arange(num_prefix_tokens, device=x.device).expand(batch, -1)
    index = torch.cat([prefix_index, kept + num_prefix_tokens], dim=1)
    return torch.cat([prefix, kept_tokens], dim=1), index
