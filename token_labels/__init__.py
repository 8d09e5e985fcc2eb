"""Token labeling (LV-ViT): dense label maps on disk, crop-aware targets, and the token-labeling loss.

Storage. A teacher's dense top-k prediction map for every training image lives in one packed, memory-mapped store
(a directory), not in a million small files:

    index.json    format/version, num_images, k, height, width, num_classes, dtypes, paths (row order), meta
    scores.npy    float16 [num_images, k, H, W]   top-k teacher logits at each location
    indices.npy   int16/int32 [num_images, k, H, W]   their class indices
    done.npy      bool [num_images]   rows written completely; what makes generation resumable

:class:`LabelStoreWriter` creates or resumes a store; :class:`LabelStore` reads it (``np.load(mmap_mode='r')``,
opened lazily in each DataLoader worker). :func:`convert_pt_labels` packs the published per-image
``<label_root>/<class_dir>/<stem>.pt`` files (``[2, k, H, W]``: scores, indices).

Training data. :class:`TokenLabelDataset` wraps an ImageFolder and returns ``(image, class_index, label)``. The
random-resized crop and the horizontal flip are drawn once and applied to the image; the crop box (normalised to the
image) and the flip flag travel in ``label`` next to the raw top-k map, and :func:`token_label_targets` turns a
batch of them into targets on the device, as the published code does: scatter the top-k scores into a dense
``[B, K, H, W]`` map, RoIAlign the crop box to the token grid (and to 1x1 for the class token), flip, softmax.
Photometric augmentations only touch the image.

Published fidelity, each behind an argument whose default is this repository's behaviour (the config keys that choose
them are wired in ``config.py`` / ``datasets.py`` / ``main.py``; the published behaviour is what the table configs use):

* ``box_order`` (:func:`token_label_targets`): the published code stores the crop as ``(top, left, h, w)`` and hands
  ``(top, left, bottom, right)`` to RoIAlign, which reads ``(x1, y1, x2, y2)``: it crops the label map with x and y
  swapped. ``"published"`` reproduces that with the published arithmetic (the map flipped before the crop, the far
  corner ``top/H + h/H`` in float32 in the flipped image's frame), ``"fixed"`` (default) uses the crop's own box. On
  4:3 ImageNet-sized images the swapped box overlaps the intended one with a mean IoU of about 0.48 (below 0.5 on
  about half of the crops).
* ``joint_transform`` (:class:`TokenLabelDataset`, e.g. :class:`LabelRandAugment` from
  :func:`build_token_label_transforms` with ``rand_augment="published"``): the published pipeline order, flip ->
  RandAugment -> random-resized crop, with RandAugment's rotation, shears and translations applied to the image and
  to the label map alike (nearest sampling on the label grid, with the published code's cell-index geometry, or
  ``"aligned"`` with the image's exactly). The default keeps only RandAugment's photometric ops.

* ``smoothing_form`` (:func:`smooth`): the published code smooths the soft targets with its one-hot on/off values,
  so they sum to ``1 + smoothing / K``; ``"published"`` reproduces that, ``"normalized"`` (default) keeps the sum at 1.

Loss. :class:`TokenLabelLoss` is ``cls_weight * CE(cls, cls_target) + dense_weight * CE(aux, dense_targets)`` with
MixToken's area mixing of the class target. Every data problem stops with a :class:`TokenLabelError` naming the image.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

FORMAT = "toe-token-labels"
VERSION = 1
INDEX_FILE, SCORES_FILE, INDICES_FILE, DONE_FILE = "index.json", "scores.npy", "indices.npy", "done.npy"
CLS_SOURCES = ("label_map", "ground_truth", "corrected")
BOX_ORDERS = ("published", "fixed")                # published: x and y of the crop box swapped, as the published code
# published: RandAugment's geometric ops on the image and (with the published label geometry) the label map, before
# the crop; aligned: the same with the label map moved exactly as the image; photometric: no geometric op
RAND_AUGMENTS = ("published", "aligned", "photometric")
# normalized: smoothed targets sum to 1; published: the published code's on/off values on soft targets (sum 1 + s/K)
SMOOTHING_FORMS = ("normalized", "published")
GEOMETRIC_RAND_OPS = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


class TokenLabelError(ValueError):
    """A token-label data mistake; ``str(err)`` is one line naming the image or the store and the fix."""


def image_key(path: str, root: str) -> str:
    """The store key of an image: its path relative to the ImageFolder root, with ``/`` separators."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def check_label(scores: np.ndarray, indices: np.ndarray, shape: Tuple[int, int, int], num_classes: int,
                name: str) -> None:
    """Stop with a message naming ``name`` when a label map has the wrong shape or a class index out of range."""
    for what, arr in (("scores", scores), ("indices", indices)):
        if tuple(arr.shape) != tuple(shape):
            raise TokenLabelError(f"token label of image '{name}': {what} have shape {list(arr.shape)}, expected "
                                  f"[k, H, W] = {list(shape)}")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= num_classes:
            bad = hi if hi >= num_classes else lo
            raise TokenLabelError(f"token label of image '{name}': class index {bad} is outside 0..{num_classes - 1} "
                                  f"(the labels were made for a different class list or are corrupt)")


# ============================================================================================ packed label store
def _read_index(root: str) -> Dict[str, Any]:
    path = os.path.join(root, INDEX_FILE)
    if not os.path.isfile(path):
        raise TokenLabelError(f"no token-label store at {root} ({INDEX_FILE} missing); create one with "
                              "scripts/generate_token_labels.py (or its --convert-pt mode)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise TokenLabelError(f"{path} is not a {FORMAT} v{VERSION} index")
    return index


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class LabelStoreWriter:
    """Create a store for ``paths`` (row order), or resume the one already at ``root``.

    Rows are written in any order; a row counts as done only after its data were flushed, so an interrupted run
    resumes with :meth:`pending` rows and never trusts a half-written one. Resuming a store made for other images or
    another shape stops with an error instead of mixing two label sets.
    """

    def __init__(self, root: str, paths: Sequence[str], k: int, height: int, width: int, num_classes: int,
                 meta: Optional[Dict[str, Any]] = None):
        self.root = root
        self.paths = list(paths)
        self.k, self.height, self.width, self.num_classes = int(k), int(height), int(width), int(num_classes)
        shape = (len(self.paths), self.k, self.height, self.width)
        if os.path.isfile(os.path.join(root, INDEX_FILE)):
            index = _read_index(root)
            mine = dict(k=self.k, height=self.height, width=self.width, num_classes=self.num_classes)
            theirs = {key: index[key] for key in mine}
            if mine != theirs:
                raise TokenLabelError(f"token-label store {root} holds {theirs}, not {mine}: delete it or write to "
                                      "another directory")
            if index["paths"] != self.paths:
                raise TokenLabelError(f"token-label store {root} was made for a different image list "
                                      f"({index['num_images']} images, now {len(self.paths)}): delete it or write "
                                      "to another directory")
            mode = "r+"
        else:
            os.makedirs(root, exist_ok=True)
            mode = "w+"
        open_mm = np.lib.format.open_memmap
        join = os.path.join
        kw = {} if mode == "r+" else {"shape": shape}
        self.scores = open_mm(join(root, SCORES_FILE), mode=mode, dtype=np.float16, **kw)
        self.indices = open_mm(join(root, INDICES_FILE), mode=mode, dtype=index_dtype(self.num_classes), **kw)
        self.done = open_mm(join(root, DONE_FILE), mode=mode, dtype=np.bool_,
                            **({} if mode == "r+" else {"shape": (len(self.paths),)}))
        if mode == "w+":
            self.done[:] = False
            self.done.flush()
            # the index is written last: its presence means the arrays exist and can be resumed
            _write_json_atomic(join(root, INDEX_FILE), dict(
                format=FORMAT, version=VERSION, num_images=len(self.paths), k=self.k, height=self.height,
                width=self.width, num_classes=self.num_classes, score_dtype="float16",
                index_dtype=str(index_dtype(self.num_classes)), meta=meta or {}, paths=self.paths))

    @property
    def num_done(self) -> int:
        return int(self.done.sum())

    def pending(self) -> np.ndarray:
        """Rows still to write, ascending."""
        return np.flatnonzero(~np.asarray(self.done))

    def write(self, rows: Sequence[int], scores, indices) -> None:
        """Write rows ``[n]`` of scores/indices ``[n, k, H, W]`` (numpy or torch), flush, then mark them done."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
        indices = indices.detach().cpu().numpy() if torch.is_tensor(indices) else np.asarray(indices)
        shape = (self.k, self.height, self.width)
        for i, row in enumerate(rows):
            check_label(scores[i], indices[i], shape, self.num_classes, self.paths[row])
        self.scores[rows] = scores.astype(np.float16)
        self.indices[rows] = indices.astype(self.indices.dtype)
        self.scores.flush()
        self.indices.flush()
        self.done[rows] = True
        self.done.flush()

    def close(self) -> None:
        for arr in (self.scores, self.indices, self.done):
            arr.flush()
        del self.scores, self.indices, self.done


class LabelStore:
    """Read-only view of a packed store. Arrays are memory-mapped on first use in each process (not pickled)."""

    def __init__(self, root: str):
        self.root = root
        index = _read_index(root)
        self.num_images = index["num_images"]
        self.k, self.height, self.width = index["k"], index["height"], index["width"]
        self.num_classes = index["num_classes"]
        self.meta = index.get("meta", {})
        self.paths: List[str] = index["paths"]
        self._rows = {p: i for i, p in enumerate(self.paths)}
        self._arrays: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"] = None          # workers map the files themselves instead of receiving a copy
        return state

    def __len__(self) -> int:
        return self.num_images

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.k, self.height, self.width

    def arrays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            load = lambda name: np.load(os.path.join(self.root, name), mmap_mode="r")  # noqa: E731
            self._arrays = (load(SCORES_FILE), load(INDICES_FILE), load(DONE_FILE))
        return self._arrays

    @property
    def num_done(self) -> int:
        return int(self.arrays()[2].sum())

    def rows_for(self, keys: Sequence[str]) -> np.ndarray:
        """Row of every key; stops naming the first image without a (completely written) label, and how many lack one."""
        rows = np.array([self._rows.get(k, -1) for k in keys], dtype=np.int64)
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise TokenLabelError(
                f"no token label for image '{keys[missing[0]]}' in {self.root} ({missing.size} of {len(keys)} images "
                "have none): generate labels for this dataset with scripts/generate_token_labels.py")
        done = self.arrays()[2]
        unfinished = np.flatnonzero(~np.asarray(done[rows]))
        if unfinished.size:
            raise TokenLabelError(
                f"token label of image '{keys[unfinished[0]]}' was never written ({unfinished.size} of {len(keys)} "
                f"images unfinished; {self.num_done}/{self.num_images} rows done in {self.root}): re-run "
                "scripts/generate_token_labels.py to finish")
        return rows

    def read(self, row: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores float16 [k, H, W], indices [k, H, W])`` of one row, copied out of the map."""
        scores, indices, _ = self.arrays()
        return np.array(scores[row]), np.array(indices[row])

    def get(self, key: str) -> Tuple[np.ndarray, np.ndarray]:
        return self.read(int(self.rows_for([key])[0]))


# ============================================================================================ published .pt layout
def pt_label_path(label_root: str, key: str) -> str:
    """``<label_root>/<class_dir>/<stem>.pt`` for image key ``<class_dir>/<file>``; the published generator cut the
    file name at its first dot, which we try first, then the usual extension-less stem."""
    class_dir, name = os.path.split(key)
    first = os.path.join(label_root, class_dir, name.split(".")[0] + ".pt")
    if os.path.isfile(first):
        return first
    return os.path.join(label_root, class_dir, os.path.splitext(name)[0] + ".pt")


def read_pt_label(path: str, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read one published label file (a ``[2, k, H, W]`` tensor: scores, then class indices stored as floats)."""
    if not os.path.isfile(path):
        raise TokenLabelError(f"no token label for image '{name}': {path} does not exist")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file names itself
        raise TokenLabelError(f"cannot read token label {path} of image '{name}': {str(e).splitlines()[0]}") from None
    if not torch.is_tensor(t) or t.ndim != 4 or t.shape[0] != 2:
        shape = list(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise TokenLabelError(f"token label {path} of image '{name}' has shape {shape}, expected [2, k, H, W]")
    indices = t[1].float()
    if not torch.equal(indices, indices.round()):
        raise TokenLabelError(f"token label {path} of image '{name}': the class-index slice holds non-integers")
    return t[0].to(torch.float16).numpy(), indices.long().numpy()


def convert_pt_labels(image_keys: Sequence[str], label_root: str, out: str, num_classes: int,
                      batch_size: int = 256, progress: Optional[Callable[[int, int], None]] = None) -> LabelStoreWriter:
    """Pack ``<label_root>/<class_dir>/<stem>.pt`` files of ``image_keys`` into a store at ``out`` (resumable)."""
    if not image_keys:
        raise TokenLabelError("no images to convert")
    first_scores, _ = read_pt_label(pt_label_path(label_root, image_keys[0]), image_keys[0])
    k, h, w = first_scores.shape
    writer = LabelStoreWriter(out, image_keys, k, h, w, num_classes, meta=dict(source="pt", label_root=label_root))
    pending = writer.pending()
    total, done = len(image_keys), writer.num_done
    for start in range(0, len(pending), batch_size):
        rows = pending[start:start + batch_size]
        pairs = [read_pt_label(pt_label_path(label_root, image_keys[r]), image_keys[r]) for r in rows]
        for r, (s, i) in zip(rows, pairs):
            check_label(s, i, (k, h, w), num_classes, image_keys[r])
        writer.write(rows, np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        done += len(rows)
        if progress is not None:
            progress(done, total)
    return writer


# ============================================================================================ crop-aware targets
class TokenTargets(NamedTuple):
    """Soft targets of a batch: ``cls [B, K]`` for the class token, ``dense [B, N, K]`` for the patch tokens."""
    cls: torch.Tensor
    dense: torch.Tensor


def dense_score_map(scores: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Scatter top-k ``[B, k, H, W]`` scores into a dense ``[B, K, H, W]`` float map (zero for other classes)."""
    b, _, h, w = scores.shape
    out = torch.zeros(b, num_classes, h, w, dtype=torch.float32, device=scores.device)
    return out.scatter_(1, indices.long(), scores.float())


def crop_label_map(label_map: torch.Tensor, boxes: torch.Tensor, size: Tuple[int, int],
                   scale: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """RoIAlign each sample's crop box out of its ``[B, K, H, W]`` map, resampled to ``size`` ``(h, w)``.

    ``boxes [B, 4]`` are ``(x1, y1, x2, y2)`` normalised to the image, so they map to the label grid by the grid size
    whatever resolution the teacher ran at (``scale = (sx, sy)``, default the map's ``(W, H)``). Each output cell
    averages the bilinear samples inside its bin; the ``- 0.5`` puts the grid's cell centres at integer coordinates
    (torchvision's unaligned convention).
    """
    from torchvision.ops import roi_align
    b, _, h, w = label_map.shape
    sx, sy = (w, h) if scale is None else scale
    scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=label_map.device)
    rois = torch.cat([torch.arange(b, dtype=torch.float32, device=label_map.device)[:, None],
                      boxes.float().to(label_map.device) * scale - 0.5], dim=1)
    return roi_align(label_map, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=False)


def smooth(target: torch.Tensor, smoothing: float, form: str = "normalized") -> torch.Tensor:
    """Label smoothing of a soft target over its last dim (``K`` classes). ``normalized`` (default):
    ``(1 - smoothing) * target + smoothing / K``, summing to one. ``published``: the published code's
    ``(1 - smoothing + smoothing / K) * target + smoothing / K`` (its one-hot on/off values applied to a soft target),
    summing to ``1 + smoothing / K``."""
    if form not in SMOOTHING_FORMS:
        raise ValueError(f"token_label.smoothing_form '{form}' is not one of {', '.join(SMOOTHING_FORMS)}")
    if smoothing <= 0:
        return target
    off = smoothing / target.shape[-1]
    return target * (1.0 - smoothing + (off if form == "published" else 0.0)) + off


def published_box(crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The box the published code hands RoIAlign, ``(x1, y1, x2, y2)`` normalised, in the flipped image's frame, for
    integer crops ``[B, 6]`` = ``(top, left, height, width, image height, image width)`` as
    :class:`TokenLabelDataset` records them and flip flags ``[B]`` (true: the crop was drawn on the unflipped image and
    the image flipped after it).

    The published loader flips the image and its label map before the crop, so a flipped crop starts at
    ``left = W - left - width`` there. It stores ``(top/H, left/W, height/H, width/W)`` (Python division, kept in
    float32), adds the origin to the size in float32 (the far corner is ``top/H + height/H``, not ``(top + height)/H``)
    and passes ``(top, left, bottom, right)`` to RoIAlign, which reads it as ``(x1, y1, x2, y2)``: x and y swapped.
    """
    crop = crop.to(torch.float64)
    top, left, h, w, height, width = crop.unbind(-1)
    left = torch.where(flip.to(crop.device).bool(), width - left - w, left)
    coords = torch.stack([top / height, left / width, h / height, w / width], dim=-1).float()
    return torch.cat([coords[:, :2], coords[:, 2:] + coords[:, :2]], dim=-1)


def token_label_targets(label: Dict[str, torch.Tensor], num_classes: int, size: Union[int, Tuple[int, int]],
                        smoothing: float = 0.0, class_target: Optional[torch.Tensor] = None,
                        cls_source: str = "label_map", box_order: str = "fixed",
                        smoothing_form: str = "normalized") -> TokenTargets:
    """Targets of a collated batch of :class:`TokenLabelDataset` labels (already on the training device).

    dense: RoIAlign of the crop box to the token grid ``size``, flipped where the image was, softmax over classes.
    cls: ``label_map`` (published default) the softmax of the crop's 1x1 RoIAlign; ``ground_truth`` the one-hot
    ``class_target``; ``corrected`` the published ``--ground-truth`` blend (0.5 label map + 0.5 one-hot when their
    top classes agree, 0.9 + 0.1 when they do not). Both get ``smoothing`` (in ``smoothing_form``, :func:`smooth`).
    box_order: ``fixed`` (default) crops the label map with the image's crop box and flips the crop; ``published``
    flips the map first and crops it with the published code's box and arithmetic, x and y swapped
    (:func:`published_box`, from ``label["crop"]``), for the dense and the class targets alike.
    """
    if cls_source not in CLS_SOURCES:
        raise ValueError(f"token_label.cls_target '{cls_source}' is not one of {', '.join(CLS_SOURCES)}")
    if box_order not in BOX_ORDERS:
        raise ValueError(f"token_label.box_order '{box_order}' is not one of {', '.join(BOX_ORDERS)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    scores, indices = label["scores"], label["indices"]
    flip = label["flip"].to(scores.device).bool().view(-1, 1, 1, 1)
    if box_order == "fixed":
        full = dense_score_map(scores, indices, num_classes)
        box, scale = label["box"], None
    else:                   # the published code: the map flipped first, the crop in that frame, both axes by the width
        if "crop" not in label:
            raise ValueError("box_order 'published' needs the integer crop ('crop') that TokenLabelDataset records")
        full = dense_score_map(torch.where(flip, scores.flip(-1), scores), torch.where(flip, indices.flip(-1), indices),
                               num_classes)
        box, scale = published_box(label["crop"], label["flip"]), (full.shape[3], full.shape[3])
    dense = crop_label_map(full, box, size, scale)                                # [B, K, h, w]
    if box_order == "fixed":
        dense = torch.where(flip.to(dense.device), dense.flip(-1), dense)
    cls = crop_label_map(full, box, (1, 1), scale)                                # [B, K, 1, 1]
    # one softmax over the classes of [B, K, 1 + h*w], the published layout (the same values to the last bit)
    both = torch.cat([cls.flatten(2), dense.flatten(2)], dim=2).softmax(dim=1)
    cls, dense = both[:, :, 0], both[:, :, 1:].transpose(1, 2)                    # [B, K], [B, h*w, K]
    if cls_source != "label_map":
        if class_target is None:
            raise ValueError(f"cls_target '{cls_source}' needs the class targets")
        one_hot = F.one_hot(class_target.long().to(cls.device), num_classes).float()
        if cls_source == "ground_truth":
            cls = one_hot
        else:
            agree = (one_hot.argmax(1) == cls.argmax(1)).float().unsqueeze(1)
            ratio = 0.9 - 0.4 * agree
            cls = cls * ratio + one_hot * (1 - ratio)
    return TokenTargets(smooth(cls, smoothing, smoothing_form), smooth(dense, smoothing, smoothing_form))


# ============================================================================================ dataset
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


# ============================================================================================ loss
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(target * log_softmax(logits))``, computed in float32 (safe under autocast)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class TokenLabelLoss(nn.Module):
    """``cls_weight * CE(cls, mixed class target) + dense_weight * CE(aux, dense targets)``.

    With MixToken the class token saw ``lam`` of its own image and ``1 - lam`` of the batch-flipped one, so its
    target is mixed by the box area. The dense targets are *not* mixed: the model already swapped the aux outputs
    inside the box back (row ``b`` of ``aux`` describes image ``b`` everywhere), so each row meets its own image's
    targets. A plain tensor output (a model without a dense head) gets the class term alone.
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 1.0):
        super().__init__()
        if cls_weight < 0 or dense_weight < 0 or cls_weight + dense_weight <= 0:
            raise ValueError("token_label: cls_weight and dense_weight must be >= 0 and not both 0")
        self.cls_weight, self.dense_weight = cls_weight, dense_weight

    def forward(self, outputs, targets: TokenTargets) -> torch.Tensor:
        if torch.is_tensor(outputs):
            return self.cls_weight * soft_cross_entropy(outputs, targets.cls)
        cls, aux, box = outputs
        lam = 1.0 if box is None else box.lam
        cls_target = targets.cls
        if lam < 1.0:
            cls_target = lam * cls_target + (1.0 - lam) * cls_target.flip(0)
        loss = self.cls_weight * soft_cross_entropy(cls, cls_target)
        if self.dense_weight > 0:
            if aux.shape[1] != targets.dense.shape[1]:
                raise ValueError(f"the model has {aux.shape[1]} patch tokens but the token labels are resampled to "
                                 f"{targets.dense.shape[1]}: set token_label.size to the token grid side "
                                 f"({int(round(aux.shape[1] ** 0.5))} for a square grid)")
            num_classes = aux.shape[-1]
            loss = loss + self.dense_weight * soft_cross_entropy(aux.reshape(-1, num_classes),
                                                                 targets.dense.reshape(-1, num_classes))
        return loss


class TokenLabelCriterion(nn.Module):
    """The training criterion in the engine's ``criterion(images, outputs, targets)`` form, for
    ``targets = (class_target, label)`` of a :class:`TokenLabelDataset` batch already on the device: builds the
    crop-aware targets (:func:`token_label_targets`) and applies :class:`TokenLabelLoss`."""

    def __init__(self, num_classes: int, size: Union[int, Tuple[int, int]], smoothing: float = 0.0,
                 cls_weight: float = 1.0, dense_weight: float = 1.0, cls_source: str = "label_map",
                 box_order: str = "fixed", smoothing_form: str = "normalized"):
        super().__init__()
        if cls_source not in CLS_SOURCES:
            raise ValueError(f"token_label.cls_target '{cls_source}' is not one of {', '.join(CLS_SOURCES)}")
        if box_order not in BOX_ORDERS:
            raise ValueError(f"token_label.box_order '{box_order}' is not one of {', '.join(BOX_ORDERS)}")
        self.num_classes, self.size, self.smoothing, self.cls_source = num_classes, size, smoothing, cls_source
        self.box_order = box_order          # published: the published code's swapped crop box (token_label_targets)
        if smoothing_form not in SMOOTHING_FORMS:
            raise ValueError(f"token_label.smoothing_form '{smoothing_form}' is not one of {', '.join(SMOOTHING_FORMS)}")
        self.smoothing_form = smoothing_form    # published: targets sum to 1 + smoothing / K (smooth)
        self.loss = TokenLabelLoss(cls_weight, dense_weight)

    def forward(self, inputs: torch.Tensor, outputs, targets) -> torch.Tensor:
        class_target, label = targets
        t = token_label_targets(label, self.num_classes, self.size, self.smoothing, class_target, self.cls_source,
                                self.box_order, self.smoothing_form)
        return self.loss(outputs, t)
