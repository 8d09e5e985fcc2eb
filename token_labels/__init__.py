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

Published fidelity, each behind an argument whose default is this repository's behaviour (the ``token_label:`` config
keys that choose them are declared in :mod:`token_labels.extension`; the published behaviour is what the table configs
use):

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

The package: :mod:`token_labels.store` (the packed store and the ``.pt`` conversion), :mod:`token_labels.targets`
(crop-aware targets), :mod:`token_labels.data` (the dataset and its augmentations), :mod:`token_labels.loss` (the
loss and the criterion the trainer builds); every public name is importable from ``token_labels``.
:mod:`token_labels.extension` plugs it into training as the ``token_label:`` section (see :mod:`extensions`): its
schema and checks, the training set and the criterion, found by the trainer without naming it.
"""
from .data import (GEOMETRIC_RAND_OPS, RAND_AUGMENTS, LabelRandAugment, TokenLabelDataset, TokenLabelTransforms,
                   affine_label, build_image_transform, build_token_label_transforms, label_op_matrix)
from .loss import TokenLabelCriterion, TokenLabelLoss, soft_cross_entropy
from .store import (DONE_FILE, FORMAT, INDEX_FILE, INDICES_FILE, SCORES_FILE, VERSION, LabelStore, LabelStoreWriter,
                    TokenLabelError, check_label, convert_pt_labels, image_key, index_dtype, pt_label_path,
                    read_pt_label)
from .targets import (BOX_ORDERS, CLS_SOURCES, SMOOTHING_FORMS, TokenTargets, crop_label_map, dense_score_map,
                      published_box, smooth, token_label_targets)

__all__ = ["FORMAT", "VERSION", "INDEX_FILE", "SCORES_FILE", "INDICES_FILE", "DONE_FILE", "TokenLabelError",
           "image_key", "index_dtype", "check_label", "LabelStoreWriter", "LabelStore", "pt_label_path",
           "read_pt_label", "convert_pt_labels", "CLS_SOURCES", "BOX_ORDERS", "SMOOTHING_FORMS", "TokenTargets",
           "dense_score_map", "crop_label_map", "smooth", "published_box", "token_label_targets", "RAND_AUGMENTS",
           "GEOMETRIC_RAND_OPS", "build_image_transform", "affine_label", "label_op_matrix", "LabelRandAugment",
           "TokenLabelTransforms", "build_token_label_transforms", "TokenLabelDataset", "soft_cross_entropy",
           "TokenLabelLoss", "TokenLabelCriterion"]
