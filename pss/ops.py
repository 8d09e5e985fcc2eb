"""The patch sampling operator of PSS and its patch into a live timm ViT.

The published model samples right before block 0, on the tokens after the class token was prepended and the
absolute position embedding added; every block then runs on the subset. Here that is a forward pre-hook of
``model.blocks[0]`` (what timm's ``checkpoint_seq`` / ``checkpoint`` still call under grad checkpointing), so any
timm-style ViT works unchanged: timm ``VisionTransformer``, timm ``Beit``, LV-ViT and the PSS models of
:mod:`pss.models`. The kept positions are recorded in the model's :class:`~models.tokens.TokenPositions`, which is
how a relative-position-bias attention (:mod:`pss.models`) looks up the bias of the pairs it really sees.

Compared with the published gather (a ``[B * k]`` pair of advanced indices), the gather here is one ``index_select``
of whole rows on the flattened ``[B * T, C]`` view: its backward is an ``index_add`` of rows, every size is a Python
int (no host-device sync, no data-dependent shape), and nothing is reordered when nothing is dropped.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn

from models.tokens import TokenReducer, gather_tokens, install_reducer, iter_reducers, remove_reducer

from .schedule import num_kept_patches

SAMPLERS = ("magnitude", "random")


def patch_scores(patches: torch.Tensor) -> torch.Tensor:
    """Every patch token's share of the image's L1 mass ``[B, N, C] -> [B, N]``: the published ranking score
    (``x.abs().sum(-1)`` divided by its per-image sum).

    Half-precision tokens are ranked in float32: a bf16 sum would tie many patches that the reference (run in
    float32 before its autocast region matters) tells apart. The division by the per-image sum cannot reorder
    distinct values, but rounding can make two of them equal, and ties decide which patches are kept: it stays.
    """
    if patches.dtype in (torch.float16, torch.bfloat16):
        patches = patches.float()
    scores = patches.abs().sum(-1)
    return scores / scores.sum(dim=1, keepdim=True)


def select_patches(x: torch.Tensor, num_keep: int, sampler: str, num_prefix_tokens: int = 1,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, num_keep]`` positions among the patch tokens (0-based, prefix not counted) in the order they are kept.

    ``magnitude``: the largest scores first, in descending order: the first ``num_keep`` of the published
    ``argsort(descending=True)``, the same call, so that equal scores (identical patches: flat image borders, or
    any two equal patches of a model without an absolute position embedding) keep the positions the published code
    keeps; ``topk`` breaks such ties otherwise.
    ``random``: an independent uniform subset per image, in increasing order of uniform noise, i.e. a uniformly
    random order (the reference takes the first k of an argsort of ``torch.rand``; ``topk`` of the same noise keeps
    the same set in the same order without sorting all N: continuous noise has no ties).
    """
    batch, num_patches = x.shape[0], int(x.shape[1]) - num_prefix_tokens
    with torch.no_grad():
        if sampler == "magnitude":
            scores = patch_scores(x[:, num_prefix_tokens:])
            return scores.argsort(dim=1, descending=True)[:, :num_keep]
        if sampler == "random":
            noise = torch.rand(batch, num_patches, device=x.device, generator=generator)
            return noise.topk(num_keep, dim=1, largest=False, sorted=True).indices
    raise ValueError(f"pss.sampler '{sampler}' is not one of {', '.join(SAMPLERS)}")


def sample_patches(x: torch.Tensor, num_keep: int, sampler: str, num_prefix_tokens: int = 1,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep the ``P`` prefix tokens and ``num_keep`` patches of ``x`` ``[B, P + N, C]``: ``(out, index)``.

    ``out`` is ``[B, P + num_keep, C]``: the prefix tokens (CLS, distillation, registers) first, untouched and in
    order, then the kept patches in the sampler's order (see :func:`select_patches`). ``index`` ``[B, P + num_keep]``
    long holds the position in ``x`` of every row of ``out`` (prefix positions ``0..P-1`` first). With
    ``num_keep == N`` nothing is sampled and ``(x, None)`` comes back, as the reference does at d = 0.
    """
    num_patches = int(x.shape[1]) - num_prefix_tokens     # int(): a traced size (fvcore, jit.trace) is a tensor
    if not 0 <= num_keep <= num_patches:
        raise ValueError(f"cannot keep {num_keep} of {num_patches} patches")
    if num_keep == num_patches:
        return x, None
    kept = select_patches(x, num_keep, sampler, num_prefix_tokens, generator)
    prefix = torch.arange(num_prefix_tokens, device=x.device, dtype=kept.dtype).expand(x.shape[0], -1)
    index = torch.cat([prefix, kept + num_prefix_tokens], dim=1)
    return gather_tokens(x, index), index


class PatchSampler(TokenReducer):
    """The PSS patch sampling step, with the drop ratio in effect (set from outside every iteration).

    A :class:`models.tokens.TokenReducer`: active while training (or always, with ``force``, for measurement) and
    only at a drop ratio above 0; otherwise a no-op that passes every token through. ``random`` draws from torch's
    default generator unless ``generator`` is set (keep it ``None`` in training: see the reducer's generator rule).
    """

    def __init__(self, sampler: str = "magnitude", num_prefix_tokens: int = 1):
        super().__init__(num_prefix_tokens)
        if sampler not in SAMPLERS:
            raise ValueError(f"pss.sampler '{sampler}' is not one of {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.drop_ratio = 0.0
        self.generator: Optional[torch.Generator] = None

    def set_drop_ratio(self, drop_ratio: float) -> None:
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"PSS drop ratio {drop_ratio} must lie in [0, 1)")
        self.drop_ratio = float(drop_ratio)

    @property
    def active(self) -> bool:
        return super().active and self.drop_ratio > 0.0

    def num_keep(self, num_patches: int) -> int:
        """Patches that leave the sampler for ``num_patches`` input patches, in the current mode: the published
        count, down to 0 (the class token alone, as the published code keeps it; a config whose schedule gets there
        is refused at start, see :meth:`pss.method.PatchSamplingSchedule.patch`)."""
        if not self.active:
            return num_patches
        keep = num_kept_patches(num_patches, self.drop_ratio)
        if keep < 0:
            raise ValueError(f"PSS drop ratio {self.drop_ratio} keeps {keep} of {num_patches} patches")
        return keep

    def reduce(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        num_patches = int(x.shape[1]) - self.num_prefix_tokens
        return sample_patches(x, self.num_keep(num_patches), self.sampler, self.num_prefix_tokens, self.generator)

    def _pre_hook(self, block: nn.Module, args, kwargs):
        out = super()._pre_hook(block, args, kwargs)
        if out is not None and kwargs.get("shared_rel_pos_bias") is not None:
            raise RuntimeError("PSS cannot sample patches with BEiT's shared relative position bias")
        return out

    def extra_repr(self) -> str:
        return (f"sampler={self.sampler}, drop_ratio={self.drop_ratio}, prefix={self.num_prefix_tokens}, "
                f"site={self.site}, force={self.force}")


def iter_samplers(model: nn.Module) -> Iterator[PatchSampler]:
    """Every PSS sampler inside ``model`` (also through DDP and model-EMA wrappers)."""
    return iter_reducers(model, PatchSampler)


def find_sampler(model: nn.Module) -> Optional[PatchSampler]:
    return next(iter_samplers(model), None)


def set_drop_ratio(model: nn.Module, drop_ratio: float) -> None:
    """Set the drop ratio of every sampler in ``model`` (call once per iteration, before the forward)."""
    for sampler in iter_samplers(model):
        sampler.set_drop_ratio(drop_ratio)


def apply_sampler(model: nn.Module, sampler_name: str = "magnitude", site: float = 0.0) -> PatchSampler:
    """Patch PSS into ``model`` at the input of block ``site`` (the published: 0): anything with ``blocks`` and
    ``num_prefix_tokens`` (timm ViT, timm Beit, ours).

    Installs a :class:`PatchSampler` as ``model.pss`` (:func:`models.tokens.install_reducer`; ``with_kwargs``, so
    Beit's ``shared_rel_pos_bias`` keyword passes through). Per-block relative position biases (timm Beit attention)
    are switched to follow the sampled positions (:func:`pss.models.follow_positions`); a model-wide shared bias
    cannot follow them and is refused.
    """
    from .models import follow_positions  # models imports timm's beit; keep ops importable on its own

    if getattr(model, "rel_pos_bias", None) is not None:
        raise TypeError(f"{type(model).__name__} uses a shared relative position bias, which cannot follow sampled "
                        "patches (the published PSS code refuses it too); use per-block biases")
    sampler = install_reducer(model, PatchSampler(sampler_name, getattr(model, "num_prefix_tokens", 1)), site, "pss")
    follow_positions(model)
    return sampler


def remove_sampler(model: nn.Module) -> None:
    """Undo :func:`apply_sampler` (the position-following bias lookup stays: with nothing recorded it is timm's)."""
    remove_reducer(model, "pss")
