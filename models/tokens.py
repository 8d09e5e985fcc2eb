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

A method that reduces tokens at the input of a block subclasses :class:`TokenReducer` (its ``reduce``) and installs
it with :func:`install_reducer` at the site its ``Method.token_site()`` declares; the hook, the record, staying on in
eval for measurement and the random-generator rule under gradient checkpointing come with it.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple, Type, TypeVar

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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``[B, T]`` positions in ``x``) of every image of ``x`` ``[B, L, C]``: ``[B, T, C]``.

    One ``index_select`` of whole rows on the flattened view: cheaper forward and backward than ``gather`` with an
    index expanded over the channels, and every size a Python int (no host-device sync).
    """
    batch, length, dim = x.shape
    flat = index + (torch.arange(batch, device=x.device) * length).unsqueeze(1)
    return x.reshape(batch * length, dim).index_select(0, flat.reshape(-1)).view(batch, index.shape[1], dim)


class TokenReducer(nn.Module):
    """An operator that changes the token list at the input of a block; subclasses implement :meth:`reduce`.

    Installed by :func:`install_reducer` as a parameter-free sub-module (the ``state_dict`` is unchanged, and
    ``copy.deepcopy``, the model EMA, gives the copy its own operator bound to its own hook) and a forward pre-hook
    of the block, which timm's ``checkpoint_seq`` still calls under gradient checkpointing. On while training; in
    evaluation only with ``force`` (measurement and inference sweeps), or where a subclass widens :attr:`active`.
    The kept index of the last call is recorded at ``site`` in the model's :class:`TokenPositions` and kept in
    ``kept_index``.

    Randomness: draw from torch's default generator in training. Gradient checkpointing's recompute restores only
    the default generators' state, so it redraws the same tokens from them; a private generator would silently hand
    the recomputed blocks other tokens.
    """

    def __init__(self, num_prefix_tokens: int = 1):
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.force = False
        self.site = 0.0
        self.positions: Optional[TokenPositions] = None     # a plain attribute (set by install_reducer)
        self.kept_index: Optional[torch.Tensor] = None

    @property
    def active(self) -> bool:
        return self.training or self.force

    def reduce(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(out, index)``: the tokens that go on and their positions in ``x`` (``[B, T_out]``; ``None``: ``x``
        itself, unchanged)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, index = self.reduce(x) if self.active else (x, None)
        self.kept_index = index
        if self.positions is not None:
            self.positions.record(self.site, index)
        return out

    def _pre_hook(self, block: nn.Module, args, kwargs):
        out = self(args[0])
        if out is args[0]:
            return None
        if kwargs.get("attn_mask") is not None:
            raise RuntimeError(f"{type(self).__name__} changes the token count and cannot be combined with an "
                               "attention mask")
        return (out, *args[1:]), kwargs


R = TypeVar("R", bound=TokenReducer)


def install_reducer(model: nn.Module, reducer: R, site: float, name: str) -> R:
    """Put ``reducer`` at the input of block ``site`` of ``model`` (a timm-style ViT) as ``model.<name>``."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no `blocks` sequence; {name} patches timm-style ViTs")
    if site != int(site) or not 0 <= site < len(blocks):
        raise ValueError(f"{name}: site {site} is not the input of a block 0..{len(blocks) - 1}")
    if isinstance(getattr(model, name, None), TokenReducer):
        raise RuntimeError(f"{name} is already applied to this model")
    reducer.site, reducer.positions = float(site), token_positions(model)
    setattr(model, name, reducer)
    blocks[int(site)].register_forward_pre_hook(reducer._pre_hook, with_kwargs=True)
    return reducer


def remove_reducer(model: nn.Module, name: str) -> None:
    """Undo :func:`install_reducer`: the model runs as before it (nothing recorded at the reducer's site)."""
    reducer = getattr(model, name, None)
    if not isinstance(reducer, TokenReducer):
        return
    for block in model.blocks:
        for key, hook in list(block._forward_pre_hooks.items()):
            if getattr(hook, "__self__", None) is reducer:
                del block._forward_pre_hooks[key]
                block._forward_pre_hooks_with_kwargs.pop(key, None)
    if reducer.positions is not None:
        reducer.positions.record(reducer.site, None)
    delattr(model, name)


def iter_reducers(model: nn.Module, cls: Type[R] = TokenReducer) -> Iterator[R]:
    """Every reducer of type ``cls`` inside ``model`` (also through DDP and model-EMA wrappers)."""
    return (m for m in model.modules() if isinstance(m, cls))
