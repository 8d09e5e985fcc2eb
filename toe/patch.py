"""Patch Token Expansion into a live timm ViT, without forking its code or changing its weights.

``apply_toe`` installs a parameter-free :class:`TokenExpansion` as ``model.toe`` at the input of
``model.blocks[insert_block]`` (:func:`models.tokens.install_reducer`: a forward pre-hook, which timm's
``checkpoint_seq`` still calls under grad checkpointing). ``model.eval()`` turns it off (ToE is a training-time
method), the ``state_dict`` is unchanged, and ``copy.deepcopy`` (model EMA) gives the copy its own operator bound to
its own hook. :func:`set_epoch` reaches every copy through ``.modules()``, so it works on the DDP wrapper and on the
EMA alike.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from models.tokens import TokenReducer, install_reducer, iter_reducers, remove_reducer

from .ops import token_expansion
from .schedule import ToESchedule

DISTANCE_MODES = ("published", "nearest")


class TokenExpansion(TokenReducer):
    """The ToE operator with its stage state: a :class:`models.tokens.TokenReducer` at the input of ``insert_block``.

    Active while training, or in evaluation when ``sparse_eval`` (or ``force``) is set, and only in stages that
    reduce tokens. ``kept_index`` (``[B, P + M]``, position in the input of every output row, or ``None``) of the
    last call is recorded in the model's :class:`models.tokens.TokenPositions`, so models with dense outputs
    (LV-ViT) can scatter tokens back to the grid.
    """

    def __init__(self, schedule: ToESchedule, num_prefix_tokens: int = 1, sparse_eval: bool = False,
                 distance_mode: str = "published"):
        super().__init__(num_prefix_tokens)
        if distance_mode not in DISTANCE_MODES:
            raise ValueError(f"toe.distance_mode '{distance_mode}' is not one of {DISTANCE_MODES}")
        self.schedule = schedule
        self.sparse_eval = bool(sparse_eval)
        self.distance_mode = distance_mode
        self.epoch = 0
        self.stage = schedule.stage(0)

    @property
    def insert_block(self) -> int:
        return int(self.site)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.stage = self.schedule.stage(self.epoch)

    @property
    def active(self) -> bool:
        return (super().active or self.sparse_eval) and self.schedule.is_reducing(self.stage)

    def kept_tokens(self, num_tokens: int) -> int:
        """Patch tokens after the operator for ``num_tokens`` input patches, in the current stage and mode."""
        return self.schedule.kept_tokens(num_tokens, self.stage) if self.active else num_tokens

    def reduce(self, x: torch.Tensor):
        return token_expansion(x, self.schedule, self.stage, self.num_prefix_tokens,
                               nearest=self.distance_mode == "nearest")

    def extra_repr(self) -> str:
        s = self.schedule
        return (f"steps={list(s.expansion_steps)}, keep_rates={list(s.keep_rates)}, init_keep_rate={s.init_keep_rate}, "
                f"repeat_k={s.repeat_k}, distance={s.distance}/{self.distance_mode}, insert_block={self.insert_block}, "
                f"prefix={self.num_prefix_tokens}, sparse_eval={self.sparse_eval}, stage={self.stage}")


def find_toe(model: nn.Module) -> Optional[TokenExpansion]:
    """The first ToE operator inside ``model`` (also through DDP or EMA wrappers), or ``None``."""
    return next(iter_toe(model), None)


def iter_toe(model: nn.Module) -> Iterator[TokenExpansion]:
    return iter_reducers(model, TokenExpansion)


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
    """Patch ToE into ``model`` (a timm ``VisionTransformer`` or anything with ``blocks`` and ``num_prefix_tokens``)
    as ``model.toe``, at the input of ``insert_block`` (1: on the output of the first block, as the paper does)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and not 0 <= insert_block < len(blocks):
        raise ValueError(f"toe.insert_block {insert_block} is outside 0..{len(blocks) - 1} for a {len(blocks)}-block model")
    toe = TokenExpansion(schedule, getattr(model, "num_prefix_tokens", 1), sparse_eval, distance_mode)
    return install_reducer(model, toe, insert_block, "toe")


def remove_toe(model: nn.Module) -> None:
    """Undo :func:`apply_toe`: the model becomes the plain timm model again."""
    remove_reducer(model, "toe")
