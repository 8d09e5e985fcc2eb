"""The device rule and the AMP rule, each in one place for training, evaluation and the scripts: which device a
setting means, which autocast dtype a setting means on that device, whether autocast is on, and whether the step
needs a loss scaler."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


class DeviceError(ValueError):
    """The asked-for device does not exist; ``str(err)`` is the one line shown to the user."""


def resolve_device(name: Optional[str] = "auto", local_rank: int = 0, key: str = "device") -> torch.device:
    """The device of ``name``: ``auto`` is this process's GPU when there is one, else the CPU; ``cuda`` is this
    process's GPU (``local_rank``), ``cuda:N`` a given one; a GPU that is not visible is an error, never a silent
    CPU run. ``key`` is how the user spelled the setting (``device`` in a config, ``--device`` for a script)."""
    if name in ("auto", "", None):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = str(name).partition(":")
    if name == "cpu":
        return torch.device("cpu")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise DeviceError(f"{key}: '{name}' is not one of auto, cpu, cuda, cuda:N")
    fix = f"use {key}: auto or cpu" if key == "device" else f"use {key} auto or cpu"
    if not torch.cuda.is_available():
        raise DeviceError(f"{key}: '{name}' was asked for but no GPU is visible (CUDA_VISIBLE_DEVICES, driver); {fix}")
    gpu, count = (int(index) if colon else local_rank), torch.cuda.device_count()
    if gpu >= count:
        why = "asked for" if colon else f"this process's GPU (local rank {local_rank})"
        raise DeviceError(f"{key}: '{name}' is GPU {gpu}, {why}, but {count} GPU(s) are visible; use at most "
                          f"cuda:{count - 1}, or start at most {count} processes per machine")
    return torch.device("cuda", gpu)


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
