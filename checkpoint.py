"""Checkpoints as plain data: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is ``{model, model_ema, optimizer, lr_scheduler, scaler, epoch, best, config, version}``; ``model`` and
``model_ema`` are the plain timm state dicts (ToE has no state), so ``timm.create_model(name).load_state_dict(
ckpt["model"])`` works without this repository. ``config`` is the resolved config as a dict, never a pickled object.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

VERSION = 1
HEAD_PREFIXES = ("head.", "head_dist.", "aux_head.")


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write to ``path.tmp`` then rename, so a crash mid-write never leaves a truncated ``path``."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a checkpoint dictionary")
    return ckpt


def model_state(ckpt: Dict[str, Any], key: str = "model") -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint: ours (``model``), DeiT's (``model``) or timm's (``state_dict``) or a bare dict."""
    for k in (key, "state_dict", "model"):
        if isinstance(ckpt.get(k), dict):
            return strip_prefixes(ckpt[k])
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise CheckpointError(f"no '{key}' weights in checkpoint (keys: {', '.join(list(ckpt)[:8])})")


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in state.items():
        for p in ("module.", "_orig_mod."):
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights_strict(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load all weights or fail with a message that says which model the checkpoint does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{source} is from another model: {'; '.join(parts)}")
    model.load_state_dict(state)


def adapt_for_finetune(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> Dict[str, Any]:
    """Prepare pretrained weights for fine-tuning, as DeiT does.

    Classifier heads whose shape differs (another class count) are dropped and stay freshly initialised;
    the absolute position embedding is resampled (bicubic) when the patch grid differs (another resolution).
    Anything else that does not fit is an error. Returns what was adapted, for the log.
    """
    from timm.layers import resample_abs_pos_embed

    own = model.state_dict()
    state = dict(state)
    report = {"dropped": [], "resampled": []}
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
        report["resampled"].append(f"pos_embed {tuple(pos.shape)} -> {tuple(state['pos_embed'].shape)}")
    for k in list(state):
        if k.startswith(HEAD_PREFIXES) and k in own and state[k].shape != own[k].shape:
            del state[k]
            report["dropped"].append(k)
    missing = [k for k in own if k not in state and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        bad = (missing or unexpected or shape)[0]
        raise CheckpointError(f"{source} does not fit model for fine-tuning: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(shape)} mis-shaped weights (e.g. {bad})")
    model.load_state_dict(state, strict=False)
    return report


def resume_path(resume: str, output_dir: str) -> Optional[str]:
    """``auto`` resumes ``output_dir/checkpoint.pth`` when it exists (a restarted job), else starts fresh."""
    if resume == "auto":
        p = os.path.join(output_dir, "checkpoint.pth")
        return p if os.path.isfile(p) else None
    return resume or None
