"""Token labeling as the ``token_label:`` config section: its schema, the keys it cannot run with, the training set
that carries each image's dense label map, the token-labeling criterion and the check of the model's token grid."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.utils.data import Dataset

from extensions import Extension, ExtensionError, register_extension

from .data import RAND_AUGMENTS, TokenLabelDataset, build_token_label_transforms
from .loss import TokenLabelCriterion
from .targets import BOX_ORDERS, CLS_SOURCES, SMOOTHING_FORMS

IMAGE_FOLDER_SETS = ("imagenet", "folder", "digits")      # the data sets read as an ImageFolder (the store's keys)


@dataclass
class TokenLabelConfig:
    """LV-ViT token labeling: dense teacher labels from a packed store (scripts/generate_token_labels.py)."""
    data: str = "data/token_labels"            # the packed label store directory
    size: int = 14                             # token grid of the dense targets: input_size / patch size
    cls_weight: float = 1.0                    # weight of the class-token loss
    dense_weight: float = 1.0                  # weight of the dense (per-token) loss
    cls_target: str = field(default="label_map", metadata={"choices": CLS_SOURCES})   # label_map | ground_truth | corrected
    box_order: str = field(default="fixed", metadata={"choices": BOX_ORDERS})   # fixed | published: the published code's crop box with x and y swapped
    rand_augment: str = field(default="photometric", metadata={"choices": RAND_AUGMENTS})   # photometric (after the crop, image only) | published (LV-ViT's: all ops on image and label map before the crop) | aligned
    smoothing_form: str = field(default="normalized", metadata={"choices": SMOOTHING_FORMS})   # normalized (smoothed targets sum to 1) | published (the published on/off values: they sum to 1 + smoothing / K)


@register_extension
class TokenLabeling(Extension):
    """The dense labels are the teacher: MixToken replaces mixup and cutmix, and no distillation runs beside it."""

    name = "token_label"
    Config = TokenLabelConfig

    @classmethod
    def validate(cls, section: TokenLabelConfig, cfg) -> None:
        for key in ("cls_weight", "dense_weight"):
            if getattr(section, key) < 0:
                raise ExtensionError(f"token_label.{key}: {getattr(section, key)} must be >= 0")
        for key in ("mixup", "cutmix"):
            if getattr(cfg, key) > 0:
                raise ExtensionError(f"{key}: must be 0 with token_label (MixToken replaces mixup and cutmix)")
        if cfg.distillation_type != "none":
            raise ExtensionError("distillation_type: must be none with token_label (the dense labels are the teacher)")
        if cfg.data_set not in IMAGE_FOLDER_SETS:
            raise ExtensionError(f"data_set: token_label needs an ImageFolder dataset (imagenet, folder), not {cfg.data_set}")
        if section.size <= 0:
            raise ExtensionError(f"token_label.size: {section.size} must be > 0")

    def check_model(self, model: nn.Module) -> None:
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        size = self.section.size
        if grid is not None and tuple(grid) != (size, size):
            raise ExtensionError(f"token_label.size: {size} does not match the model's {tuple(grid)} token grid "
                                 f"at input_size {self.cfg.input_size}; set it to input_size / patch size")

    def train_dataset(self, dataset: Dataset, cfg) -> Dataset:
        """LV-ViT's training set: the crop and flip are drawn once for the image and its dense label map."""
        from datasets import fix_posterize
        t = build_token_label_transforms(cfg.input_size, cfg.color_jitter, cfg.aa, cfg.train_interpolation, cfg.reprob,
                                         cfg.remode, cfg.recount, rand_augment=self.section.rand_augment)
        fix_posterize(t.joint if t.joint is not None else t.image)     # the RandAugment sits in one of the two
        return TokenLabelDataset(dataset, self.section.data, cfg.input_size, num_classes=len(dataset.classes),
                                 scale=tuple(cfg.crop_scale), hflip=cfg.hflip, interpolation=cfg.train_interpolation,
                                 image_transform=t.image, joint_transform=t.joint)

    def criterion(self, nb_classes: int) -> nn.Module:
        s = self.section
        return TokenLabelCriterion(nb_classes, s.size, self.cfg.smoothing, s.cls_weight, s.dense_weight, s.cls_target,
                                   box_order=s.box_order, smoothing_form=s.smoothing_form)
