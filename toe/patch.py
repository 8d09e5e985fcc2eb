"""Patch Token Expansion into a live timm ViT, without forking its code or changing its weights.

``apply_toe`` attaches a parameter-free :class:`TokenExpansion` module as ``model.toe`` and registers it as a
forward pre-hook of ``model.blocks[insert_block]``. A pre-hook (rather than a custom ``blocks.forward``) is what
timm's ``checkpoint_seq`` still calls under grad checkpointing, because it calls every block module itself.

Because ``model.toe`` is a sub-module: ``model.eval()`` turns it off (ToE is a training-time method), the model's
``state_dict`` is unchanged (no parameters, no buffers), and ``copy.deepcopy`` (model EMA) gives the copy its own
operator bound to its own hook. :func:`set_epoch` reaches every copy through ``.modules()``, so it works on the
DDP wrapper and on the EMA alike.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from models.tokens import token_positions

from .ops import token_expansion
from .schedule import ToESchedule

DISTANCE_MODES = ("published", "nearest")


class TokenExpansion(nn.Module):
    """The ToE operator with its stage state. Call it on ``[B, P + N, C]`` tokens; it returns ``(x, kept_index)``.

    Active while training, or in evaluation when ``sparse_eval`` is set, and only in stages that reduce tokens.
    ``kept_index`` (``[B, P + M]``, position in the input of every output row, or ``None``) of the last call is also
    kept in ``self.kept_index`` and, when ``positions`` is set, recorded in the model's
    :class:`models.tokens.TokenPositions`, so models with dense outputs (LV-ViT) can scatter tokens back to the grid.
    """

    def __init__(self, schedule: ToESchedule, num_prefix_tokens: int = 1, insert_block: int = 1,
                 sparse_eval: bool = False, distance_mode: str = "published"):
        super().__init__()
        if distance_mode not in DISTANCE_MODES:
            raise ValueError(f"toe.distance_mode '{distance_mode}' is not one of {DISTANCE_MODES}")
        self.schedule = schedule
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.insert_block = int(insert_block)
        self.sparse_eval = bool(sparse_eval)
        self.distance_mode = distance_mode
        self.epoch = 0
        self.stage = schedule.stage(0)
        self.kept_index: Optional[torch.Tensor] = None
        self.positions = None           # the model's models.tokens.TokenPositions, where the kept index is recorded

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.stage = self.schedule.stage(self.epoch)

    @property
    def active(self) -> bool:
        return (self.training or self.sparse_eval) and self.schedule.is_reducing(self.stage)

    def kept_tokens(self, num_tokens: int) -> int:
        """Patch tokens after the operator for ``num_tokens`` input patches, in the current stage and mode."""
        return self.schedule.kept_tokens(num_tokens, self.stage) if self.active else num_tokens

    def forward(self, x: torch.Tensor):
        if not self.active:
            self.kept_index = None
            return x, None
        x, index = token_expansion(x, self.schedule, self.stage, self.num_prefix_tokens,
                                   nearest=self.distance_mode == "nearest")
        self.kept_index = index
        if self.positions is not None:
            self.positions.record(self.insert_block, index)
        return x, index

    def _pre_hook(self, block: nn.Module, args, kwargs):
        if not self.active:
            self.kept_index = None
            return None
        if kwargs.get("attn_mask") is not None:
            raise RuntimeError("ToE changes the token count and cannot be combined with an attention mask")
        x, _ = self(args[0])
        return (x, *args[1:]), kwargs

    def extra_repr(self) -> str:
        s = self.schedule
        return (f"steps={list(s.expansion_steps)}, keep_rates={list(s.keep_rates)}, init_keep_rate={s.init_keep_rate}, "
                f"repeat_k={s.repeat_k}, distance={s.distance}/{self.distance_mode}, insert_block={self.insert_block}, "
                f"prefix={self.num_prefix_tokens}, sparse_eval={self.sparse_eval}, stage={self.stage}")


def find_toe(model: nn.Module) -> Optional[TokenExpansion]:
    """The first ToE operator inside ``model`` (also through DDP or EMA wrappers), or ``None``."""
    return next(iter_toe(model), None)


def iter_toe(model: nn.Module) -> Iterator[TokenExpansion]:
    return (m for m in model.modules() if isinstance(m, TokenExpansion))


def set_epoch(model: nn.Module, epoch: int) -> Optional[int]:
    """Move every ToE operator in ``model`` to the stage of ``epoch``; returns that stage (``None`` without ToE)."""
    stage = None
    for toe in iter_toe(model):
        toe.set_epoch(epoch)
        stage = toe.stage
    return stage


def set_sparse_eval(model: nn.Module, enabled: bool) -> None:
    for toe in iter_toe(model):
        toe.sparse_eval = bool(enabled)


def apply_toe(model: nn.Module, schedule: ToESchedule, insert_block: int = 1, sparse_eval: bool = False,
              distance_mode: str = "published") -> TokenExpansion:
    """Patch ToE into ``model`` (a timm ``VisionTransformer`` or anything with ``blocks`` and ``num_prefix_tokens``).

    ``insert_block=1`` runs ToE on the output of the first block, as the paper does.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"{type(model).__name__} has no `blocks` sequence; ToE patches timm-style ViTs")
    if find_toe(model) is not None:
        raise RuntimeError("ToE is already applied to this model")
    if not 0 <= insert_block < len(blocks):
        raise ValueError(f"toe.insert_block {insert_block} is outside 0..{len(blocks) - 1} for a {len(blocks)}-block model")
    toe = TokenExpansion(schedule, getattr(model, "num_prefix_tokens", 1), insert_block, sparse_eval, distance_mode)
    toe.positions = token_positions(model)
    model.toe = toe
    blocks[insert_block].register_forward_pre_hook(toe._pre_hook, with_kwargs=True)
    return toe


def remove_toe(model: nn.Module) -> None:
    """Undo :func:`apply_toe`: the model becomes the plain timm model again."""
    toe = getattr(model, "toe", None)
    if not isinstance(toe, TokenExpansion):
        return
    for block in model.blocks:
        for key, hook in list(block._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is toe:
                del block._forward_pre_hooks[key]
                block._forward_pre_hooks_with_kwargs.pop(key, None)
    del model.toe
