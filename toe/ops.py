"""The Token Expansion operator: initialization -> expansion -> merging, as one batched tensor program.

Equivalent to the authors' ``TokenSelect.token_select`` (same kept positions, same order, same merged values),
but computed differently so that it is cheap and compile-friendly:

* "max score of each unselected token to the selected set" is kept as a running maximum, updated with the score
  columns of the tokens added by each sub-step, so a sub-step is a ``topk`` plus one ``[B, N, added]`` product;
  selected tokens hold ``+inf`` there, which excludes them from the next ``topk``. Only the ``N x M`` scores
  against kept tokens are ever computed (never the ``N x N`` matrix), and merging reuses them;
* merging is ONE ``index_add`` of all input rows (prefix and kept tokens onto their own slot, every other token
  onto its closest kept token) divided by the group size, so the only tensors of size ``[B, N, C]`` that are
  differentiated are the input and the output (no slice/gather/cat copies to run forward and backward), and its
  backward is a row ``index_select`` rather than a ``gather`` with an index expanded over channels;
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


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Tokens scaled to unit L2 norm, as the published code does before every score."""
    return x / x.norm(dim=-1, keepdim=True)


def scores_to(xn: torch.Tensor, rows: torch.Tensor, distance: str, nearest: bool) -> torch.Tensor:
    """``[B, m, N]`` scores of the tokens ``rows`` (``[m]`` shared, or ``[B, m]``) against every normalised token.

    Laid out selected-token-major because a ``[m, C] x [C, N]`` product with small ``m`` runs faster than its
    transpose. Larger means "closer" for expansion and merging. With ``nearest=False`` (the published behaviour)
    the raw distance is used as the score for manhattan and euclidean too, so "closest" is in fact the farthest
    token; ``nearest=True`` negates distances instead.
    """
    if rows.dim() == 1:
        sel = xn.index_select(1, rows)
    else:      # whole rows by flat index: much cheaper than a gather with an index expanded over channels
        batch, num_tokens, dim = xn.shape
        flat = rows + (_arange(batch, xn.device) * num_tokens).unsqueeze(1)
        sel = xn.reshape(batch * num_tokens, dim).index_select(0, flat.reshape(-1)).view(batch, -1, dim)
    if distance == "cosine":
        return sel @ xn.transpose(-1, -2)
    p = 1.0 if distance == "manhattan" else 2.0
    dist = torch.cdist(sel, xn, p=p, compute_mode="donot_use_mm_for_euclid_dist")
    return -dist if nearest else dist


def select_tokens(xn: torch.Tensor, schedule: ToESchedule, stage: int, distance: str = "cosine",
                  nearest: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Initialization and expansion on normalised patch tokens ``xn`` ``[B, N, C]``.

    Only the scores against selected tokens are ever needed, so they are computed block by block as tokens are
    selected (``M x N`` instead of ``N x N`` products). Returns ``kept`` (``[B, M]`` patch positions in the reference
    order) and ``assign`` (``[B, N]``: the slot in ``kept`` that every patch token ends up in: its own slot if kept,
    else its closest kept token's slot).
    """
    batch, num_tokens, _ = xn.shape
    inf = float("inf")
    seeds = seed_positions(num_tokens, schedule.init_keep_rate, xn.device)
    blocks = [scores_to(xn, seeds, distance, nearest)]                                # [B, m, N] per block
    # best[b, j]: score of token j to its closest selected token; +inf once j itself is selected
    best = blocks[0].amax(1).index_fill_(1, seeds, inf)
    parts: List[torch.Tensor] = [seeds.expand(batch, -1)]
    for size in schedule.chunk_sizes(num_tokens, stage):
        if size == 0:
            continue
        # the unselected tokens least similar to the selected set are the most novel: add them
        added = best.topk(size, dim=1, largest=False, sorted=True).indices
        parts.append(added)
        blocks.append(scores_to(xn, added, distance, nearest))
        best = torch.maximum(best, blocks[-1].amax(1)).scatter_(1, added, inf)
    kept = torch.cat(parts, dim=1)                                                       # [B, M]
    # merging: every unselected token goes to its closest kept token (first one on ties, as torch.max) ...
    assign = torch.cat(blocks, dim=1).argmax(1)                                          # [B, N]
    # ... and every kept token stays in its own slot
    assign.scatter_(1, kept, _arange(kept.shape[1], xn.device).expand(batch, -1))
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
        kept, assign = select_tokens(normalize(x[:, num_prefix:]), schedule, stage, schedule.distance, nearest)
        prefix_slots = _arange(num_prefix, x.device).expand(batch, -1)
        index = torch.cat([prefix_slots, kept + num_prefix], dim=1)                      # [B, P + M]
        out_len = index.shape[1]
        # output row of every input row: prefix tokens first, then the groups of the kept tokens; flattened over
        # the batch so that merging moves whole rows (index_add / its backward index_select)
        slot = torch.cat([prefix_slots, assign + num_prefix], dim=1)                     # [B, P + N]
        flat = (slot + (_arange(batch, x.device) * out_len).unsqueeze(1)).reshape(-1)
        counts = x.new_zeros(batch * out_len).index_add_(0, flat, x.new_ones(batch * length))

    sums = x.new_zeros(batch * out_len, dim).index_add(0, flat, x.reshape(batch * length, dim))
    return (sums / counts.unsqueeze(1)).view(batch, out_len, dim), index
