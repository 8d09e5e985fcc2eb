"""The token-labeling loss: soft cross-entropy of the class token and of the dense patch-token outputs against the
crop-aware targets (:mod:`token_labels.targets`), with MixToken's area mixing of the class target."""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .targets import BOX_ORDERS, CLS_SOURCES, SMOOTHING_FORMS, TokenTargets, token_label_targets

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
