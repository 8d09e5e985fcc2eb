"""The PSS models, registered with timm on top of timm's own BEiT code (``timm.models.beit.Beit``, nothing forked).

The published DeiT PSS model (``deit/pss.py``, ``PSSVisionTransformer``) is a BEiT-style ViT: q and v biases (no k
bias), a relative position bias table and index in every block (BEiT's index: patch pairs by row and column offset,
then the query-CLS row, the key-CLS column and the CLS-CLS corner in the last three table rows), *and* an absolute
position embedding, no layer scale, mean pooling over the patch tokens with ``fc_norm`` (no final norm), LayerNorm
eps 1e-6, and a head scaled by 0.001 at init. That is exactly timm's ``Beit`` with ``use_abs_pos_emb=True,
use_rel_pos_bias=True, init_values=None, global_pool='avg'``. The SimMIM ViT-B of the PSS fine-tuning runs
(``simmim/models/pss_vision_transformer.py`` + ``config.py`` + ``configs/vit-b``) is the same with width 768 / 12
heads, no absolute position embedding and layer scale 0.1: timm's ``beit_base_patch16_224`` architecture.

Registered names (importing :mod:`pss` registers them):

* ``pss_deit_small_patch16_224`` (published ``pss_deit_small_patch16_224_384``: the suffix is the width),
* ``pss_deit_small_patch16_384`` (published ``pss_deit_small_patch16_384_384``),
* ``pss_vit_base_patch16_224`` (SimMIM ViT-B, ``MODEL.TYPE: pss_vit``).

When patches are sampled, every block's attention adds the bias of the pairs it really sees,
``bias[b, h, i, j] = table[index[pos[b, i], pos[b, j]], h]`` with ``pos`` the original positions of the block's
tokens (:class:`~models.tokens.TokenPositions`). Only the bias lookup of timm's attention is overridden
(:class:`PositionalRelPosAttention`); with nothing recorded it is timm's own lookup.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import beit, build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from models.tokens import TokenPositions, token_positions

__all__ = ["PositionalRelPosAttention", "PSSBeit", "relative_position_bias", "follow_positions",
           "from_published_state_dict", "from_simmim_pretraining"]


def relative_position_bias(table: torch.Tensor, rel_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, T]`` bias of the token pairs ``positions`` (``[B, T]`` original positions, CLS = 0).

    ``table`` ``[R, H]`` is the learnable bias table, ``rel_index`` ``[L, L]`` the full-set lookup index. The
    result is the full-set bias restricted to the kept rows and columns in kept order. Two row gathers (pair ->
    table row -> bias), whose backward is an ``index_add`` into the table.
    """
    batch, num = positions.shape
    full = rel_index.shape[0]
    pairs = positions.unsqueeze(2) * full + positions.unsqueeze(1)                    # [B, T, T] flat (i, j)
    rows = rel_index.reshape(-1).index_select(0, pairs.reshape(-1))                    # [B * T * T]
    bias = table.index_select(0, rows).view(batch, num, num, table.shape[1])           # [B, T, T, H]
    return bias.permute(0, 3, 1, 2).contiguous()


class PositionalRelPosAttention(beit.Attention):
    """timm's BEiT attention whose relative position bias follows the tokens its block really sees.

    Not constructed directly: :func:`follow_positions` switches the class of existing timm attention modules, so
    parameters, buffers and ``state_dict`` stay timm's. ``token_positions`` (the model's record, a plain attribute)
    and ``block_index`` say where to look.
    """

    token_positions: Optional[TokenPositions] = None
    block_index: int = 0

    def _get_rel_pos_bias(self) -> torch.Tensor:
        positions = None if self.token_positions is None else self.token_positions.before(self.block_index)
        if positions is None:
            return super()._get_rel_pos_bias()
        return relative_position_bias(self.relative_position_bias_table, self.relative_position_index, positions)


def follow_positions(model: nn.Module) -> int:
    """Make every per-block relative position bias of ``model`` (timm BEiT attention) follow the recorded positions.

    Idempotent; returns the number of attention modules that now follow them (0 for a plain ViT, which needs none).
    """
    positions = token_positions(model)
    count = 0
    for i, block in enumerate(getattr(model, "blocks", ())):
        attn = getattr(block, "attn", None)
        if isinstance(attn, beit.Attention) and attn.relative_position_bias_table is not None:
            if not isinstance(attn, PositionalRelPosAttention):
                attn.__class__ = PositionalRelPosAttention
            attn.token_positions = positions
            attn.block_index = i
            count += 1
    return count


SIMMIM_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def from_published_state_dict(state_dict: Mapping[str, torch.Tensor],
                              model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Map a checkpoint of the published PSS code onto the keys of these models (``load_state_dict(strict=True)``).

    Both codes descend from BEiT's, so names and shapes already agree (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.i.attn.{qkv.weight, q_bias, v_bias, relative_position_bias_table, proj}``,
    ``blocks.i.mlp.fc1/fc2``, ``gamma_1/2``, ``fc_norm``, ``head``). The published code saves every
    ``relative_position_index`` (a constant of the window size) while timm rebuilds it, so it is dropped; with
    ``model`` given, each dropped index is first checked against the model's. Also accepts a whole checkpoint
    (``{"model": ...}``) and strips DDP's ``module.`` prefix.

    A SimMIM *pre-training* checkpoint (``encoder.``-prefixed keys, one shared bias table) is converted as the
    published fine-tuning loads it (:func:`from_simmim_pretraining`); that needs ``model``.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if is_simmim_pretraining(state_dict):
        if model is None:
            raise ValueError("a SimMIM pre-training checkpoint is converted for a model: pass `model`")
        return from_simmim_pretraining(state_dict, model)
    own = dict(model.named_buffers()) if model is not None else {}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            if key in own and not torch.equal(own[key].to(value.device), value):
                raise ValueError(f"{key} of the checkpoint differs from the model's: it was written for another "
                                 "window size (image size / patch size)")
            continue
        out[key] = value
    return out


def is_simmim_pretraining(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """The layout the published SimMIM pre-training saves: the ViT under ``encoder.`` (beside the ``decoder.``), or
    its shared relative position bias table (``USE_SHARED_RPB``)."""
    return any(k.startswith("encoder.") for k in state_dict) or SIMMIM_SHARED_TABLE in state_dict


def from_simmim_pretraining(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The weights the published SimMIM fine-tuning starts from, as ``load_pretrained`` there makes them.

    Only the ``encoder.`` part is kept (prefix removed); the shared bias table is copied into every block's table;
    every ``relative_position_index`` is dropped (rebuilt from the window size); what the classifier does not use
    (``mask_token``, the pre-training's final ``norm``) is dropped; and what the pre-training has no weights for
    (``fc_norm``, ``head``: the published load is ``strict=False``) keeps the model's initial values. A table of
    another window size is refused (the published code interpolates it; not needed at the published 224 px).
    """
    if any(k.startswith("encoder.") for k in state_dict):
        state_dict = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    state = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
    shared = state.pop(SIMMIM_SHARED_TABLE, None)
    own = model.state_dict()
    if shared is not None:
        for i in range(len(model.blocks)):
            state.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    for key, value in state.items():
        if key.endswith("relative_position_bias_table") and key in own and value.shape != own[key].shape:
            raise ValueError(f"{key}: the pre-training's table {tuple(value.shape)} is for another window size than "
                             f"the model's {tuple(own[key].shape)}; fine-tune at the pre-training's input size")
    out = {k: v for k, v in state.items() if k in own}
    for key, value in own.items():
        if key not in out and key.startswith(("fc_norm.", "head.")):
            out[key] = value
    return out


class PSSBeit(beit.Beit):
    """timm's ``Beit`` as the published PSS and SimMIM code build it: only ``pos_embed`` and ``cls_token`` are
    exempt from weight decay (with timm's rule that 1-D parameters and biases are exempt too), so the relative
    position bias tables decay. ``rel_pos_bias_decay=False`` exempts them as BEiT and timm do (a deviation).
    Published checkpoints load through :meth:`adapt_state_dict`."""

    def __init__(self, *args, rel_pos_bias_decay: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.rel_pos_bias_decay = rel_pos_bias_decay

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"} if self.rel_pos_bias_decay else super().no_weight_decay()

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Weights of the published PSS / SimMIM code (or ours) in this model's keys (see
        :func:`from_published_state_dict`); what the generic checkpoint loading calls before it checks the keys."""
        return from_published_state_dict(state_dict, self)


# ------------------------------------------------------------------------------------------- registration
def _cfg(input_size: int = 224, crop_pct: float = 0.875, **kwargs):
    return {"url": "", "num_classes": 1000, "input_size": (3, input_size, input_size), "pool_size": None,
            "crop_pct": crop_pct, "interpolation": "bicubic", "fixed_input_size": True,
            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "pss_deit_small_patch16_224": _cfg(224),
    "pss_deit_small_patch16_384": _cfg(384, crop_pct=1.0),
    "pss_vit_base_patch16_224": _cfg(224),
})


def _create(variant: str, pretrained: bool, **kwargs) -> PSSBeit:
    """timm's ``Beit`` whose per-block bias follows sampled patches, initialised and decayed as the published model."""
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are bundled; load a checkpoint with `finetune` "
                         "(published PSS and SimMIM checkpoints are converted on load)")
    model = build_model_with_cfg(PSSBeit, variant, pretrained=False,
                                 feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)
    # the published model initialises the patch projection like every Linear (timm's Beit keeps torch's default)
    trunc_normal_(model.patch_embed.proj.weight, std=0.02)
    if model.patch_embed.proj.bias is not None:
        nn.init.zeros_(model.patch_embed.proj.bias)
    follow_positions(model)
    return model


_DEIT_S = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
               use_abs_pos_emb=True, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, init_values=None,
               global_pool="avg", head_init_scale=0.001)


@register_model
def pss_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> PSSBeit:
    """DeiT-S PSS model (published ``pss_deit_small_patch16_224_384``): abs. pos. embed + per-block RPB, q/v bias,
    no layer scale, mean pooling + fc_norm."""
    return _create("pss_deit_small_patch16_224", pretrained, **{**_DEIT_S, "img_size": 224, **kwargs})


@register_model
def pss_deit_small_patch16_384(pretrained: bool = False, **kwargs) -> PSSBeit:
    """DeiT-S PSS model at 384 px (published ``pss_deit_small_patch16_384_384``)."""
    return _create("pss_deit_small_patch16_384", pretrained, **{**_DEIT_S, "img_size": 384, **kwargs})


@register_model
def pss_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> PSSBeit:
    """SimMIM ViT-B for PSS fine-tuning: per-block RPB, no abs. pos. embed, q/v bias, layer scale 0.1, mean pooling."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False, init_values=0.1,
                global_pool="avg", head_init_scale=0.001, img_size=224)
    return _create("pss_vit_base_patch16_224", pretrained, **dict(args, **kwargs))
