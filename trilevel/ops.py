"""Tri-Level E-ViT's token and attention levels as pure tensor functions.

Every block of the published model computes its attention with :func:`masked_attention` (a renormalised exponential,
not a softmax) under a 0/1 connection mask; at the pruning blocks :func:`prune_tokens` keeps the patch tokens the
CLS token attends to most and builds the mask the following blocks use. :func:`token_counts` gives the resulting
sizes for a whole model without running it. Prefix tokens (CLS, a distillation token, registers) lead the sequence;
the CLS token is the first of them, ranks the patches and, with the other prefix tokens, is always kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

EPS = 1e-6


def masked_attention(logits: torch.Tensor, mask: Optional[torch.Tensor] = None, eps: float = EPS) -> torch.Tensor:
    """Attention probabilities ``[B, H, T, T]`` from scaled logits under a connection mask ``[B, T, T]`` (shared by
    the heads; ``None`` = all ones), computed as published so the rankings built on them match.

    The row maximum is taken over all keys, masked or not, the exponential in float32; masked keys keep ``eps / T``.
    Rows sum to 1, but when the maximum is a masked key the kept weights differ from a softmax over the kept keys.

    The forward runs exactly the published operations (same values, bit for bit). The backward is closed-form
    (:class:`MaskedAttention`): it keeps the output, the row denominators and the row-maximum positions instead of
    every intermediate of the chain (the activation memory of a plain softmax attention).
    """
    return MaskedAttention.apply(logits, mask, eps)


def masked_attention_reference(logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                               eps: float = EPS) -> torch.Tensor:
    """:func:`masked_attention` as a plain chain of autograd operations (the published expression)."""
    num_tokens = logits.shape[-1]
    p = (logits - logits.amax(dim=-1, keepdim=True)).to(torch.float32).exp()
    if mask is not None:
        p = p * mask.unsqueeze(1).to(torch.float32)
    return (p + eps / num_tokens) / (p.sum(dim=-1, keepdim=True) + eps)


class MaskedAttention(torch.autograd.Function):
    """``y = (e * m + eps / T) / (S + eps)``, ``e = exp(l - max(l))``, ``S = sum(e * m)``, per row.

    With ``q = e * m / (S + eps) = y - (eps / T) / (S + eps)`` and incoming gradient ``g``: the direct gradient is
    ``q * (g - <g, y>)``; the row maximum (a function of ``l`` too, not detached in the published code) adds
    ``-sum(direct)`` at its position. For a softmax (``eps = 0``) that term is zero; here it is not. Saved: the
    output, the row denominators and the row-maximum positions. Where a row's maximum is tied, that term goes to the
    first tied position (autograd's ``amax`` would split it among them; the row's total is the same).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, mask: Optional[torch.Tensor], eps: float) -> torch.Tensor:
        num_tokens = logits.shape[-1]
        top, where = logits.max(dim=-1, keepdim=True)
        # the published chain, in place on one buffer (the same arithmetic, so the same values)
        shifted = logits - top
        p = shifted.exp_() if shifted.dtype == torch.float32 else shifted.to(torch.float32).exp_()
        if mask is not None:
            p.mul_(mask.unsqueeze(1).to(torch.float32))
        denominator = p.sum(dim=-1, keepdim=True) + eps
        out = p.add_(eps / num_tokens).div_(denominator)
        ctx.save_for_backward(out, denominator, where)
        ctx.floor, ctx.dtype = eps / num_tokens, logits.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, denominator, where = ctx.saved_tensors
        grad_out = grad_out.to(torch.float32)
        centred = grad_out - (grad_out * out).sum(dim=-1, keepdim=True)            # g - <g, y>
        grad = centred * out
        grad.sub_(centred.mul_(ctx.floor / denominator))                            # q (g - <g, y>)
        grad.scatter_add_(-1, where, grad.sum(dim=-1, keepdim=True).neg_())         # through the row maximum
        return grad.to(ctx.dtype), None, None


def cls_attention(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Ranking score ``[B, N]``: the head average of the CLS query's attention to each patch key."""
    return attn[:, :, 0, num_prefix_tokens:].sum(1) / attn.shape[1]


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Head-averaged patch-to-patch attention ``[B, N, N]`` (rows: queries), the source of the connection mask."""
    return attn[:, :, num_prefix_tokens:, num_prefix_tokens:].sum(1) / attn.shape[1]


def num_kept(count: int, ratio: float) -> int:
    """``ceil(count * ratio)`` in float64, as published (the ratio applies to the current count at every site)."""
    return math.ceil(count * ratio)


def connection_mask(patch_attn: torch.Tensor, index: torch.Tensor, attn_ratio: float,
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    """0/1 mask ``[B, P + k, P + k]`` for the kept tokens ``index`` ``[B, k]`` (in kept order).

    Each kept query row keeps every kept key whose attention is at least its ``ceil(k * a)``-th largest (a threshold,
    so ties at it keep more); prefix rows and columns are always 1.
    """
    batch, k = index.shape
    p = num_prefix_tokens
    if num_kept(k, attn_ratio) >= k:         # the threshold is each row's minimum: every connection stays
        return torch.ones(batch, p + k, p + k, dtype=torch.float32, device=patch_attn.device)
    rows = patch_attn.gather(1, index.unsqueeze(-1).expand(-1, -1, patch_attn.shape[-1]))
    sub = rows.gather(2, index.unsqueeze(1).expand(-1, k, -1))
    threshold = sub.topk(num_kept(k, attn_ratio), dim=-1).values[..., -1:]
    mask = torch.ones(batch, p + k, p + k, dtype=torch.float32, device=patch_attn.device)
    mask[:, p:, p:] = (sub >= threshold).to(torch.float32)
    return mask


def prune_tokens(x: torch.Tensor, attn: torch.Tensor, keep_ratio: float, attn_ratio: float,
                 num_prefix_tokens: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pruning site: tokens ``x`` ``[B, P + N, C]`` (after the attention residual) and this block's attention
    probabilities ``attn`` ``[B, H, P + N, P + N]`` -> ``(out, index, mask)``.

    ``index`` ``[B, k]``: the ``k = ceil(N * r)`` patches with the highest CLS attention, highest first, 0-based among
    the patch tokens of ``x``; ``out`` ``[B, P + k, C]``: the prefix tokens, then those patches in ``index`` order
    (dropped tokens are discarded, not fused); ``mask``: :func:`connection_mask` for the following blocks.
    The selection carries no gradient; ``out`` does (through the kept rows of ``x``).
    """
    p = num_prefix_tokens
    score = cls_attention(attn, p)
    index = score.topk(num_kept(score.shape[1], keep_ratio), dim=1).indices
    kept = x[:, p:].gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    out = torch.cat([x[:, :p], kept], dim=1)
    k = index.shape[1]
    if num_kept(k, attn_ratio) >= k:         # all ones (see connection_mask), without the head average
        mask = torch.ones(x.shape[0], p + k, p + k, dtype=torch.float32, device=x.device)
    else:
        mask = connection_mask(patch_attention(attn, p), index, attn_ratio, p)
    return out, index, mask


@dataclass(frozen=True)
class TokenCounts:
    """Sizes through a whole model. ``tokens_in[b]``: patch tokens entering block ``b``; ``mask_size[b]``: side of the
    mask block ``b``'s attention receives (prefix included); ``mask_all_ones[b]``: whether that mask is certainly all
    ones (blocks up to the first pruning site, or ``ceil(k * a) == k``)."""

    tokens_in: List[int]
    tokens_out: int
    mask_size: List[int]
    mask_all_ones: List[bool]


def token_counts(num_patches: int, keep_ratio: float, attn_ratio: float, pruning_loc: Sequence[int] = (3, 6, 9),
                 depth: int = 12, num_prefix_tokens: int = 1) -> TokenCounts:
    """Token and mask sizes of every block for ``num_patches`` input patches at ratios ``(r, a)``."""
    tokens, all_ones = num_patches, True
    tokens_in, mask_size, ones = [], [], []
    for b in range(depth):
        tokens_in.append(tokens)
        mask_size.append(tokens + num_prefix_tokens)
        ones.append(all_ones)
        if b in pruning_loc:
            tokens = num_kept(tokens, keep_ratio)
            all_ones = num_kept(tokens, attn_ratio) >= tokens
    return TokenCounts(tokens_in, tokens, mask_size, ones)
