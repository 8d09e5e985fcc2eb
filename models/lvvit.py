"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers", NeurIPS 2021).

Registered with timm as ``lvvit_t``, ``lvvit_s``, ``lvvit_m`` and ``lvvit_l`` (timm ships no model of these names), so
``timm.create_model("lvvit_s", num_classes=..., drop_path_rate=..., img_size=...)`` and our ``create_model`` build
them like any other ViT. Importing this module is what registers them.

The architecture follows the published one so its checkpoints load by name: a 4-layer convolutional patch embedding
(``conv1..conv3`` + BN + ReLU at half resolution, then a ``patch_size/2`` projection), a CLS token with a learned
position embedding, pre-norm blocks whose residual branches are divided by ``skip_lam``, MLP ratio 3, no qkv bias,
a class head on the CLS token and a dense ``aux_head`` on every patch token.

Training forward (``model.train()``): MixToken swaps a random box of the token grid with the batch-flipped batch,
and the result is ``(cls_logits [B, K], aux_logits [B, N, K], MixBox)``; the aux outputs inside the box are flipped
back, so row ``b`` of ``aux_logits`` always describes image ``b``. Evaluation returns one tensor,
``cls + 0.5 * aux.max(1)``, so a plain classification ``evaluate()`` works.

Token-reducing methods (ToE, ...) patch blocks with forward pre-hooks; every block is called as a module (also under
gradient checkpointing), so the hooks fire. When the blocks ran on a reduced token set, the tokens are scattered back
to their original grid positions after the final norm, from the positions the methods recorded
(:mod:`models.tokens`; zeros where tokens were merged away, as ToE's LV-ViT code does), so the aux head, MixToken
un-mixing and the dense loss always see the full grid.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.utils.checkpoint
from timm.layers import Attention, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .tokens import find_positions, restore_grid

__all__ = ["LVViT", "MixBox", "ConvPatchEmbed", "LVViTBlock", "sample_mix_box"]


class MixBox(NamedTuple):
    """The MixToken box on the token grid: rows ``top:bottom`` and columns ``left:right`` of a ``grid_h x grid_w`` grid.

    Plain Python ints (sampled on the host), so using the box never synchronises with the GPU.
    """
    top: int
    bottom: int
    left: int
    right: int
    grid_h: int
    grid_w: int

    @property
    def area(self) -> int:
        return (self.bottom - self.top) * (self.right - self.left)

    @property
    def lam(self) -> float:
        """Fraction of tokens that still belong to the image itself: the weight of its own class target."""
        return 1.0 - self.area / float(self.grid_h * self.grid_w)


def sample_mix_box(grid_h: int, grid_w: int, beta: float = 1.0) -> MixBox:
    """CutMix's box on the token grid: side ``sqrt(1 - lam)`` of the grid, ``lam ~ Beta(beta, beta)``, random centre,
    clipped at the border (so the effective ``lam`` of the returned box can be larger than the sampled one).

    Drawn from torch's CPU generator (seeded by ``torch.manual_seed``), not NumPy's global state.
    """
    lam = torch.distributions.Beta(float(beta), float(beta)).sample().item()
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(grid_h * cut), int(grid_w * cut)
    cy, cx = int(torch.randint(grid_h, ())), int(torch.randint(grid_w, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, grid_h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, grid_w)
    return MixBox(top, bottom, left, right, grid_h, grid_w)


def swap_box(x: torch.Tensor, box: MixBox, spatial_dims: Tuple[int, int] = (2, 3)) -> torch.Tensor:
    """Replace the box of every sample with the same box of the batch-flipped batch (sample ``B-1-b``).

    ``spatial_dims`` are the grid's row and column dimensions: ``(2, 3)`` for ``[B, C, H, W]``, ``(1, 2)`` for
    ``[B, H, W, C]``. The swap is its own inverse, which is how the aux outputs are un-mixed.
    """
    if box.area == 0:
        return x
    index = [slice(None)] * x.ndim
    index[spatial_dims[0]] = slice(box.top, box.bottom)
    index[spatial_dims[1]] = slice(box.left, box.right)
    index = tuple(index)
    out = x.clone()
    out[index] = x.flip(0)[index]
    return out


class ConvPatchEmbed(nn.Module):
    """LV-ViT's "4_2" patch embedding: a stride-2 7x7 conv and two 3x3 convs (each + BN + ReLU) at half resolution,
    then a ``patch_size/2`` strided projection. A conv stem instead of one big linear patchify is what LV-ViT found
    to help; ``stem_chans`` is 64 for T/S/M and 128 for L ("4_2_128"). Outputs ``[B, embed_dim, H/ps, W/ps]``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_chans: int = 64):
        super().__init__()
        if patch_size % 2 or img_size % patch_size:
            raise ValueError(f"LV-ViT needs an even patch_size dividing img_size (got patch {patch_size}, image {img_size})")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chans)
        self.conv2 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_chans)
        self.conv3 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_chans)
        self.relu = nn.ReLU(inplace=True)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])} px but the model was built for {self.img_size} px "
                             f"(its position embedding has a fixed {self.grid_size[0]}x{self.grid_size[1]} grid)")
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)


class LVViTBlock(nn.Module):
    """Pre-norm transformer block with scaled residual branches: ``x + branch(x) / skip_lam``.

    Dividing the residual branches keeps the deeper LV-ViT variants stable (skip_lam 2 for S/M, 3 for L).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, skip_lam: float = 1.0):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        x = x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam
        return x


class LVViT(nn.Module):
    """LV-ViT with a dense auxiliary head and MixToken (see the module docstring for the outputs)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 qkv_bias: bool = False, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, skip_lam: float = 1.0, stem_chans: int = 64,
                 mix_token: bool = True, mix_beta: float = 1.0, aux_weight: float = 0.5, global_pool: str = "token"):
        super().__init__()
        if global_pool != "token":
            raise ValueError(f"LV-ViT classifies from the CLS token; global_pool '{global_pool}' is not supported")
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.mix_token = mix_token
        self.mix_beta = mix_beta
        self.aux_weight = aux_weight
        self.grad_checkpointing = False

        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim, stem_chans)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth grows linearly
        self.blocks = nn.Sequential(*[
            LVViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], skip_lam)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --------------------------------------------------------------------------------------- timm conventions
    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New class count for both heads (fine-tuning / transfer)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # --------------------------------------------------------------------------------------- forward
    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Call every block as a module, so forward pre-hooks (ToE) fire, also under gradient checkpointing."""
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _tokens(self, grid: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` patch grid -> normed ``[B, 1 + H*W, C]`` tokens on the full grid."""
        x = grid.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        num_tokens = x.shape[1]
        x = self.norm(self._run_blocks(x))
        positions = find_positions(self)
        return restore_grid(x, positions.before() if positions is not None else None, num_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens ``[B, 1 + N, C]`` on the full grid, without MixToken (e.g. for a teacher or probing)."""
        return self._tokens(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The evaluation output from tokens: ``cls + aux_weight * max over patches of aux``."""
        if pre_logits:
            return x[:, 0]
        return self.head(x[:, 0]) + self.aux_weight * self.aux_head(x[:, 1:]).max(1).values

    def forward(self, x: torch.Tensor):
        grid = self.patch_embed(x)
        box = None
        if self.training and self.mix_token:
            box = sample_mix_box(grid.shape[2], grid.shape[3], self.mix_beta)
            grid = swap_box(grid, box)
        tokens = self._tokens(grid)
        if not self.training:
            return self.forward_head(tokens)
        cls = self.head(tokens[:, 0])
        aux = self.aux_head(tokens[:, 1:])
        if box is None:
            box = MixBox(0, 0, 0, 0, grid.shape[2], grid.shape[3])
        elif box.area:
            # un-mix: the box of row b was computed from image B-1-b's tokens, so swap it back
            b, n, k = aux.shape
            aux = swap_box(aux.reshape(b, box.grid_h, box.grid_w, k), box, (1, 2)).reshape(b, n, k)
        return cls, aux, box


# ------------------------------------------------------------------------------------------- registration
def _cfg(crop_pct: float, **kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": crop_pct,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.conv1", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "lvvit_t": _cfg(0.9),
    "lvvit_s": _cfg(0.9),
    "lvvit_m": _cfg(1.0),
    "lvvit_l": _cfg(1.0),
})


def _create(variant: str, pretrained: bool, **kwargs) -> LVViT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are bundled; load a checkpoint with `finetune` instead")
    return build_model_with_cfg(LVViT, variant, pretrained=False, **kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: 12 blocks, dim 240, 4 heads, 8.5M parameters."""
    args = dict(patch_size=16, embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0, skip_lam=1.0, stem_chans=64)
    return _create("lvvit_t", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 16 blocks, dim 384, 6 heads, skip_lam 2, 26.2M parameters."""
    args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0, skip_lam=2.0, stem_chans=64)
    return _create("lvvit_s", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: 20 blocks, dim 512, 8 heads, skip_lam 2, 55.8M parameters."""
    args = dict(patch_size=16, embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0, skip_lam=2.0, stem_chans=64)
    return _create("lvvit_m", pretrained, **dict(args, **kwargs))


@register_model
def lvvit_l(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-L: 24 blocks, dim 768, 12 heads, skip_lam 3, 128-channel stem: 150.0M parameters at 224 px (150.5M at 448)."""
    args = dict(patch_size=16, embed_dim=768, depth=24, num_heads=12, mlp_ratio=3.0, skip_lam=3.0, stem_chans=128)
    return _create("lvvit_l", pretrained, **dict(args, **kwargs))
