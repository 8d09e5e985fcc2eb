"""The AMP rule, in one place for training, evaluation and the measuring scripts: which autocast dtype a setting
means on a device, whether autocast is on, and whether the step needs a loss scaler."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AmpError(ValueError):
    """An AMP setting the device cannot run; ``str(err)`` is the one line shown to the user."""


def resolve_amp(amp: Optional[str], device: torch.device, key: str = "amp") -> Optional[torch.dtype]:
    """The autocast dtype of ``amp`` on ``device`` (``None``: autocast off). ``auto`` is bf16 on a GPU and off
    elsewhere; ``bf16`` runs on any device; ``fp16`` needs a GPU (its loss scaler is CUDA's); ``none`` is off.
    ``key`` is how the user spelled the setting (``amp`` in a config, ``--amp`` on a script's command line)."""
    if amp in (None, "", "none") or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16
    if amp not in AMP_DTYPES:
        raise AmpError(f"{key}: '{amp}' is not one of auto, bf16, fp16, none")
    if amp == "fp16" and device.type != "cuda":
        raise AmpError(f"{key}: 'fp16' needs a GPU; use bf16 or none on the CPU")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast to ``amp_dtype`` on ``device``, or a no-op context when AMP is off."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def loss_scaler(amp_dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 steps scale the loss (its gradients underflow otherwise); bf16 and float32 steps need no scaler."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
