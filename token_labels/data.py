"""Token-labeling training data: :class:`TokenLabelDataset` (an ImageFolder returning ``(image, class_index,
label)``, the crop box and flip drawn once and carried next to the raw label map) and its augmentations, including
RandAugment's geometric ops applied to the label map alike (:class:`LabelRandAugment`)."""
from __future__ import annotations

import math
import random
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .store import LabelStore, TokenLabelError, check_label, image_key

# published: RandAugment's geometric ops on the image and (with the published label geometry) the label map, before
# the crop; aligned: the same with the label map moved exactly as the image; photometric: no geometric op
RAND_AUGMENTS = ("published", "aligned", "photometric")
GEOMETRIC_RAND_OPS = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


def _rand_augment(aa: str, input_size: int, interpolation: str, mean):
    """timm's RandAugment for ``aa`` with the hyper-parameters timm's (and the published) training pipeline uses."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    if not aa.startswith("rand"):
        raise ValueError(f"aa '{aa}': token labeling supports RandAugment ('rand-...') policies only")
    hparams = dict(translate_const=int(input_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean))
    if interpolation and interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return rand_augment_transform(aa, hparams)


def _tensor_transform(reprob: float, remode: str, recount: int, mean, std) -> List[Callable]:
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms
    tfl = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if reprob > 0:
        tfl.append(RandomErasing(reprob, mode=remode, max_count=recount, device="cpu"))
    return tfl


def build_image_transform(input_size: int, color_jitter: Optional[float] = 0.4, aa: Optional[str] = None,
                          interpolation: str = "bicubic", reprob: float = 0.0, remode: str = "pixel",
                          recount: int = 1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The image-only part of the training pipeline, applied after the joint crop and flip.

    Like timm's: RandAugment (or colour jitter when there is none), ToTensor, Normalize, RandomErasing. RandAugment
    keeps only its photometric ops: a rotation/shear/translation would move the image under a label map that stays
    put. The published code transforms the label map too: :func:`build_token_label_transforms` with
    ``rand_augment="published"``.
    """
    from torchvision import transforms
    tfl = []
    if aa:
        ra = _rand_augment(aa, input_size, interpolation, mean)
        ra.ops = [op for op in ra.ops if op.name not in GEOMETRIC_RAND_OPS]
        ra.choice_weights = None
        tfl.append(ra)
    elif color_jitter:
        tfl.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    return transforms.Compose(tfl + _tensor_transform(reprob, remode, recount, mean, std))


def affine_label(scores: np.ndarray, indices: np.ndarray, matrix: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Resample a top-k label map ``[k, H, W]`` under an affine map of the label grid, as the published code does.

    ``matrix = (a, b, c, d, e, f)`` maps every output cell ``(row, col)`` to the input point ``(a*row + b*col + c,
    d*row + e*col + f)`` in index coordinates (cell centres at integers), sampled at the nearest cell (order-0
    interpolation: ``floor(x + 0.5)``). Outside the grid (a coordinate below 0 or above ``n - 1``) the scores are 0
    and the class indices those of the nearest edge cell: ``scipy.ndimage.affine_transform(order=0)`` with
    ``mode="constant"`` for the scores and ``"nearest"`` for the indices, which is what the published code calls.
    """
    _, h, w = scores.shape
    a, b, c, d, e, f = (float(v) for v in matrix)
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_r, src_c = a * rows + b * cols + c, d * rows + e * cols + f
    near_r = np.clip(np.floor(src_r + 0.5), 0, h - 1).astype(np.int64)
    near_c = np.clip(np.floor(src_c + 0.5), 0, w - 1).astype(np.int64)
    inside = (src_r >= 0) & (src_r <= h - 1) & (src_c >= 0) & (src_c <= w - 1)
    out_scores = np.where(inside[None], scores[:, near_r, near_c], np.zeros((), dtype=scores.dtype))
    return out_scores.astype(scores.dtype, copy=False), indices[:, near_r, near_c]


def _image_affine(name: str, args: Sequence[float], image_wh: Tuple[int, int]) -> Optional[Tuple[float, ...]]:
    """PIL's affine data ``(a, b, c, d, e, f)`` of timm's geometric op ``name``: the output point ``(x, y)`` samples the
    input at ``(a*x + b*y + c, d*x + e*y + f)``, in pixel-edge coordinates (``Image.rotate`` turns by ``args[0]``
    degrees counter-clockwise about ``(W/2, H/2)``)."""
    w, h = image_wh
    if name == "ShearX":
        return (1.0, args[0], 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, args[0], 1.0, 0.0)
    if name in ("TranslateXRel", "TranslateX"):
        return (1.0, 0.0, args[0] * w if name.endswith("Rel") else args[0], 0.0, 1.0, 0.0)
    if name in ("TranslateYRel", "TranslateY"):
        return (1.0, 0.0, 0.0, 0.0, 1.0, args[0] * h if name.endswith("Rel") else args[0])
    if name == "Rotate":
        angle = -math.radians(args[0])
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cx, cy = w / 2.0, h / 2.0
        return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    return None


def label_op_matrix(name: str, args: Sequence[float], label_hw: Tuple[int, int], image_wh: Tuple[int, int],
                    aligned: bool = False) -> Optional[Tuple[float, ...]]:
    """The label-grid affine map (:func:`affine_label`) of RandAugment op ``name`` drawn with ``args`` (``None``:
    a photometric op, the label map stays).

    ``aligned=False``, the published label ops: the image's PIL maps on ``(x, y)`` transposed to the grid's
    ``(row, col) = (y, x)`` in cell-index coordinates: ShearX ``x + f*y`` becomes ``col + f*row``, ShearY
    ``row + f*col``, the relative translations move by the same fraction of the grid, Rotate turns by the same angle
    about the grid point ``(H/2, W/2)``. Index coordinates put that centre, and the shears' origin, half a cell off
    the image's, so near cell boundaries a label cell can take its neighbour's class (for a 20-30 degree rotation of
    a 14 x 14 grid, a third of the cells). The absolute translations (not in the ``rand`` policies; the published
    code leaves the label map alone for them) move by the image pixels scaled to the grid.

    ``aligned=True``: the image's own map expressed on the label grid (cell ``i`` covers pixels ``[i*s, (i+1)*s)``),
    so every label cell samples where its image region came from.
    """
    h, w = label_hw
    if aligned:
        image = _image_affine(name, args, image_wh)
        if image is None:
            return None
        a, b, c, d, e, f = image
        sx, sy = image_wh[0] / w, image_wh[1] / h                 # image pixels per label cell
        # u = x / sx - 0.5, v = y / sy - 0.5 (cell-index coordinates); rows are v, columns u
        return (e, d * sx / sy, 0.5 * e + 0.5 * d * sx / sy + f / sy - 0.5,
                b * sy / sx, a, 0.5 * a + 0.5 * b * sy / sx + c / sx - 0.5)
    if name == "ShearX":
        return (1.0, 0.0, 0.0, args[0], 1.0, 0.0)
    if name == "ShearY":
        return (1.0, args[0], 0.0, 0.0, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, args[0] * w)
    if name == "TranslateYRel":
        return (1.0, 0.0, args[0] * h, 0.0, 1.0, 0.0)
    if name == "TranslateX":
        return (1.0, 0.0, 0.0, 0.0, 1.0, args[0] * w / image_wh[0])
    if name == "TranslateY":
        return (1.0, 0.0, args[0] * h / image_wh[1], 0.0, 1.0, 0.0)
    if name == "Rotate":
        angle = math.radians(args[0])
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        cr, cc = h / 2.0, w / 2.0
        return (cos, sin, cr - cos * cr - sin * cc, -sin, cos, cc + sin * cr - cos * cc)
    return None


class _RecordArgs:
    """Wraps an AugmentOp's ``level_fn`` to remember the arguments of its last draw (picklable for workers)."""

    def __init__(self, level_fn: Callable):
        self.level_fn = level_fn
        self.last: Optional[tuple] = None

    def __call__(self, magnitude, hparams):
        self.last = tuple(self.level_fn(magnitude, hparams))
        return self.last


class LabelRandAugment:
    """timm's RandAugment on the image, with its geometric ops applied to the label map alike (the published
    TokenLabeling RandAugment): ``(img, scores, indices) -> (img, scores, indices)``, on the whole image before the
    crop.

    The image goes through timm's own ``RandAugment`` code path: the ops are chosen with ``np.random.choice`` and each
    op draws its probability, magnitude and sign with Python's ``random`` as timm does, so the image is exactly what
    ``ra(img)`` would give for the same generator states. The arguments each geometric op drew are recorded (its
    ``level_fn`` is wrapped) and the same transform is applied to the label map by :func:`label_op_matrix` /
    :func:`affine_label` (``aligned``: the published label geometry, or the image's exactly; see
    :func:`label_op_matrix`). ``transforms`` lists the wrapped RandAugment, so helpers that walk a Compose's
    transforms (``datasets.fix_posterize``) reach its ops.
    """

    def __init__(self, ra, aligned: bool = False):
        self.ra = ra
        self.aligned = bool(aligned)
        for op in ra.ops:
            if op.name in GEOMETRIC_RAND_OPS and op.level_fn is not None and not isinstance(op.level_fn, _RecordArgs):
                op.level_fn = _RecordArgs(op.level_fn)

    @property
    def transforms(self) -> list:
        return [self.ra]

    def __call__(self, img, scores: np.ndarray, indices: np.ndarray):
        ra = self.ra
        ops = np.random.choice(ra.ops, ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        for op in ops:
            recorder = op.level_fn if isinstance(op.level_fn, _RecordArgs) else None
            if recorder is not None:
                recorder.last = None
            size = img.size
            img = op(img)
            if recorder is not None and recorder.last is not None:          # the op was applied
                matrix = label_op_matrix(op.name, recorder.last, scores.shape[1:], size, self.aligned)
                if matrix is not None:
                    scores, indices = affine_label(scores, indices, matrix)
        return img, scores, indices

    def __repr__(self) -> str:
        return f"LabelRandAugment({self.ra!r}, aligned={self.aligned})"


class TokenLabelTransforms(NamedTuple):
    """``joint``: applied to the whole image and its label map before the crop (``None``: nothing); ``image``: to the
    cropped image."""
    joint: Optional[Callable]
    image: Callable


def build_token_label_transforms(input_size: int, color_jitter: Optional[float] = 0.4, aa: Optional[str] = None,
                                 interpolation: str = "bicubic", reprob: float = 0.0, remode: str = "pixel",
                                 recount: int = 1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                 rand_augment: str = "photometric") -> TokenLabelTransforms:
    """The training transforms of :class:`TokenLabelDataset` (``joint_transform``, ``image_transform``).

    ``rand_augment="photometric"`` (default): no joint transform, :func:`build_image_transform` (RandAugment's
    photometric ops after the crop). ``"published"`` (LV-ViT's published pipeline): RandAugment with all its ops as
    a :class:`LabelRandAugment` on the whole image and label map after the flip and before the crop, then ToTensor,
    Normalize and RandomErasing on the crop. ``"aligned"``: the same, with the label map moved exactly as the image
    (:func:`label_op_matrix`). Without ``aa`` all are the colour-jitter pipeline.
    """
    if rand_augment not in RAND_AUGMENTS:
        raise ValueError(f"token_label.rand_augment '{rand_augment}' is not one of {', '.join(RAND_AUGMENTS)}")
    if rand_augment == "photometric" or not aa:
        return TokenLabelTransforms(None, build_image_transform(input_size, color_jitter, aa, interpolation, reprob,
                                                                remode, recount, mean, std))
    from torchvision import transforms
    joint = LabelRandAugment(_rand_augment(aa, input_size, interpolation, mean), aligned=rand_augment == "aligned")
    return TokenLabelTransforms(joint, transforms.Compose(_tensor_transform(reprob, remode, recount, mean, std)))


class TokenLabelDataset(Dataset):
    """``(image, class_index, label)`` samples of an ImageFolder with crop-aware token labels.

    The random-resized crop ``(top, left, h, w)`` and the flip are drawn here with torch's RNG and applied to the
    image; ``label`` carries what the targets need, next to each other rather than hidden inside a tensor:
    ``scores [k, H, W]`` float16, ``indices [k, H, W]``, ``box [4]`` = crop ``(x1, y1, x2, y2)`` / image size,
    ``crop [6]`` = the same crop in integers, ``(top, left, height, width, image height, image width)`` (what the
    published arithmetic starts from), and ``flip`` (bool). :func:`token_label_targets` turns a collated batch into
    targets on the device.

    ``joint_transform`` (``(img, scores, indices) -> (img, scores, indices)``, e.g. :class:`LabelRandAugment`):
    the published order instead: the flip is applied to the whole image and its label map first, then the joint
    transform, then the crop is drawn on the transformed image; ``label`` then holds the transformed map and
    ``flip`` is false (the map is already flipped). Without it (default) the crop comes first and the flip is
    applied to the targets on the device.
    """

    def __init__(self, images, store: Union[LabelStore, str], input_size: int = 224, *,
                 num_classes: Optional[int] = None, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), hflip: float = 0.5,
                 interpolation: str = "bicubic", image_transform: Optional[Callable] = None,
                 joint_transform: Optional[Callable] = None):
        self.store = store if isinstance(store, LabelStore) else LabelStore(store)
        self.samples = list(images.samples)
        self.root = images.root
        self.loader = images.loader
        self.classes = list(images.classes)
        self.num_classes = num_classes if num_classes is not None else len(self.classes)
        if self.store.num_classes != self.num_classes:
            raise TokenLabelError(f"token labels in {self.store.root} index {self.store.num_classes} classes but the "
                                  f"dataset has {self.num_classes}: generate labels with a teacher for these classes")
        self.keys = [image_key(p, self.root) for p, _ in self.samples]
        self.rows = self.store.rows_for(self.keys)      # fails now, naming an image, rather than mid-epoch
        self.input_size = input_size
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation = interpolation
        self.image_transform = image_transform if image_transform is not None else build_image_transform(input_size)
        self.joint_transform = joint_transform

    def __len__(self) -> int:
        return len(self.samples)

    def _interpolation(self):
        from torchvision.transforms import InterpolationMode
        modes = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                 "nearest": InterpolationMode.NEAREST}
        if self.interpolation == "random":
            return random.choice([modes["bilinear"], modes["bicubic"]])
        return modes[self.interpolation]

    def __getitem__(self, i: int):
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF
        path, target = self.samples[i]
        img = self.loader(path)
        scores, indices = self.store.read(int(self.rows[i]))
        check_label(scores, indices, self.store.shape, self.num_classes, self.keys[i])
        if self.joint_transform is not None:       # the published order: flip, joint transform, then the crop
            if bool(torch.rand(()) < self.hflip):
                img, scores, indices = TF.hflip(img), scores[..., ::-1], indices[..., ::-1]
            img, scores, indices = self.joint_transform(img, scores, indices)
            scores, indices = np.ascontiguousarray(scores), np.ascontiguousarray(indices)
            flip = False
        width, height = img.size
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        img = TF.resized_crop(img, top, left, h, w, [self.input_size, self.input_size], self._interpolation(),
                              antialias=True)
        if self.joint_transform is None:
            flip = bool(torch.rand(()) < self.hflip)
            if flip:
                img = TF.hflip(img)
        img = self.image_transform(img)
        box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height], dtype=torch.float32)
        label = {"scores": torch.from_numpy(scores), "indices": torch.from_numpy(indices), "box": box,
                 "crop": torch.tensor([top, left, h, w, height, width], dtype=torch.int64), "flip": torch.tensor(flip)}
        return img, target, label
