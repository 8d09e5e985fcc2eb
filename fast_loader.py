"""What the training loader's workers hand over (the ``loader:`` key), and the step that finishes it on the device.

``reference``: the workers run the whole recipe and hand over normalised float32 images (602 KB a 224 px sample).
``fast`` (the default): the workers stop at the uint8 pixels (150 KB, height x width x channels as decoded, so the
collate copies them without transposing) and hand over, per sample, the random-erasing boxes and a noise seed;
:func:`device_images` converts, normalises and erases on the device in the training loop, as timm's prefetch loader
does. Pinned memory, non-blocking copies, persistent workers and a prefetch factor come with it
(:func:`loader_options`).

Every random parameter is still drawn in the worker from the sample's own seed (``datasets.seeded``): the crop, flip
and RandAugment ops by the unchanged transforms, the erasing boxes by :func:`draw_erasing` with timm's draws in
timm's order. The erasing noise is not drawn from a global generator in either loader: both compute it from the
sample's noise seed with :func:`erasing_noise`, a counter-based generator (integer hashing and a table of normal
quantiles) that gives the same numbers on any device and in any batch layout. A ``fast`` batch therefore equals the
``reference`` batch of the same seeds (tests/test_loader.py; on a GPU, within the rounding of its float division).
"""
from __future__ import annotations

import functools
import math
import random
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision import transforms

LOADERS = ("reference", "fast")
ERASE_MODES = ("const", "rand", "pixel")   # timm's RandomErasing modes, in the order of the handed-over mode index
# batches each worker keeps ready (torch's default is 2): a slow sample (a large JPEG, a costly RandAugment op) then
# stalls only its own batch; with persistent workers the batches are ready as the next epoch starts
PREFETCH_FACTOR = 4
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_NOISE_BITS = 16


# ------------------------------------------------------------------------------------------------ erasing noise
def _hash32(x):
    """The PCG hash (Jarzynski and Olano 2020) of values in [0, 2^32), Python ints or int64 tensors: no product
    leaves 63 bits, so the integer results are the same on every device."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_hash32` of an int64 tensor, mostly in place (the noise of a box is one such tensor)."""
    x.mul_(747796405).add_(2891336453).bitwise_and_(_M32)
    word = x >> ((x >> 28).add_(4))
    word.bitwise_xor_(x).mul_(277803737).bitwise_and_(_M32)
    return word.bitwise_xor_(word >> 22)


def _box_keys(noise_seeds, box: int):
    """One key per erasing box: box ``box`` of a sample whose noise seed is ``noise_seeds`` (an int or a tensor)."""
    return _hash32((noise_seeds + box * _GOLDEN) & _M32)


@functools.lru_cache(maxsize=None)
def _normal_quantiles(device: str) -> torch.Tensor:
    """The standard normal distribution at 2^16 equally likely levels (the quantiles of the bin centres), computed
    in float64 on the CPU, so every device holds the same float32 table."""
    levels = 1 << _NOISE_BITS
    centres = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    return torch.special.ndtri(centres).to(torch.float32).to(device)


def erasing_noise(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 numbers (2^16 levels, |z| < 4.5), element ``counters`` of the streams ``keys``
    (broadcast together): a hash of the pair looks up the normal quantiles. Integer arithmetic and a table: any
    slice of a stream, on any device, gives the same numbers bit for bit."""
    hashed = _hash32_(torch.bitwise_xor((counters * _GOLDEN).bitwise_and_(_M32), keys))
    table = _normal_quantiles(str(hashed.device))
    return table[hashed.bitwise_right_shift_(32 - _NOISE_BITS)]


def draw_erasing(rer, height: int, width: int) -> Tuple[List[Tuple[int, int, int, int]], int]:
    """The boxes ``(top, left, h, w)`` timm's ``RandomErasing`` draws on a ``height`` x ``width`` image (its calls to
    Python's ``random``, in its order), then a 32-bit noise seed; no box and seed 0 when the image is not erased."""
    if random.random() > rer.probability:
        return [], 0
    area = height * width
    count = rer.min_count if rer.min_count == rer.max_count else random.randint(rer.min_count, rer.max_count)
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = random.uniform(rer.min_area, rer.max_area) * area / count
            aspect_ratio = math.exp(random.uniform(*rer.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                boxes.append((random.randint(0, height - h), random.randint(0, width - w), h, w))
                break
    return boxes, random.getrandbits(32)


def box_fill(mode: str, noise_seed: int, box: int, shape: Tuple[int, int, int], device=None) -> torch.Tensor:
    """What erasing writes into box ``box`` of ``shape`` (C, h, w): zeros, one normal number per channel, or one
    per pixel and channel, from the sample's noise seed."""
    channels, h, w = shape
    if mode == "const":
        return torch.zeros((channels, 1, 1), device=device)
    key = _box_keys(int(noise_seed), box)
    n = channels if mode == "rand" else channels * h * w
    noise = erasing_noise(key, torch.arange(n, device=device))
    return noise.view(channels, 1, 1) if mode == "rand" else noise.view(channels, h, w)


def erase_sample(img: torch.Tensor, mode: str, boxes, noise_seed: int) -> torch.Tensor:
    """Erase the boxes of one normalised CHW image in place, in order (a later box overwrites an earlier one)."""
    for j, (top, left, h, w) in enumerate(boxes):
        if h > 0:
            img[:, top:top + h, left:left + w] = box_fill(mode, noise_seed, j, (img.shape[0], h, w), img.device)
    return img


class SeededErasing:
    """The ``reference`` loader's random erasing: timm's boxes (:func:`draw_erasing`), the noise from the sample's
    noise seed (:func:`erasing_noise`) instead of torch's global generator."""

    def __init__(self, rer):
        self.rer = rer

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        boxes, noise_seed = draw_erasing(self.rer, img.shape[-2], img.shape[-1])
        return erase_sample(img, self.rer.mode or "const", boxes, noise_seed)

    def __repr__(self) -> str:
        return f"SeededErasing({self.rer!r})"


# ------------------------------------------------------------------------------------------------ the hand-over
class Uint8HandOver:
    """The ``fast`` loader's last transform (in place of ToTensor, Normalize and RandomErasing): the uint8 HWC pixels,
    the erasing boxes drawn here (padded to the recipe's box count with empty ones) and their noise seed, and what
    the device step needs to finish the sample (normalisation and erasing mode)."""

    def __init__(self, mean, std, rer=None):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.rer = rer
        self.max_boxes = rer.max_count if rer is not None else 0
        self.mode = ERASE_MODES.index(rer.mode or "const") if rer is not None else 0

    def __call__(self, img) -> Dict[str, torch.Tensor]:
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))      # H x W x C, as PIL holds it
        if pixels.ndim != 3:
            raise ValueError(f"loader: fast hands over RGB images; got a {img.mode} image of {img.size}")
        boxes, noise_seed = draw_erasing(self.rer, pixels.shape[0], pixels.shape[1]) if self.rer else ([], 0)
        padded = torch.zeros((self.max_boxes, 4), dtype=torch.int32)
        if boxes:
            padded[:len(boxes)] = torch.tensor(boxes, dtype=torch.int32)
        return {"uint8": pixels, "boxes": padded, "noise_seed": torch.tensor(noise_seed, dtype=torch.int64),
                "mean": self.mean, "std": self.std, "erase_mode": torch.tensor(self.mode, dtype=torch.int64)}

    def __repr__(self) -> str:
        return f"Uint8HandOver(mean={self.mean.tolist()}, std={self.std.tolist()}, erasing={self.rer!r})"


def _tensor_tail(t) -> Optional[int]:
    """Where ToTensor, Normalize and (optionally) timm's RandomErasing end the Compose ``t``; ``None``: they don't."""
    ops = list(getattr(t, "transforms", []))
    for k in range(len(ops) - 1):
        if isinstance(ops[k], transforms.ToTensor) and isinstance(ops[k + 1], transforms.Normalize):
            rest = ops[k + 2:]
            if not rest or (len(rest) == 1 and _is_erasing(rest[0])):
                return k
    return None


def _is_erasing(op) -> bool:
    from timm.data.random_erasing import RandomErasing
    return isinstance(op, RandomErasing)


def image_transforms(dataset) -> list:
    """The image transforms of a training set and the sets it wraps: a torchvision dataset's ``transform``, a set
    with its own image pipeline's ``image_transform`` (token labeling)."""
    found, seen = [], set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        for name in ("transform", "image_transform"):
            t = getattr(dataset, name, None)
            if isinstance(t, transforms.Compose) and all(t is not f for f in found):
                found.append(t)
        dataset = dataset.__dict__.get("dataset")
    return found


def hand_over(dataset, loader: str) -> bool:
    """Make ``dataset``'s training transforms hand over what ``loader`` moves (in place): ``fast`` swaps their
    ToTensor, Normalize and erasing for :class:`Uint8HandOver`, ``reference`` their erasing for
    :class:`SeededErasing`. False when a ``fast`` set has no such tail to hand over."""
    pipelines = [t for t in image_transforms(dataset) if _tensor_tail(t) is not None]
    for t in pipelines:
        k = _tensor_tail(t)
        rer = t.transforms[k + 2] if len(t.transforms) > k + 2 else None
        if loader == "fast":
            norm = t.transforms[k + 1]
            t.transforms[k:] = [Uint8HandOver(norm.mean, norm.std, rer)]
        elif rer is not None:
            t.transforms[k + 2] = SeededErasing(rer)
    return bool(pipelines) or loader != "fast"


def loader_options(loader: str, num_workers: int, pin_memory: bool) -> Dict[str, object]:
    """The training DataLoader's settings that come with ``loader``: ``fast`` keeps its workers across epochs and
    ``PREFETCH_FACTOR`` batches ahead each, and pins memory (for the non-blocking copy) on a GPU."""
    options: Dict[str, object] = {"pin_memory": pin_memory and torch.cuda.is_available()}
    if loader == "fast" and num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_FACTOR)
    return options


# ------------------------------------------------------------------------------------------------ on the device
def device_images(images, device: torch.device) -> torch.Tensor:
    """A batch's images on ``device`` as the model takes them: a ``reference`` batch is copied; a ``fast`` one is
    copied as uint8, converted and normalised as ToTensor and Normalize do, and erased."""
    if torch.is_tensor(images):
        return images.to(device, non_blocking=True)
    pixels = images["uint8"].to(device, non_blocking=True).permute(0, 3, 1, 2)              # N x C x H x W
    x = pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
    mean = images["mean"][0].to(device, non_blocking=True).view(1, -1, 1, 1)
    std = images["std"][0].to(device, non_blocking=True).view(1, -1, 1, 1)
    x = x.sub_(mean).div_(std)
    boxes = images["boxes"]
    if boxes.shape[1] and bool((boxes[:, :, 2] > 0).any()):
        mode = ERASE_MODES[int(images["erase_mode"][0])]
        erase = erase_per_sample if x.device.type == "cpu" else erase_batch
        erase(x, mode, boxes, images["noise_seed"])
    return x


def erase_per_sample(x: torch.Tensor, mode: str, boxes: torch.Tensor, noise_seeds: torch.Tensor) -> None:
    """Erase a batch one box at a time: the reference loader's own code (cheapest where kernels cost nothing)."""
    for i in torch.nonzero(boxes[:, :, 2].amax(dim=1) > 0).flatten().tolist():
        erase_sample(x[i], mode, boxes[i].tolist(), int(noise_seeds[i]))


def erase_batch(x: torch.Tensor, mode: str, boxes: torch.Tensor, noise_seeds: torch.Tensor) -> None:
    """Erase a batch with a few whole-batch kernels per box slot (a GPU): the same numbers as
    :func:`erase_per_sample`, computed for every pixel of the erased images and kept inside their boxes."""
    _, channels, height, width = x.shape
    for j in range(boxes.shape[1]):
        rows = torch.nonzero(boxes[:, j, 2] > 0).flatten()          # on the host: no device sync
        if not len(rows):
            continue
        top, left, h, w = (v.to(x.device, non_blocking=True).view(-1, 1, 1, 1).long()
                           for v in boxes[rows, j].unbind(dim=1))
        keys = _box_keys(noise_seeds[rows].to(x.device, non_blocking=True), j).view(-1, 1, 1, 1)
        ys = torch.arange(height, device=x.device).view(1, 1, -1, 1) - top
        xs = torch.arange(width, device=x.device).view(1, 1, 1, -1) - left
        inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        c = torch.arange(channels, device=x.device).view(1, -1, 1, 1)
        if mode == "const":
            fill = torch.zeros((), device=x.device)
        elif mode == "rand":
            fill = erasing_noise(keys, c)
        else:
            fill = erasing_noise(keys, (c * h + ys) * w + xs)
        index = rows.to(x.device)
        x[index] = torch.where(inside, fill, x[index])


__all__ = ["LOADERS", "PREFETCH_FACTOR", "SeededErasing", "Uint8HandOver", "device_images", "draw_erasing", "image_transforms",
           "erasing_noise", "hand_over", "loader_options"]
