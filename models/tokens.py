"""Which original tokens the blocks of a model see, after any number of token-reducing methods.

Methods that drop, sample or merge tokens (ToE, PSS, Tri-Level's pruning) record, for every place ("site") where
they change the token list, the positions they kept *in their own input*. Code that needs *original* positions
composes them: a dense-output model scatters its tokens back to the grid (LV-ViT's token labels), and a
relative-position-bias attention looks up the bias of the pairs it really sees (PSS's DeiT).

A site is a float on the block axis: ``b`` is the input of block ``b``; ``b + 0.5`` is inside block ``b``, after its
attention (Tri-Level). Records are per forward pass: a forward pre-hook on the model clears them. Writing the same
site twice (gradient checkpointing recomputes a block and so re-runs its hooks) replaces the record, so the
composition stays right.

    positions = token_positions(model)          # attach once (idempotent); reducers keep a reference
    positions.record(site, index)               # in a reducer: index [B, T_out] into its input tokens
    positions.before(site)                      # original positions of the tokens at ``site`` ([B, T] or None)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class TokenPositions:
    """Per-forward record of kept positions, one ``[B, T_out]`` index per reducing site."""

    def __init__(self):
        self.sites: Dict[float, torch.Tensor] = {}

    def clear(self, *_args) -> None:
        self.sites = {}

    def record(self, site: float, index: Optional[torch.Tensor]) -> None:
        """Tokens at ``site`` were reduced to ``index`` (positions in the tokens that reached the site); ``None`` =
        unchanged here."""
        if index is None:
            self.sites.pop(float(site), None)
        else:
            self.sites[float(site)] = index

    def before(self, site: float = float("inf")) -> Optional[torch.Tensor]:
        """Original positions of the tokens that reach ``site`` (every record at a site ``<= site``), or ``None`` if
        no token was dropped or reordered on the way (the full, original token list)."""
        out = None
        for s in sorted(self.sites):
            if s > site:
                break
            index = self.sites[s]
            out = index if out is None else out.gather(1, index)
        return out

    @property
    def reduced(self) -> bool:
        return bool(self.sites)


def token_positions(model: nn.Module) -> TokenPositions:
    """The model's :class:`TokenPositions`, created (with its clearing pre-hook) on first use.

    A plain attribute, not a sub-module: it adds nothing to the ``state_dict``. ``copy.deepcopy`` (the model EMA)
    gives the copy its own record and its own hook, because the hook is a bound method of the record.
    """
    positions = model.__dict__.get("_token_positions")
    if positions is None:
        positions = TokenPositions()
        model.__dict__["_token_positions"] = positions
        model.register_forward_pre_hook(positions.clear)
    return positions


def find_positions(model: nn.Module) -> Optional[TokenPositions]:
    """The record of ``model`` if any reducer attached one (``None`` for a model no method changed)."""
    return model.__dict__.get("_token_positions")


def restore_grid(x: torch.Tensor, positions: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Scatter tokens ``x`` ``[B, T, C]`` back to ``num_tokens`` original positions; zeros where none survived."""
    if positions is None:
        if x.shape[1] != num_tokens:
            raise RuntimeError(f"the blocks returned {x.shape[1]} tokens instead of {num_tokens}, and no token reducer "
                               "recorded which positions they are")
        return x
    if positions.shape[:2] != x.shape[:2]:
        raise RuntimeError(f"recorded positions {tuple(positions.shape)} do not match tokens {tuple(x.shape[:2])}")
    full = x.new_zeros(x.shape[0], num_tokens, x.shape[2])
    return full.scatter(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)
