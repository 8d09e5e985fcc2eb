"""EfficientTrain's low-frequency cropping: a smaller image made of the lowest spatial frequencies of a larger one.

The image's 2-D DFT is cut down to the ``size x size`` block of frequencies nearest to zero (the four corners of
the unshifted spectrum), rescaled by ``(size / N)^2`` so that intensities are preserved, and transformed back; the
real part is the smaller image. Unlike a resize, nothing above the new Nyquist frequency survives and nothing below
it is attenuated. ``size`` must be even (the kept block is symmetric: ``size / 2`` frequencies on each side).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

_INDEX: Dict[Tuple[int, int, str], torch.Tensor] = {}


def _band(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Indices of the ``size`` frequencies nearest to zero among ``n`` (``0..size/2-1`` and ``n-size/2..n-1``)."""
    key = (n, size, str(device))
    if key not in _INDEX:
        half = size // 2
        _INDEX[key] = torch.cat([torch.arange(0, half), torch.arange(n - half, n)]).to(device)
    return _INDEX[key]


def low_frequency_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` (``[..., N, N]``, real) reduced to ``[..., size, size]`` by keeping their lowest frequencies."""
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"low_frequency_crop: square images expected, got {tuple(images.shape[-2:])}")
    if size % 2 or not 0 < size <= n:
        raise ValueError(f"low_frequency_crop: size {size} must be even and in 2..{n}")
    if size == n:
        return images
    spectrum = torch.fft.fft2(images.to(torch.promote_types(images.dtype, torch.float32)))
    band = _band(n, size, images.device)
    cropped = spectrum.index_select(-2, band).index_select(-1, band) * (size / n) ** 2
    return torch.fft.ifft2(cropped).real.to(images.dtype)
