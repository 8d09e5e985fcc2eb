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


def _fill_positions(num_tokens: int, init_keep_rate: float, count: int, device: torch.device) -> torch.Tensor:
    """``count`` non-seed positions spread evenly over the raster order of the non-seed positions (deterministic).

    With ``P`` the ascending positions that are not published seeds, position ``j`` of the fill is
    ``P[floor(j * len(P) / count)]``: a feature-free, spatially even extension of the seed grid (for the DeiT schedule
    the seeds are every 4th token and a fill of 49 takes every 3rd non-seed token, 1, 5, 9, ...).
    """
    def make():
        seeds = set(torch.arange(0, num_tokens, int(1 // init_keep_rate))[:int(num_tokens * init_keep_rate)].tolist())
        rest = [i for i in range(num_tokens) if i not in seeds]
        picks = [rest[(j * len(rest)) // count] for j in range(count)] if count else []
        return torch.tensor(picks, dtype=torch.long).to(device)
    return _cached(("fill", num_tokens, init_keep_rate, count, str(device)), make)


def select_tokens_ablation(xn: torch.Tensor, schedule: ToESchedule, stage: int, distance: str = "cosine",
                           nearest: bool = False, with_assign: bool = True
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`select_tokens` for the pipeline ablations (``schedule.init`` / ``schedule.expansion``); same outputs.

    Every ablation keeps exactly the published number of tokens per stage (``m = int(N * r0)`` seeds, then the
    schedule's ``chunk_sizes``): an ablation row changes *which* tokens are kept at the same speed-up, so its
    accuracy difference is the value of the replaced step and not of a different token budget (the speed-up factor
    is its own ablation: ``keep_rates`` / ``init_keep_rate``). Our reading of the paper's component ablation; the
    paper's table itself was not recovered (``docs/sources.md``, ToE).

    * ``init: grid`` (published): the raster-stride seeds of :func:`seed_positions`, shared by the batch.
      ``init: random``: an independent uniformly random set of ``m`` patch positions per image, in raster order.
    * ``expansion: farthest`` (published): from those seeds, ``repeat_k`` sub-steps per stage each add the tokens
      least similar to the selected set (the published rule, also its distance quirk), exactly as
      :func:`select_tokens` does. ``expansion: random``: the same number of tokens, a uniformly random subset of the
      non-seed tokens per image (in random order; the sub-steps of a random draw are one draw).
      ``expansion: none``: no expansion step, the initialization alone picks all kept tokens: the seeds plus the
      stage's remaining count chosen by the seed rule without features, i.e. for ``grid`` the non-seed positions
      spread evenly in raster order (:func:`_fill_positions`, the same for every image), for ``random`` further
      random positions (so ``random`` + ``none`` is the same distribution as ``random`` + ``random``: a uniform random
      subset).
    * merging is the caller's (``schedule.merge``); ``assign`` is only computed when ``with_assign``, and then each
      unselected token goes to its closest kept token by the configured distance, as published.

    Random draws come from torch's default generator of ``xn``'s device (``torch.rand``): grad checkpointing restores
    that generator's state for the recomputation, so it redraws the same tokens, and the trainer's per-epoch
    reseeding makes a run and its resumption draw the same ones.
    """
    batch, num_tokens, _ = xn.shape
    sizes = [s for s in schedule.chunk_sizes(num_tokens, stage) if s > 0]
    seeds, order, noise = _ablation_seeds(xn, schedule, schedule.num_seeds(num_tokens), sum(sizes))
    blocks: List[torch.Tensor] = []
    if schedule.expansion == "farthest":
        kept, blocks = _farthest_expansion(xn, seeds, sizes, distance, nearest)
    else:
        kept = _featureless_expansion(schedule, seeds, order, noise, num_tokens, sum(sizes))
    if not with_assign:
        return kept, None
    scores = torch.cat(blocks, dim=1) if blocks else scores_to(xn, kept, distance, nearest)    # [B, M, N]
    assign = scores.argmax(1)
    assign.scatter_(1, kept, _arange(kept.shape[1], xn.device).expand(batch, -1))
    return kept, assign


def _ablation_seeds(xn: torch.Tensor, schedule: ToESchedule, num_seeds: int, extra: int
                    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The seeds by ``schedule.init`` (raster order), the random order they were drawn from (``init: random``: the
    lowest-noise positions, seeds first, then the ``extra`` further ones when no feature rule follows) and the noise
    (``[B, N]``, drawn once when either step is random); ``None`` where not drawn."""
    batch, num_tokens, _ = xn.shape
    noise = order = None
    if schedule.init == "random" or schedule.expansion == "random":
        noise = torch.rand(batch, num_tokens, device=xn.device)                          # [B, N], uniform
    if schedule.init == "random":
        # the m lowest-noise positions: a uniform random m-subset per image
        if schedule.expansion == "farthest":
            order = noise.topk(num_seeds, dim=1, largest=False, sorted=False).indices
        else:      # one draw serves both: the next `extra` lowest-noise positions are a random non-seed subset
            order = noise.topk(num_seeds + extra, dim=1, largest=False, sorted=True).indices
        seeds = order[:, :num_seeds].sort(dim=1).values                                   # raster order
    else:
        seeds = seed_positions(num_tokens, schedule.init_keep_rate, xn.device).expand(batch, -1)
    return seeds, order, noise


def _farthest_expansion(xn: torch.Tensor, seeds: torch.Tensor, sizes: List[int], distance: str, nearest: bool
                        ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``expansion: farthest``: from ``seeds``, each sub-step adds the ``size`` tokens least similar to the selected
    set; the kept positions and the score blocks of every added set (the assignment reuses them)."""
    inf = float("inf")
    parts = [seeds]
    blocks = [scores_to(xn, seeds, distance, nearest)]
    best = blocks[0].amax(1).scatter_(1, seeds, inf)
    for size in sizes:
        added = best.topk(size, dim=1, largest=False, sorted=True).indices
        parts.append(added)
        blocks.append(scores_to(xn, added, distance, nearest))
        best = torch.maximum(best, blocks[-1].amax(1)).scatter_(1, added, inf)
    return torch.cat(parts, dim=1), blocks


def _featureless_expansion(schedule: ToESchedule, seeds: torch.Tensor, order: Optional[torch.Tensor],
                           noise: Optional[torch.Tensor], num_tokens: int, extra: int) -> torch.Tensor:
    """``expansion: random`` or ``none``: the seeds and ``extra`` more tokens chosen without features."""
    batch, num_seeds = seeds.shape
    if schedule.init == "random":                      # random or none after random seeds: the same draw
        added = order[:, num_seeds:]
        if schedule.expansion == "none":
            added = added.sort(dim=1).values
        return torch.cat([seeds, added], dim=1)
    if schedule.expansion == "random":                 # grid seeds, then a random subset of the other tokens
        added = noise.scatter_(1, seeds, float("inf")).topk(extra, dim=1, largest=False, sorted=True).indices
        return torch.cat([seeds, added], dim=1)
    fill = _fill_positions(num_tokens, schedule.init_keep_rate, extra, seeds.device)   # grid seeds, none: even fill
    return torch.cat([seeds, fill.expand(batch, -1)], dim=1)


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

    The pipeline ablations of ``schedule`` (``init``, ``expansion``, ``merge``; see :func:`select_tokens_ablation`)
    take their own branch; the published one (grid, farthest, mean) runs the same code as before they existed.
    ``merge: drop``: the kept tokens pass through unchanged and the unselected ones are discarded (no averaging, no
    gradient to them), i.e. the output rows are the input rows at the kept positions.
    """
    if not schedule.is_reducing(stage):
        return x, None
    batch, length, dim = x.shape
    num_prefix = num_prefix_tokens

    if not schedule.published_selection or schedule.merge != "mean":
        return _token_expansion_ablation(x, schedule, stage, num_prefix, nearest)

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


def _token_expansion_ablation(x: torch.Tensor, schedule: ToESchedule, stage: int, num_prefix: int,
                              nearest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_expansion` with a pipeline ablation: the selection of :func:`select_tokens_ablation` (or the
    published one), merged by the mean as published or dropped (``merge: drop``)."""
    batch, length, dim = x.shape
    drop = schedule.merge == "drop"
    with torch.no_grad():
        xn = normalize(x[:, num_prefix:])
        if schedule.published_selection:
            kept, assign = select_tokens(xn, schedule, stage, schedule.distance, nearest)
        else:
            kept, assign = select_tokens_ablation(xn, schedule, stage, schedule.distance, nearest, with_assign=not drop)
        prefix_slots = _arange(num_prefix, x.device).expand(batch, -1)
        index = torch.cat([prefix_slots, kept + num_prefix], dim=1)                      # [B, P + M]
        out_len = index.shape[1]
        if drop:
            rows = (index + (_arange(batch, x.device) * length).unsqueeze(1)).reshape(-1)
        else:
            slot = torch.cat([prefix_slots, assign + num_prefix], dim=1)                 # [B, P + N]
            flat = (slot + (_arange(batch, x.device) * out_len).unsqueeze(1)).reshape(-1)
            counts = x.new_zeros(batch * out_len).index_add_(0, flat, x.new_ones(batch * length))
    if drop:
        return x.reshape(batch * length, dim).index_select(0, rows).view(batch, out_len, dim), index
    sums = x.new_zeros(batch * out_len, dim).index_add(0, flat, x.reshape(batch * length, dim))
    return (sums / counts.unsqueeze(1)).view(batch, out_len, dim), index
