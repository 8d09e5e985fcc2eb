"""Small whole-step fixtures: seeded initial weights and packed tensors (torch, NumPy and the standard library only, so a
fixture generator running the published code in its own environment imports it by path as the tests do).

* :func:`seeded_state` makes a model's initial weights from a seed and the parameter names and shapes, so a fixture
  stores the seed instead of the weights (the published model is loaded with the same values before it trains).
* :func:`pack` / :func:`unpack` store a float tensor as integers on a grid of ``max|t| * 2**-bits`` (optionally as its
  difference from a reference both sides have), compressed with LZMA: every element within ``max|t| * 2**-(bits + 1)``
  of its value, i.e. far inside the 1e-5 relative bound the step tests use (``max |a - e| / max |e|``), for about half
  the bytes of float32. Saved with ``torch.save`` and read
  back under ``torch.load(weights_only=True)`` (plain tensors, ints and floats).
"""
from __future__ import annotations

import lzma
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch

BITS = 20          # grid step max|t| * 2**-20: an element is off by at most 4.8e-7 of the tensor's largest value


def seeded_state(shapes: Iterable[Tuple[str, Tuple[int, ...]]], seed: int) -> Dict[str, torch.Tensor]:
    """Initial weights from ``seed``, by name in the given order: ``1 + 0.1 * N(0, 1)`` for 1-D ``*.weight``
    (norm scales), ``0.02 * N(0, 1)`` for everything else (matrices, kernels, biases, embeddings), float32, drawn
    from one ``torch.Generator`` so that the same names and shapes give the same values in any environment."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, shape in shapes:
        noise = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
        out[name] = 1.0 + 0.1 * noise if (len(shape) == 1 and name.endswith("weight")) else 0.02 * noise
    return out


def pack(t: torch.Tensor, reference: Optional[torch.Tensor] = None, bits: int = BITS) -> Dict[str, object]:
    """``t`` as ``{shape, scale, bits, data}``: ``round((t - reference) / step)`` with ``step = max|t| * 2**-bits``
    (a reference the reader has too, e.g. the seeded initial weights, leaves only the small change to store),
    zigzag-coded, its bytes grouped by significance, LZMA-compressed into a uint8 tensor."""
    t = t.detach().to(torch.float64).cpu()
    scale = float(t.abs().max()) if t.numel() else 0.0
    if reference is not None:
        t = t - reference.detach().to(torch.float64).cpu()
    q = np.zeros(t.shape, np.int64) if scale == 0 else torch.round(t / (scale * 2.0 ** -bits)).to(torch.int64).numpy()
    z = ((q << 1) ^ (q >> 63)).astype("<u4")                # small magnitudes of either sign: small numbers
    raw = z.reshape(-1).view(np.uint8).reshape(-1, 4).T.tobytes()
    data = torch.frombuffer(bytearray(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)), dtype=torch.uint8)
    return {"shape": list(t.shape), "scale": scale, "bits": int(bits), "data": data}


def unpack(p: Mapping[str, object], reference: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 tensor :func:`pack` stored (``reference``: the one it was packed against)."""
    raw = np.frombuffer(lzma.decompress(bytes(p["data"].numpy().tobytes())), dtype=np.uint8)
    z = raw.reshape(4, -1).T.copy().view("<u4").reshape(-1).astype(np.int64)
    q = torch.from_numpy((z >> 1) ^ -(z & 1)).to(torch.float64)
    t = (q * (p["scale"] * 2.0 ** -p["bits"])).reshape(p["shape"])
    if reference is not None:
        t = t + reference.detach().to(torch.float64)
    return t.to(torch.float32)


def pack_all(tensors: Mapping[str, torch.Tensor], references: Optional[Mapping[str, torch.Tensor]] = None,
             bits: int = BITS) -> Dict[str, Dict[str, object]]:
    return {k: pack(v, None if references is None else references[k], bits) for k, v in tensors.items()}


def unpack_all(packed: Mapping[str, Mapping[str, object]],
               references: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    return {k: unpack(v, None if references is None else references[k]) for k, v in packed.items()}
