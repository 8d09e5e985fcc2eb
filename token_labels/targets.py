"""Crop-aware token-label targets: a batch's top-k label maps scattered into dense maps, RoIAligned to the crop box
on the token grid (and to 1x1 for the class token), flipped, softmaxed and smoothed, on the device."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F

CLS_SOURCES = ("label_map", "ground_truth", "corrected")
BOX_ORDERS = ("published", "fixed")                # published: x and y of the crop box swapped, as the published code
# normalized: smoothed targets sum to 1; published: the published code's on/off values on soft targets (sum 1 + s/K)
SMOOTHING_FORMS = ("normalized", "published")


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
