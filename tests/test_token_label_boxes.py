"""``token_label.box_order: published``: the label-map crop with the published TokenLabeling arithmetic.

The published loader flips the image and its label map, draws the random-resized crop on the flipped image, stores
``(top/H, left/W, h/H, w/W)`` in the float32 label tensor, adds the origin to the size in float32 and hands the
result, times the map width, minus 0.5, to RoIAlign as ``(x1, y1, x2, y2)``. The reference below writes that out in
numpy float32, one crop at a time, and the targets must equal it bit for bit on many random draws (flipped ones
included). A second formula, the one this repository used before (far corner ``(top + h)/H``, box mirrored as
``1 - x`` on the unflipped map and the crop flipped after RoIAlign), must differ from it: by a few 1e-6 on many draws
and, on the draws where the class token's RoIAlign bin crosses an integer width, by more than ``SAMPLE_COUNT_TOL``.
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import token_labels as tl  # noqa: E402

C, G, TOKENS = 7, 14, 14          # classes, label grid (square, as both generators write it), token grid
IMAGE_SIZES = ((375, 500), (500, 375), (333, 500), (480, 640), (427, 640), (40, 80))    # (H, W)
SAMPLE_COUNT_TOL = 1e-4           # a class-token RoIAlign that takes one sample more or fewer moves a target this far


def _draws(n, seed=0):
    """``n`` published-style draws: image size, flip, then the crop on the (flipped) image (torch's RNG, as there)."""
    torch.manual_seed(seed)
    out = []
    for i in range(n):
        H, W = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        flip = bool(torch.rand(1) < 0.5)
        top, left, h, w = RandomResizedCrop.get_params(Image.new("RGB", (W, H)), [0.08, 1.0], [3 / 4, 4 / 3])
        out.append((H, W, flip, top, left, h, w))
    return out


def _maps(n, seed=1):
    """Top-k label maps ``[n, k, G, G]`` (float16 scores as the stores hold, distinct classes per cell)."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(n, 3, G, G, generator=g) * 4).half()
    indices = torch.argsort(torch.rand(n, C, G, G, generator=g), dim=1)[:, :3]
    return scores, indices


def _dense(scores, indices):
    out = torch.zeros(scores.shape[0], C, G, G)
    return out.scatter_(1, indices.long(), scores.float())


def _published_reference(scores, indices, draws):
    """The authors' formula, written out per crop. ``left`` of each draw is in the flipped image's frame."""
    rows = []
    maps = _dense(scores, indices)
    flipped = []
    for b, (H, W, flip, top, left, h, w) in enumerate(draws):
        coords = np.array([top / H, left / W, h / H, w / W], dtype=np.float32)     # Python division, float32 storage
        coords[2:] += coords[:2]                                                  # float32 add
        rois = coords * np.float32(G) - np.float32(0.5)                           # x and y both by the map width
        rows.append(np.concatenate([np.float32([b]), rois]))
        flipped.append(maps[b].flip(-1) if flip else maps[b])
    maps = torch.stack(flipped)
    rois = torch.from_numpy(np.stack(rows))
    dense = roi_align(maps, rois, output_size=(TOKENS, TOKENS)).flatten(2)
    cls = roi_align(maps, rois, output_size=(1, 1)).flatten(2)
    target = torch.cat([cls, dense], 2).softmax(1)                 # class token first, one softmax over the classes
    return target[:, :, 1:].transpose(1, 2), target[:, :, 0], rois


def _previous_formula(scores, indices, draws):
    """The arithmetic this repository used before: ``(top + h)/H`` corners of the unflipped crop, mirrored ``1 - x``
    on the unflipped map, the RoIAlign output flipped afterwards."""
    maps = _dense(scores, indices)
    boxes = []
    for H, W, flip, top, left, h, w in draws:
        left = W - left - w if flip else left                                     # the crop on the unflipped image
        x1, y1, x2, y2 = (torch.tensor([left / W, top / H, (left + w) / W, (top + h) / H], dtype=torch.float32)
                          .tolist())
        boxes.append([1 - y2, 1 - x2, 1 - y1, 1 - x1] if flip else [y1, x1, y2, x2])
    rois = torch.cat([torch.arange(len(draws), dtype=torch.float32)[:, None],
                      torch.tensor(boxes, dtype=torch.float32) * G - 0.5], 1)
    dense = roi_align(maps, rois, output_size=(TOKENS, TOKENS))
    flip = torch.tensor([d[2] for d in draws]).view(-1, 1, 1, 1)
    dense = torch.where(flip, dense.flip(-1), dense)
    cls = roi_align(maps, rois, output_size=(1, 1))
    return dense.softmax(1).flatten(2).transpose(1, 2), cls.flatten(1).softmax(1), rois


def _labels(scores, indices, draws, joint):
    """Labels as TokenLabelDataset records them. Default path: the crop on the unflipped image, flipped afterwards
    (``crop`` in the unflipped frame, ``flip`` set). Joint path (published order): the map already flipped, the crop
    drawn on the flipped image, ``flip`` false."""
    crops, flips, s, i = [], [], scores.clone(), indices.clone()
    for b, (H, W, flip, top, left, h, w) in enumerate(draws):
        if joint:
            if flip:
                s[b], i[b] = scores[b].flip(-1), indices[b].flip(-1)
            crops.append([top, left, h, w, H, W])
            flips.append(False)
        else:
            crops.append([top, W - left - w if flip else left, h, w, H, W])
            flips.append(flip)
    crop = torch.tensor(crops)
    x = torch.stack([crop[:, 1] / crop[:, 5], crop[:, 0] / crop[:, 4], (crop[:, 1] + crop[:, 3]) / crop[:, 5],
                     (crop[:, 0] + crop[:, 2]) / crop[:, 4]], 1).float()
    return {"scores": s, "indices": i, "box": x, "crop": crop, "flip": torch.tensor(flips)}


@pytest.mark.parametrize("joint", [False, True], ids=["flip-after-crop", "published-order"])
def test_published_box_order_equals_the_published_formula(joint):
    draws = _draws(864)
    scores, indices = _maps(len(draws))
    assert {d[2] for d in draws} == {True, False}
    label = _labels(scores, indices, draws, joint)
    dense, cls, rois = _published_reference(scores, indices, draws)
    box = tl.published_box(label["crop"], label["flip"])
    assert torch.equal(box * G - 0.5, rois[:, 1:])
    got = tl.token_label_targets(label, C, TOKENS, box_order="published")
    assert torch.equal(got.dense, dense) and torch.equal(got.cls, cls)
    # through the criterion, as training calls it
    outputs = (torch.randn(len(draws), C), torch.randn(len(draws), TOKENS * TOKENS, C), None)
    loss = tl.TokenLabelCriterion(C, TOKENS, box_order="published")(None, outputs, (None, label))
    assert loss.item() == pytest.approx(tl.TokenLabelLoss()(outputs, tl.TokenTargets(cls, dense)).item(), rel=1e-6)


def test_the_previous_arithmetic_differs_where_the_issue_says():
    """Far corner summed in float32 and the flipped frame vs ``(top + h)/H`` mirrored: the boxes differ in the last
    float32 bits on many draws; where the class token's bin width crosses an integer, RoIAlign takes one sample more
    or fewer (ceil of the width) and the class target moves by more than SAMPLE_COUNT_TOL."""
    draws = _draws(2592)
    scores, indices = _maps(len(draws))
    dense, cls, rois = _published_reference(scores, indices, draws)
    old_dense, old_cls, old_rois = _previous_formula(scores, indices, draws)
    flips = torch.tensor([d[2] for d in draws])
    mirrored = torch.stack([G - 1 - old_rois[:, 3], old_rois[:, 2], G - 1 - old_rois[:, 1], old_rois[:, 4]], 1)
    old_box = torch.where(flips[:, None], mirrored, old_rois[:, 1:])              # in the flipped image's frame
    box_diff = (rois[:, 1:] - old_box).abs().max(1).values
    assert (box_diff > 0).float().mean() > 0.1 and box_diff.max() < 1e-5
    samples = lambda r: torch.ceil(r[:, 3] - r[:, 1]) * torch.ceil(r[:, 4] - r[:, 2])  # noqa: E731 (1x1 bin)
    count_changed = samples(rois) != samples(old_rois)
    cls_diff = (cls - old_cls).abs().max(1).values
    dense_diff = (dense - old_dense).abs().flatten(1).max(1).values
    assert count_changed.any()
    assert (cls_diff[count_changed] > SAMPLE_COUNT_TOL).all()
    same_count = ~count_changed
    assert cls_diff[same_count].max() < 1e-5 and (dense_diff > 1e-6).any() and dense_diff.max() < SAMPLE_COUNT_TOL
    assert flips[count_changed].any()
    print(f"boxes differ on {(box_diff > 0).sum().item()}/{len(draws)} draws (max {box_diff.max().item():.2e}); "
          f"class-token sample count changed on {count_changed.sum().item()} (flipped: "
          f"{flips[count_changed].sum().item()}), max class-target change {cls_diff.max().item():.2e}, "
          f"max dense change where the count held {dense_diff[same_count].max().item():.2e}")


def test_fixed_and_published_modes_differ_by_the_swap():
    """``fixed`` crops the image's own box: on landscape/portrait images the swapped published box is elsewhere."""
    draws = [d for d in _draws(200) if d[0] != d[1]]
    scores, indices = _maps(len(draws))
    label = _labels(scores, indices, draws, joint=False)
    fixed = tl.token_label_targets(label, C, TOKENS)
    published = tl.token_label_targets(label, C, TOKENS, box_order="published")
    diff = (fixed.dense - published.dense).abs().flatten(1).max(1).values
    assert (diff > 0.1).float().mean() > 0.5
    with pytest.raises(ValueError, match="needs the integer crop"):
        tl.token_label_targets({k: v for k, v in label.items() if k != "crop"}, C, TOKENS, box_order="published")


def test_dataset_records_the_integer_crop_of_its_box(tmp_path):
    from torchvision import transforms
    img_dir = tmp_path / "img" / "a"
    img_dir.mkdir(parents=True)
    Image.new("RGB", (80, 40)).save(img_dir / "x.png")

    class Folder:
        root, classes, samples = str(tmp_path / "img"), ["a"], [(str(img_dir / "x.png"), 0)]
        loader = staticmethod(lambda p: Image.open(p).convert("RGB"))
    store = str(tmp_path / "store")
    tl.LabelStoreWriter(store, ["a/x.png"], 1, 2, 2, 1).write([0], np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    for joint in (None, lambda img, s, i: (img, s, i)):
        ds = tl.TokenLabelDataset(Folder(), store, 16, image_transform=transforms.ToTensor(), joint_transform=joint)
        torch.manual_seed(0)
        for _ in range(8):
            _, _, label = ds[0]
            top, left, h, w, H, W = label["crop"].tolist()
            assert (H, W) == (40, 80) and 0 <= top < top + h <= H and 0 <= left < left + w <= W
            expected = torch.tensor([left / W, top / H, (left + w) / W, (top + h) / H], dtype=torch.float32)
            assert torch.equal(label["box"], expected)
    assert math.isclose(tl.published_box(torch.tensor([[10, 10, 30, 40, 40, 80]]), torch.tensor([True]))[0, 1].item(),
                        30 / 80, rel_tol=1e-6)                # the flipped crop's left: 80 - 10 - 40 = 30
