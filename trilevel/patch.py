"""Patch Tri-Level's token and attention levels into a live timm ``VisionTransformer`` without forking its code.

``apply_trilevel`` swaps the class of every ``Block`` for :class:`TriLevelBlock` (a module-level subclass, so the
model still deep-copies and pickles, and ``remove_trilevel`` swaps it back). Weights, ``state_dict`` keys and the
attention module are untouched. A Tri-Level block computes its attention with :func:`~trilevel.ops.masked_attention`
under the connection mask of the last pruning site before it (all ones before the first) and, at a pruning site,
prunes after the attention residual and before the MLP, as the authors' block does.

Blocks take and return one tensor, so the masks travel in :class:`TriLevelState`, keyed by the pruning site that
made them (``None`` when it is all ones); a block reads the mask of the latest site before it. That is what keeps
timm's grad checkpointing right: ``checkpoint_seq`` calls every block module, and a recomputed block reads the same
mask as in the forward pass (a single "current mask" would hold the last site's by then). A forward pre-hook on the
model clears the masks.

Kept positions go to the generic record of :mod:`models.tokens` at site ``b + 0.5`` (``[B, P + k]`` into the tokens
that reached the site, prefix first), so dense-output models can compose them back to the grid.

The pruning step itself (ranking, keeping, the connection mask) is a parameter-free sub-module of each pruning block,
:class:`TriLevelPrune` (``blocks.<b>.trilevel_prune``), so that measurement can count and time the method's own
operator apart from the blocks it runs in; it adds no ``state_dict`` key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from models.tokens import TokenPositions, token_positions

from .ops import cls_attention, masked_attention, num_kept, prune_tokens
from .schedule import TriLevelConfigError, check_pruning_loc, check_ratio


@dataclass
class TriLevelState:
    """What every Tri-Level block of one model reads: the ratios in effect and the per-forward masks.

    Training uses ``keep_ratio`` / ``attn_ratio`` (set from outside every iteration, see :func:`set_ratios`);
    evaluation uses the targets, as published, or timm's own dense blocks with ``dense_eval``. With ``enabled`` off,
    or with ``dense_shortcut`` and both ratios in effect at 1, every block runs timm's own forward (exactly the
    plain model: softmax attention, no reordering) instead of the published masked form (within ~1e-6 of it).
    ``keep_cls_attn`` keeps the last block's CLS attention (``cls_attn``, ``[B, N]``) for the ``cls`` tie-break.
    ``forced`` (measurement): run at these ratios in training and evaluation alike.
    """

    target_keep_ratio: float = 0.7
    target_attn_ratio: float = 0.3
    pruning_loc: Tuple[int, ...] = (3, 6, 9)
    num_prefix_tokens: int = 1
    depth: int = 12
    keep_ratio: float = 1.0
    attn_ratio: float = 1.0
    enabled: bool = True
    dense_eval: bool = False
    dense_shortcut: bool = False
    keep_cls_attn: bool = False
    forced: Optional[Tuple[float, float]] = None
    positions: Optional[TokenPositions] = field(default=None, repr=False, compare=False)
    masks: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    cls_attn: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    # this forward's attention probabilities of each pruning block, for its TriLevelPrune operator (no gradient)
    attn: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def ratios(self, training: bool) -> Optional[Tuple[float, float]]:
        """``(r, a)`` the blocks run at, or ``None`` for timm's own dense forward."""
        if not self.enabled:
            return None
        if self.forced is not None:
            r, a = self.forced
        elif not training and self.dense_eval:
            return None
        else:
            r, a = (self.keep_ratio, self.attn_ratio) if training else (self.target_keep_ratio, self.target_attn_ratio)
        if self.dense_shortcut and r == 1.0 and a == 1.0:
            return None
        return r, a

    def mask_before(self, block: int) -> Optional[torch.Tensor]:
        """Connection mask block ``block`` receives: the latest pruning site before it (``None``: all ones)."""
        sites = [s for s in self.pruning_loc if s < block]
        if not sites:
            return None
        if sites[-1] not in self.masks:
            raise RuntimeError(f"trilevel: block {block} runs before pruning block {sites[-1]} made its mask "
                               "(blocks must run in order within one forward pass)")
        return self.masks[sites[-1]]

    def clear(self, *_args) -> None:
        """Forward pre-hook of the model: a new pass starts with no masks."""
        self.masks = {}
        self.attn = {}
        self.cls_attn = None


class TriLevelBlock(Block):
    """A timm ``Block`` in Tri-Level form; the instance keeps its weights, ``_trilevel`` and ``_trilevel_index``."""

    _trilevel: TriLevelState
    _trilevel_index: int

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        state, index = self._trilevel, self._trilevel_index
        ratios = state.ratios(self.training)
        if ratios is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise RuntimeError("trilevel: the blocks make their own attention masks; an external attn_mask or "
                               "is_causal cannot be combined with Tri-Level")
        out, attn = _attention(self.attn, self.norm1(x), state.mask_before(index))
        x = x + self.drop_path1(self.ls1(out))
        if index in state.pruning_loc:
            state.attn[index] = attn.detach()
            x = self.trilevel_prune(x)
        if state.keep_cls_attn and index == state.depth - 1:
            state.cls_attn = cls_attention(attn, state.num_prefix_tokens).detach()
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TriLevelPrune(nn.Module):
    """The pruning step of one pruning block, on the tokens after its attention residual ``[B, P + N, C]``: keep the
    top ``ceil(N * r)`` patches by CLS attention and build the connection mask of the following blocks
    (:func:`~trilevel.ops.prune_tokens`), from the attention its block left in the state. Parameter-free."""

    def __init__(self, state: TriLevelState, index: int):
        super().__init__()
        self.__dict__["_trilevel"] = state          # a plain attribute: the state is no sub-module
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._trilevel
        attn = state.attn.get(self.index)
        if attn is None or attn.shape[-1] != x.shape[1]:
            raise RuntimeError(f"trilevel: the pruning operator of block {self.index} runs without its block's "
                               "attention of this forward pass")
        r, a = state.ratios(self.training) or (1.0, 1.0)
        prefix = state.num_prefix_tokens
        x, kept, mask = prune_tokens(x, attn, r, a, prefix)
        k = kept.shape[1]
        # an all-ones mask is kept as None: the attention then skips the product with it (the same values)
        state.masks[self.index] = None if num_kept(k, a) >= k else mask
        if state.positions is not None:
            head = torch.arange(prefix, device=kept.device).expand(kept.shape[0], prefix)
            state.positions.record(self.index + 0.5, torch.cat([head, kept + prefix], dim=1))
        return x

    def extra_repr(self) -> str:
        return f"block={self.index}"


def _attention(module: Attention, x: torch.Tensor, mask: Optional[torch.Tensor]):
    """timm ``Attention`` with the published masked renormalisation: ``(output, probabilities)``.

    The probabilities (after attention dropout, as the authors rank on them) stay float32 for the ranking; the
    product with the values runs in the values' dtype (autocast would cast it there anyway).
    """
    batch, num_tokens, _ = x.shape
    gate = module.gate(x).sigmoid() if module.gate is not None else None
    qkv = module.qkv(x).reshape(batch, num_tokens, 3, module.num_heads, module.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    attn = module.attn_drop(masked_attention((q * module.scale) @ k.transpose(-2, -1), mask))
    out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(batch, num_tokens, module.attn_dim)
    out = module.norm(out)
    if gate is not None:
        out = out * gate
    return module.proj_drop(module.proj(out)), attn


def _check_model(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TriLevelConfigError(f"trilevel: {type(model).__name__} has no `blocks` sequence; Tri-Level patches "
                                  "timm VisionTransformer models")
    for i, blk in enumerate(blocks):
        if type(blk) not in (Block, TriLevelBlock) or type(blk.attn) is not Attention:
            raise TriLevelConfigError(f"trilevel: block {i} is {type(blk).__name__} with {type(blk.attn).__name__}; "
                                      "Tri-Level patches timm's Block with its standard Attention only")
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token" \
            or getattr(model, "attn_pool", None) is not None:
        raise TriLevelConfigError("trilevel: the model has no CLS token read by the head (class_token=False or "
                                  "global_pool != 'token'); Tri-Level ranks and classifies with the CLS token")
    return blocks


def apply_trilevel(model: nn.Module, keep_ratio: float = 0.7, attn_ratio: float = 0.3,
                   pruning_loc: Sequence[int] = (3, 6, 9), dense_eval: bool = False,
                   dense_shortcut: bool = False) -> TriLevelState:
    """Patch Tri-Level into ``model`` (a timm ``VisionTransformer`` with a CLS token) and return its state.

    ``keep_ratio`` / ``attn_ratio`` are the targets (evaluation runs at them); training starts at ratios 1 until
    :func:`set_ratios` is called. Prefix tokens (a distillation token, registers) are kept like the CLS token.
    """
    blocks = _check_model(model)
    if find_trilevel(model) is not None:
        raise TriLevelConfigError("trilevel: already applied to this model")
    state = TriLevelState(target_keep_ratio=check_ratio(keep_ratio, "keep_ratio"),
                          target_attn_ratio=check_ratio(attn_ratio, "attn_ratio"),
                          pruning_loc=check_pruning_loc(pruning_loc, len(blocks)),
                          num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)), depth=len(blocks),
                          dense_eval=bool(dense_eval), dense_shortcut=bool(dense_shortcut),
                          positions=token_positions(model))
    for i, blk in enumerate(blocks):
        blk.__class__ = TriLevelBlock
        blk._trilevel = state
        blk._trilevel_index = i
        if i in state.pruning_loc:
            blk.trilevel_prune = TriLevelPrune(state, i)
    model.__dict__["_trilevel"] = state
    model.register_forward_pre_hook(state.clear)
    return state


def remove_trilevel(model: nn.Module) -> None:
    """Undo :func:`apply_trilevel`: the model is the plain timm model again."""
    state = model.__dict__.pop("_trilevel", None)
    if state is None:
        return
    for blk in model.blocks:
        if type(blk) is TriLevelBlock:
            blk.__class__ = Block
            del blk._trilevel, blk._trilevel_index
            if "trilevel_prune" in blk._modules:
                del blk.trilevel_prune
    for key, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "__self__", None) is state:
            del model._forward_pre_hooks[key]
    if state.positions is not None:
        for site in state.pruning_loc:
            state.positions.record(site + 0.5, None)


def find_trilevel(model: nn.Module) -> Optional[TriLevelState]:
    """The state of the first patched model inside ``model`` (also through DDP / EMA wrappers), or ``None``."""
    return next(iter_trilevel(model), None)


def iter_trilevel(model: nn.Module) -> Iterator[TriLevelState]:
    """Every patched model's state inside ``model`` (the trained model and, if wrapped together, its EMA copy)."""
    seen = set()
    for m in model.modules():
        state = m.__dict__.get("_trilevel")
        if state is not None and id(state) not in seen:
            seen.add(id(state))
            yield state


def set_ratios(model: nn.Module, keep_ratio: float, attn_ratio: float) -> None:
    """Training ratios for the next iterations (the schedule's value, read before each iteration)."""
    for state in iter_trilevel(model):
        state.keep_ratio, state.attn_ratio = float(keep_ratio), float(attn_ratio)


def set_dense_eval(model: nn.Module, enabled: bool) -> None:
    """Evaluate on all tokens with timm's own blocks (``True``) or at the target ratios as published (``False``)."""
    for state in iter_trilevel(model):
        state.dense_eval = bool(enabled)


def set_forced(model: nn.Module, ratios: Optional[Tuple[float, float]]) -> None:
    """Run at ``(r, a)`` in training and evaluation alike (measurement of one schedule state); ``None`` undoes it."""
    for state in iter_trilevel(model):
        state.forced = None if ratios is None else (float(ratios[0]), float(ratios[1]))


def iter_prune_ops(model: nn.Module) -> Iterator["TriLevelPrune"]:
    """The pruning operators inside ``model`` (one per pruning block of each patched model)."""
    return (m for m in model.modules() if isinstance(m, TriLevelPrune))


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch the method off (``False``: timm's own blocks everywhere, in training too) or back on."""
    for state in iter_trilevel(model):
        state.enabled = bool(enabled)
